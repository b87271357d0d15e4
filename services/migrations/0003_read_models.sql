-- formerly opsflow 0006
-- The order workflow's read-model tables: a database migrated before they moved here has them from
-- opsflow's own migration 0006, and this one is then recorded, not run.
-- Projections of the log, each rebuilt from it by `opsflow projections rebuild
-- NAME`; docs/contracts.md documents the columns. As in opsflow's migrations, the
-- connection's search_path decides the schema.

-- One row per order: where it is now and when each step happened.
CREATE TABLE orders_current (
    order_id text PRIMARY KEY,
    state text NOT NULL,
    state_rank integer NOT NULL,
    customer_id text,
    customer_name text,
    risk_tier text,
    amount_minor bigint,
    currency text,
    destination_country text,
    sales_channel text,
    received_at timestamptz,
    policy_outcome text,
    policy_reason_codes text[],
    rules_version text,
    policy_checked_at timestamptz,
    review_task_id text,
    review_requested_at timestamptz,
    review_tier text,
    review_due_at timestamptz,
    review_tier_rank integer,
    escalated_at timestamptz,
    sla_breached_at timestamptz,
    reviewed_by text,
    reviewed_by_name text,
    review_decision text,
    review_reason text,
    reviewed_at timestamptz,
    dispatch_id text,
    carrier text,
    dispatch_requested_at timestamptz,
    dispatch_attempts integer,
    booking_reference text,
    dispatched_at timestamptz,
    dispatch_failure_class text,
    dispatch_failure_reason text,
    dispatch_failed_at timestamptz,
    dispatch_failure_rank integer,
    delivered_at timestamptz,
    pod_received_by text,
    pod_signature_ref text,
    last_event_at timestamptz
);
CREATE INDEX orders_current_state ON orders_current (state);
CREATE INDEX orders_current_day ON orders_current (((received_at AT TIME ZONE 'UTC')::date));

-- Per UTC day of receipt: where that day's orders are now, and how long steps took.
CREATE TABLE daily_summary (
    day date PRIMARY KEY,
    orders integer NOT NULL,
    delivered integer NOT NULL,
    dispatched integer NOT NULL,
    dispatch_failed integer NOT NULL,
    rejected integer NOT NULL,
    in_progress integer NOT NULL,
    reviewed integer NOT NULL,
    review_minutes_p50 double precision,
    review_minutes_p95 double precision,
    dispatch_seconds_p50 double precision,
    dispatch_seconds_p95 double precision,
    sla_breaches integer NOT NULL,
    sla_breach_rate double precision
);

-- Review tasks: open ones (status open or claimed) with their SLA and tier; decided ones stay
-- with status 'decided' so an event replayed out of order cannot reopen them.
CREATE TABLE review_queue (
    task_id text PRIMARY KEY,
    order_id text,
    status text,
    status_rank bigint,
    claimed_by text,
    claimed_by_name text,
    claimed_at timestamptz,
    tier text,
    due_at timestamptz,
    tier_rank integer,
    reason_codes text[],
    requested_at timestamptz,
    escalated_at timestamptz,
    sla_breached_at timestamptz,
    decision text,
    decided_by text,
    decided_at timestamptz
);
CREATE INDEX review_queue_open ON review_queue (status, due_at) WHERE status <> 'decided';

-- Every SLA that passed: an escalation to the next tier, or the last tier's breach.
CREATE TABLE sla_breaches (
    event_id uuid PRIMARY KEY,
    task_id text NOT NULL,
    order_id text NOT NULL,
    kind text NOT NULL,
    tier text NOT NULL,
    next_tier text,
    due_at timestamptz NOT NULL,
    breached_at timestamptz NOT NULL
);
CREATE INDEX sla_breaches_order ON sla_breaches (order_id);

-- Every dispatch step: requests (one per attempt), bookings and failures.
CREATE TABLE dispatch_log (
    event_id uuid PRIMARY KEY,
    order_id text NOT NULL,
    dispatch_id text NOT NULL,
    kind text NOT NULL,
    attempt integer NOT NULL,
    carrier text NOT NULL,
    booking_reference text,
    failure_class text,
    reason text,
    retries_exhausted boolean,
    occurred_at timestamptz NOT NULL
);
CREATE INDEX dispatch_log_order ON dispatch_log (order_id);
