-- refunds_current: one row per refund, where it stands, folded from every topic of the
-- refund workflow (services/refunds/readmodel.py). As every migration, the
-- connection's search_path decides the schema.
CREATE TABLE refunds_current (
    refund_id text PRIMARY KEY,
    order_id text,
    customer_id text,
    amount_minor bigint,
    currency text,
    refund_reason text,
    requested_at timestamptz,
    state_rank integer,
    state text,
    check_outcome text,
    reason_codes text[],
    rules_version text,
    decided_by text,
    decision text,
    decided_at timestamptz,
    escalated_at timestamptz,
    payout_reference text,
    payout_failure text,
    finished_at timestamptz
);
CREATE INDEX refunds_current_state ON refunds_current (state);
