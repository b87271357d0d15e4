-- What a reviewer needs of an order beyond its state: its items, notes, full destination and
-- when the customer placed it (all from order.received), and the customer's earlier orders
-- found by customer. Orders projected before this migration get them from a rebuild:
-- `opsflow projections rebuild orders_current`.
ALTER TABLE orders_current
    ADD COLUMN placed_at timestamptz,
    ADD COLUMN destination jsonb,
    ADD COLUMN items jsonb,
    ADD COLUMN notes text;
CREATE INDEX orders_current_customer ON orders_current (customer_id, received_at);
