-- The saga's payment deadline (decision 0008): an order still waiting for
-- its payment (STOCK_RESERVED) past payment_due_at is cancelled with reason
-- payment_timeout by the order worker's deadline scan. The partial index
-- holds only the orders that are waiting, so the scan stays cheap however
-- many orders the table keeps.
ALTER TABLE orders.orders ADD COLUMN payment_due_at timestamptz;
CREATE INDEX IF NOT EXISTS orders_payment_due ON orders.orders (payment_due_at) WHERE status = 'STOCK_RESERVED';
