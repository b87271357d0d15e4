-- API key scopes: the event types a key may send. NULL (every key created before
-- scopes, and a key created without --events) means every event type whose
-- declaration (Event.emitted_by) admits the key's producer; a list narrows that.
ALTER TABLE opsflow_api_keys ADD COLUMN events text[];
