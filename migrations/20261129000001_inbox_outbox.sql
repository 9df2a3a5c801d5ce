-- One schema per domain. Each holds the inbox (which messages a consumer has
-- already applied) and the outbox (messages committed with a state change,
-- waiting to be relayed to the broker) of the consumer that owns the schema.
CREATE SCHEMA IF NOT EXISTS orders;
CREATE SCHEMA IF NOT EXISTS inventory;
CREATE SCHEMA IF NOT EXISTS payments;
CREATE SCHEMA IF NOT EXISTS notifications;

DO $$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY ARRAY['orders', 'inventory', 'payments', 'notifications'] LOOP
        EXECUTE format($f$
            CREATE TABLE %I.inbox (
                consumer     text        NOT NULL,
                message_id   uuid        NOT NULL,
                processed_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (consumer, message_id)
            )$f$, s);
        EXECUTE format($f$
            CREATE TABLE %I.outbox (
                id             bigserial   PRIMARY KEY,
                message_id     uuid        NOT NULL,
                exchange       text        NOT NULL,
                routing_key    text        NOT NULL,
                kind           text        NOT NULL,
                correlation_id text,
                traceparent    text,
                expiration_ms  bigint,
                body           bytea       NOT NULL,
                created_at     timestamptz NOT NULL DEFAULT now()
            )$f$, s);
        EXECUTE format('CREATE INDEX ON %I.outbox (created_at)', s);
        EXECUTE format('CREATE INDEX ON %I.inbox (processed_at)', s);
    END LOOP;
END
$$;
