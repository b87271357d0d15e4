-- Records that repeat an event the audit log already has (a replay, a redrive, an aborted
-- transaction a broker let through): the audit log keeps an event's first record, this
-- keeps where the others are. Part of the audit_log projection. With the audit log it names
-- every record of an order up to the projection's position, so `opsflow trace` reads
-- those records instead of every topic from the beginning. Topics are named as in the
-- environment (with OPSFLOW_TOPIC_PREFIX), as in audit_log.
-- Copies written before this table existed are there after `opsflow projections rebuild
-- audit_log`.
CREATE TABLE audit_copies (
    topic text NOT NULL,
    partition integer NOT NULL,
    "offset" bigint NOT NULL,
    event_id uuid NOT NULL,
    order_id text NOT NULL,
    PRIMARY KEY (topic, partition, "offset")
);
CREATE INDEX audit_copies_order ON audit_copies (order_id);
