-- Effect steps' claims (opsflow.nodes.effect.Claims): per step and workflow instance,
-- what the effect needs (remembered from an earlier event: the approval that triggers
-- an effect often does not carry it) and the idempotency key of the one request the
-- instance may get, claimed before that request event is emitted. A second trigger
-- under another key is recognised and causes nothing; a replay of the first, under the
-- same key, is let through and emits the very same request again.
CREATE TABLE effect_claims (
    step text NOT NULL,
    instance_key text NOT NULL,
    details jsonb NOT NULL,
    remembered_at timestamptz NOT NULL DEFAULT now(),
    request_key text,
    claimed_at timestamptz,
    PRIMARY KEY (step, instance_key)
);
