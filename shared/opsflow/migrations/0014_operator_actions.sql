-- What operators did from the console (opsflow.operator_actions): one row per action,
-- written before the action runs and given its outcome when it ends, so an action that
-- never finished (the process died) still names who started what.
-- As in 0001, no schema name is written: the connection's search_path decides.
CREATE TABLE operator_actions (
    action_id uuid PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    user_id text NOT NULL REFERENCES opsflow_users (user_id),
    actor text NOT NULL,
    role text NOT NULL,
    action text NOT NULL,
    target text NOT NULL,
    ended_at timestamptz,
    outcome text,
    detail jsonb
);
CREATE INDEX operator_actions_started ON operator_actions (started_at DESC);
CREATE INDEX operator_actions_target ON operator_actions (target);
