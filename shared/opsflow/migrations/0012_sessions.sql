-- People's signed-in browser sessions (the inbox pages of a human step).
-- As in 0001, no schema name is written: the connection's search_path decides.

-- One row per session. The cookie carries a 256-bit random session id; only its
-- SHA-256 digest is stored, as for tokens (0005), so the table gives nobody a
-- cookie that works. scope is the step whose pages started it (a review session
-- does not open the refund approvals' inbox). A session ends when it is idle or
-- old past the limits the step passes with every check (last_seen_at,
-- created_at), when its person signs out (the row is deleted) or when the user
-- is revoked (every check joins opsflow_users and wants revoked_at IS NULL).
CREATE TABLE opsflow_sessions (
    session_hash bytea PRIMARY KEY,
    scope text NOT NULL,
    user_id text NOT NULL REFERENCES opsflow_users (user_id),
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX opsflow_sessions_scope_seen ON opsflow_sessions (scope, last_seen_at);
