-- Dead letters redriven by `opsflow dlq redrive`: one row per dead letter written back to
-- its source topic, so a second redrive of the same dead letter does nothing.
-- The row is committed only after the broker confirmed the write, so a crash in between
-- leaves the dead letter unmarked and a later redrive writes it again: a duplicate, which
-- every consumer takes as a repeat (see opsflow.dlq), never a lost redrive.
-- Topics are named as in the environment (with OPSFLOW_TOPIC_PREFIX).
CREATE TABLE dlq_redrives (
    dlq_topic text NOT NULL,
    dlq_partition integer NOT NULL,
    dlq_offset bigint NOT NULL,
    consumer text NOT NULL,
    source_topic text NOT NULL,
    source_partition integer,
    source_offset bigint,
    redriven_at timestamptz NOT NULL DEFAULT now(),
    new_partition integer NOT NULL,
    new_offset bigint NOT NULL,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
