-- dispatch keeps its orders' decisions and destinations in opsflow's effect_claims
-- (step 'dispatch'), as every effect step does: the first decision of an order stands
-- (an approval claims its one dispatch, a refusal declines it). What dispatch_orders
-- held moves there, destination as the claim's details, so an approval written before
-- policy.checked carried the destination (v1) still finds it.
INSERT INTO effect_claims (step, instance_key, details, request_key, claimed_at)
SELECT 'dispatch', order_id, jsonb_build_object('destination', destination), dispatch_key,
       claimed_at
FROM dispatch_orders
ON CONFLICT (step, instance_key) DO NOTHING;

DROP TABLE dispatch_orders;
