-- The customer (a JWT's `sub`) who placed the order: such a caller sees and
-- cancels only its own orders. Null for orders placed with an API key.
ALTER TABLE orders.orders ADD COLUMN placed_by text;
