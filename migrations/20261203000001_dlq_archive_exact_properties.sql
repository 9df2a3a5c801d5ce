-- An archived message's properties exactly as AMQP encodes them, so that
-- `dlq restore` gives back the message that was purged: every property
-- (priority, reply_to, app_id, content_encoding, ...) and every header with
-- its type (timestamps in x-death, byte strings that are not UTF-8). The
-- jsonb column stays for reading and querying; rows archived before this
-- migration have no encoding and are restored from the jsonb, as before.
ALTER TABLE dlq.archive ADD COLUMN properties_encoded bytea;
