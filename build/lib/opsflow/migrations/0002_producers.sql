-- Producers: API keys for the ingest service and its idempotency records.
-- As in 0001, no schema name is written: the connection's search_path decides.

-- One row per API key. Only a SHA-256 digest of the key is stored: keys are
-- 256-bit random secrets, so a fast unsalted hash cannot be reversed or
-- brute-forced, and verifying a request stays one indexed lookup (slow,
-- salted hashes exist for low-entropy passwords, which these are not).
-- key_id is the public handle shown in listings and used to revoke.
CREATE TABLE opsflow_api_keys (
    key_id text PRIMARY KEY,
    producer text NOT NULL,
    key_hash bytea NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

-- One row per (producer, Idempotency-Key) request the ingest service accepted:
-- a repeat with the same key gets the stored response and writes nothing.
-- The service takes a transaction-scoped advisory lock on the pair, looks the
-- row up, writes the events to Kafka and inserts the row with the response in
-- that one transaction: a concurrent identical request waits on the lock and
-- then replays the row, and a failed write leaves no row behind (a retry
-- writes again, with the same event ids). request_hash is the SHA-256 of the
-- route and the body bytes, so the same key with another body is refused.
-- response is the JSON answer exactly as first sent, so a replay is identical.
-- One row per call, however many events a batch holds.
CREATE TABLE opsflow_ingest_requests (
    producer text NOT NULL,
    idempotency_key text NOT NULL,
    request_hash bytea NOT NULL,
    status_code integer NOT NULL,
    response text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (producer, idempotency_key)
);
