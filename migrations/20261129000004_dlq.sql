-- dlq: what the poison-message tool archived and did. Purged messages are
-- kept whole (body, properties, headers) so `dlq restore` can put them back.
CREATE SCHEMA IF NOT EXISTS dlq;

CREATE TABLE dlq.archive (
    id          bigserial   PRIMARY KEY,
    queue       text        NOT NULL,
    message_id  text,
    properties  jsonb       NOT NULL,
    body        bytea       NOT NULL,
    purged_by   text        NOT NULL,
    purged_at   timestamptz NOT NULL DEFAULT now(),
    reason      text,
    restored_at timestamptz
);
CREATE INDEX ON dlq.archive (queue, purged_at);

CREATE TABLE dlq.audit (
    id         bigserial   PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    operator   text        NOT NULL,
    action     text        NOT NULL CHECK (action IN ('replay', 'purge', 'restore')),
    queue      text        NOT NULL,
    message_id text,
    detail     jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX ON dlq.audit (queue, at);
