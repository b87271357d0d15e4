-- People who act in opsflow (reviewers, supervisors, operators) and their bearer tokens.
-- As in 0001, no schema name is written: the connection's search_path decides.

-- One row per person. Only a SHA-256 digest of the token is stored, as for API
-- keys (0002): tokens are 256-bit random secrets, so a fast unsalted hash cannot
-- be reversed or brute-forced, and checking a request is one indexed lookup.
-- user_id is the stable id written into events (Actor.user_id); name is the
-- unique handle used on the command line; display_name is what events and
-- screens show. A revoked user keeps the row, so past events still resolve.
CREATE TABLE opsflow_users (
    user_id text PRIMARY KEY,
    name text NOT NULL UNIQUE,
    display_name text NOT NULL,
    role text NOT NULL CHECK (role IN ('reviewer', 'supervisor', 'operator')),
    token_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
