-- The catalog: what each product costs, in one currency. Owned by
-- order-worker (`order.set-price`), read by the publisher. An order is
-- charged these prices, never the client's (decision 0023).
CREATE TABLE orders.products (
    sku              text        PRIMARY KEY,
    unit_price_cents bigint      NOT NULL CHECK (unit_price_cents >= 0),
    currency         text        NOT NULL,
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- A line of an order cancelled for an unknown product has no price.
ALTER TABLE orders.order_items ALTER COLUMN unit_price_cents DROP NOT NULL;
