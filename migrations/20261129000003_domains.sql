-- orders: the saga's state, owned by order-worker, read by the publisher.
CREATE TABLE orders.orders (
    id              uuid        PRIMARY KEY,
    customer_email  text        NOT NULL,
    currency        text        NOT NULL,
    total_cents     bigint      NOT NULL CHECK (total_cents >= 0),
    payment_method  text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('PENDING', 'STOCK_RESERVED', 'PAID', 'CONFIRMED', 'CANCELLED')),
    reason          text,
    charge_id       text,
    refunded        boolean     NOT NULL DEFAULT false,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders.order_items (
    order_id         uuid    NOT NULL REFERENCES orders.orders (id),
    line             int     NOT NULL,
    sku              text    NOT NULL,
    quantity         int     NOT NULL CHECK (quantity > 0),
    unit_price_cents bigint  NOT NULL CHECK (unit_price_cents >= 0),
    PRIMARY KEY (order_id, line)
);

-- Append-only history of every transition; GET /orders/{id} shows it.
CREATE TABLE orders.order_events (
    id       bigserial   PRIMARY KEY,
    order_id uuid        NOT NULL REFERENCES orders.orders (id),
    status   text        NOT NULL,
    reason   text,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON orders.order_events (order_id, id);

-- inventory: stock per SKU and what each order holds.
CREATE TABLE inventory.stock (
    sku       text   PRIMARY KEY,
    available bigint NOT NULL DEFAULT 0 CHECK (available >= 0),
    reserved  bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold      bigint NOT NULL DEFAULT 0 CHECK (sold >= 0)
);

CREATE TABLE inventory.reservations (
    order_id  uuid    NOT NULL,
    sku       text    NOT NULL REFERENCES inventory.stock (sku),
    quantity  bigint  NOT NULL CHECK (quantity > 0),
    committed boolean NOT NULL DEFAULT false,
    PRIMARY KEY (order_id, sku)
);

-- payments: one row per order; the gateway holds the charges themselves.
CREATE TABLE payments.payments (
    order_id     uuid        PRIMARY KEY,
    status       text        NOT NULL CHECK (status IN ('pending', 'charged', 'declined', 'refunded', 'voided')),
    charge_id    text,
    amount_cents bigint,
    currency     text,
    decline      text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);

-- notifications: one row per email sent; the key makes a second one impossible.
CREATE TABLE notifications.sent (
    order_id   uuid        NOT NULL,
    outcome    text        NOT NULL CHECK (outcome IN ('confirmed', 'cancelled')),
    email      text        NOT NULL,
    subject    text        NOT NULL,
    sent_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, outcome)
);
