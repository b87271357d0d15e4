-- Human steps' task transitions (opsflow.nodes.human.transitions): per task, the last
-- event a step's desk decided, recorded before it is written to the step's topic.
-- As in 0001, no schema name is written: the connection's search_path decides.

-- Every instance of a step changes a task under one lock (a PostgreSQL advisory lock
-- on the topic and task id), and first makes sure the event in this row is in its
-- table and in the log: written is false from the moment the event is recorded until
-- the broker acknowledged it, so the row of an instance killed in between tells the
-- next one to write it again (the same event id: a repeat changes nothing). version
-- is the task's version once the event is applied: an instance whose table has not
-- read that far waits for its reader before deciding anything.
CREATE TABLE task_transitions (
    topic text NOT NULL,
    task_id text NOT NULL,
    version integer NOT NULL,
    event_type text NOT NULL,
    event jsonb NOT NULL,
    written boolean NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, task_id)
);
CREATE INDEX task_transitions_unwritten ON task_transitions (topic) WHERE NOT written;
