-- How often a redelivered message was handed to its handler without an
-- outcome. A message that keeps killing its worker is dead-lettered by the
-- runtime once this passes its limit. Only redeliveries write here, so the
-- normal path pays nothing.
DO $$
DECLARE
    s text;
BEGIN
    FOREACH s IN ARRAY ARRAY['orders', 'inventory', 'payments', 'notifications'] LOOP
        EXECUTE format($f$
            CREATE TABLE %I.handler_starts (
                consumer        text        NOT NULL,
                message_id      uuid        NOT NULL,
                starts          int         NOT NULL,
                last_started_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (consumer, message_id)
            )$f$, s);
    END LOOP;
END
$$;
