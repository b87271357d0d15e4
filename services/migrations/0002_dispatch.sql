-- formerly opsflow 0004
-- Dispatch's tables: a database migrated before they moved here has them from
-- opsflow's own migration 0004, and this one is then recorded, not run.
-- dispatch: what the dispatch step must know to book a carrier, and its one
-- dispatch decision per order. As in 0001, the connection's search_path decides
-- the schema.

-- One row per order seen on the orders topic: the destination to book (the
-- approval events do not carry it). dispatch_key is the idempotency key of
-- the one dispatch.requested the order may get: claimed before that event is
-- emitted, so a second approval of the same order (a duplicate submission
-- under another key) is recognised and books nothing, while a replay of the
-- first approval, carrying the same key, is let through and emits the very
-- same event again.
CREATE TABLE dispatch_orders (
    order_id text PRIMARY KEY,
    destination jsonb NOT NULL,
    received_event_id uuid NOT NULL,
    dispatch_key text,
    claimed_at timestamptz
);
