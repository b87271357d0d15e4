-- Projections: read models kept from the topics, and where each stands in them.
-- Every table here is a projection of the log and can be rebuilt from it
-- (`opsflow projections rebuild NAME`); docs/contracts.md documents the columns.
-- As in 0001, the connection's search_path decides the schema.

-- The offset of the next record each projection applies, per topic partition,
-- written in the same transaction as the rows (exactly once without Kafka
-- consumer groups). A rebuild keeps its own under "<name>__rebuild".
CREATE TABLE projection_positions (
    projection text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    next_offset bigint NOT NULL,
    last_event_at timestamptz,
    PRIMARY KEY (projection, topic, partition)
);

CREATE TABLE projection_status (
    projection text PRIMARY KEY,
    last_error text,
    last_error_at timestamptz
);

-- Every event of every topic, append only, chained: row_hash = sha256(prev_hash || content),
-- so a changed, removed or reordered row breaks the chain (`opsflow audit verify`).
CREATE TABLE audit_log (
    seq bigint PRIMARY KEY,
    event_id uuid NOT NULL UNIQUE,
    event_type text NOT NULL,
    order_id text NOT NULL,
    occurred_at timestamptz NOT NULL,
    producer text NOT NULL,
    actor text,
    correlation_id text NOT NULL,
    causation_id text,
    idempotency_key text NOT NULL,
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    value_sha256 bytea NOT NULL,
    prev_hash bytea NOT NULL,
    row_hash bytea NOT NULL
);
CREATE INDEX audit_log_order ON audit_log (order_id);
