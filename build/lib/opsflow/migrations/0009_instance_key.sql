-- The audit log names each event's workflow instance by its record key (the value of
-- its topic's key field: an order id, an invoice id), whatever the application calls it.
ALTER TABLE audit_log RENAME COLUMN order_id TO instance_key;
ALTER INDEX audit_log_order RENAME TO audit_log_instance;
ALTER TABLE audit_copies RENAME COLUMN order_id TO instance_key;
ALTER INDEX audit_copies_order RENAME TO audit_copies_instance;
