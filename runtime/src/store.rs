//! The inbox and outbox tables of one consumer, in its domain's schema.
//!
//! Invariant: the inbox row, the handler's state change and the outbox rows
//! are written in one transaction, so a message's effect and the messages it
//! causes are committed together or not at all, and at most once.

use crate::envelope::Outgoing;
use sqlx::{AssertSqlSafe, PgConnection, PgPool};
use std::time::Duration;
use uuid::Uuid;

/// SQL for one schema, built once from a schema name the code chose (never
/// from input), so the per-message path formats no strings.
#[derive(Debug)]
pub struct Store {
    consumer: String,
    insert_inbox: String,
    insert_inbox_many: String,
    forget_inbox: String,
    write_outbox: String,
    delete_outbox: String,
    select_stale: String,
    count_start: String,
    forget_starts: String,
    prune_inbox: String,
    prune_starts: String,
}

const OUTBOX_COLUMNS: &str =
    "id, message_id, exchange, routing_key, kind, correlation_id, traceparent, expiration_ms, body";

impl Store {
    /// `schema` must be one of the domain schemas created by the migrations.
    pub fn new(schema: &'static str, consumer: &str) -> Self {
        debug_assert!(schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
        Self {
            prune_inbox: format!(
                "DELETE FROM {schema}.inbox WHERE ctid = ANY (ARRAY(SELECT ctid FROM {schema}.inbox \
                 WHERE consumer = $1 AND processed_at < now() - make_interval(secs => $2) LIMIT 10000))"
            ),
            prune_starts: format!(
                "DELETE FROM {schema}.handler_starts WHERE consumer = $1 \
                 AND last_started_at < now() - make_interval(secs => $2)"
            ),
            count_start: format!(
                "INSERT INTO {schema}.handler_starts (consumer, message_id, starts) VALUES ($1, $2, 1) \
                 ON CONFLICT (consumer, message_id) DO UPDATE SET starts = {schema}.handler_starts.starts + 1, last_started_at = now() \
                 RETURNING starts"
            ),
            forget_starts: format!(
                "DELETE FROM {schema}.handler_starts WHERE consumer = $1 AND message_id = $2"
            ),
            consumer: consumer.to_owned(),
            insert_inbox: format!(
                "INSERT INTO {schema}.inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
            ),
            // The relayed rows go in a data-modifying CTE, which runs
            // whether or not the insert reads it: one round trip for both.
            write_outbox: format!(
                "WITH relayed AS (DELETE FROM {schema}.outbox WHERE id = ANY($9)) \
                 INSERT INTO {schema}.outbox (message_id, exchange, routing_key, kind, correlation_id, traceparent, expiration_ms, body) \
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::bytea[]) \
                 RETURNING id"
            ),
            insert_inbox_many: format!(
                "INSERT INTO {schema}.inbox (consumer, message_id) SELECT $1, UNNEST($2::uuid[]) \
                 ON CONFLICT DO NOTHING RETURNING message_id"
            ),
            forget_inbox: format!(
                "DELETE FROM {schema}.inbox WHERE consumer = $1 AND message_id = ANY($2)"
            ),
            delete_outbox: format!("DELETE FROM {schema}.outbox WHERE id = ANY($1)"),
            select_stale: format!(
                "SELECT {OUTBOX_COLUMNS} FROM {schema}.outbox WHERE created_at < now() - make_interval(secs => $1) \
                 AND id <> ALL($3) ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED"
            ),
        }
    }

    /// Records that this consumer applies `message_id`. False means it was
    /// applied before: a duplicate, to be acked without effect.
    pub async fn record_inbox(
        &self,
        conn: &mut PgConnection,
        message_id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(AssertSqlSafe(self.insert_inbox.as_str()))
            .bind(&self.consumer)
            .bind(message_id)
            .execute(conn)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records a batch of messages in one statement; returns the ids that
    /// are new (each once, even when a batch holds the same id twice). The
    /// others were applied before: duplicates.
    pub async fn record_inbox_many(
        &self,
        conn: &mut PgConnection,
        message_ids: &[Uuid],
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        sqlx::query_scalar(AssertSqlSafe(self.insert_inbox_many.as_str()))
            .bind(&self.consumer)
            .bind(message_ids)
            .fetch_all(conn)
            .await
    }

    /// Takes back inbox rows written in this transaction for messages whose
    /// handler failed, so that their retry is not mistaken for a duplicate.
    pub async fn forget_inbox(
        &self,
        conn: &mut PgConnection,
        message_ids: &[Uuid],
    ) -> Result<(), sqlx::Error> {
        if message_ids.is_empty() {
            return Ok(());
        }
        sqlx::query(AssertSqlSafe(self.forget_inbox.as_str()))
            .bind(&self.consumer)
            .bind(message_ids)
            .execute(conn)
            .await
            .map(drop)
    }

    /// Counts one more start of a redelivered message (committed at once, so
    /// it survives the crash it is meant to detect); returns the count.
    pub async fn count_start(&self, pool: &PgPool, message_id: Uuid) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar(AssertSqlSafe(self.count_start.as_str()))
            .bind(&self.consumer)
            .bind(message_id)
            .fetch_one(pool)
            .await
    }

    /// Drops the start count of a message that reached an outcome.
    pub async fn forget_starts(&self, pool: &PgPool, message_id: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.forget_starts.as_str()))
            .bind(&self.consumer)
            .bind(message_id)
            .execute(pool)
            .await
            .map(drop)
    }

    /// Deletes inbox rows older than `retention`, in batches; returns how
    /// many. A message redelivered or replayed after that is applied again,
    /// so the retention must outlast any redelivery and any dead message
    /// someone may still replay.
    pub async fn prune_inbox(
        &self,
        pool: &PgPool,
        retention: Duration,
    ) -> Result<u64, sqlx::Error> {
        let mut total = 0;
        loop {
            let done = sqlx::query(AssertSqlSafe(self.prune_inbox.as_str()))
                .bind(&self.consumer)
                .bind(retention.as_secs_f64())
                .execute(pool)
                .await?;
            total += done.rows_affected();
            if done.rows_affected() < 10_000 {
                return Ok(total);
            }
        }
    }

    /// Deletes start counts of messages not seen for `retention`: their
    /// worker died with them and they never came back (purged, or their
    /// queue was deleted). A count still in use is refreshed at each start.
    pub async fn prune_starts(
        &self,
        pool: &PgPool,
        retention: Duration,
    ) -> Result<u64, sqlx::Error> {
        sqlx::query(AssertSqlSafe(self.prune_starts.as_str()))
            .bind(&self.consumer)
            .bind(retention.as_secs_f64())
            .execute(pool)
            .await
            .map(|done| done.rows_affected())
    }

    /// Deletes the `relayed` rows and writes `messages` to the outbox, in
    /// one statement; returns the new rows' ids.
    pub async fn write_outbox(
        &self,
        conn: &mut PgConnection,
        relayed: &[i64],
        messages: &[Outgoing],
    ) -> Result<Vec<i64>, sqlx::Error> {
        if messages.is_empty() {
            self.delete_outbox(conn, relayed).await?;
            return Ok(Vec::new());
        }
        let ms = |m: &Outgoing| {
            m.expiration
                .map(|e| i64::try_from(e.as_millis()).unwrap_or(i64::MAX))
        };
        sqlx::query_scalar(AssertSqlSafe(self.write_outbox.as_str()))
            .bind(messages.iter().map(|m| m.message_id).collect::<Vec<_>>())
            .bind(
                messages
                    .iter()
                    .map(|m| m.exchange.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| m.routing_key.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(messages.iter().map(|m| m.kind.clone()).collect::<Vec<_>>())
            .bind(
                messages
                    .iter()
                    .map(|m| m.correlation_id.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                messages
                    .iter()
                    .map(|m| m.traceparent.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(messages.iter().map(ms).collect::<Vec<_>>())
            .bind(messages.iter().map(|m| m.body.clone()).collect::<Vec<_>>())
            .bind(relayed)
            .fetch_all(conn)
            .await
    }

    /// Removes relayed rows.
    pub async fn delete_outbox(
        &self,
        conn: &mut PgConnection,
        ids: &[i64],
    ) -> Result<(), sqlx::Error> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(AssertSqlSafe(self.delete_outbox.as_str()))
            .bind(ids)
            .execute(conn)
            .await
            .map(drop)
    }

    /// Rows older than `age` that no one is relaying right now, locked until
    /// `conn`'s transaction ends so two sweepers never send the same row.
    /// `skip` names rows this process is relaying or has relayed already.
    pub async fn lock_stale_outbox(
        &self,
        conn: &mut PgConnection,
        age: Duration,
        limit: i64,
        skip: &[i64],
    ) -> Result<Vec<(i64, Outgoing)>, sqlx::Error> {
        let rows: Vec<OutboxRow> = sqlx::query_as(AssertSqlSafe(self.select_stale.as_str()))
            .bind(age.as_secs_f64())
            .bind(limit)
            .bind(skip)
            .fetch_all(&mut *conn)
            .await?;
        Ok(rows.into_iter().map(OutboxRow::into_message).collect())
    }
}

#[derive(sqlx::FromRow)]
struct OutboxRow {
    id: i64,
    message_id: Uuid,
    exchange: String,
    routing_key: String,
    kind: String,
    correlation_id: Option<String>,
    traceparent: Option<String>,
    expiration_ms: Option<i64>,
    body: Vec<u8>,
}

impl OutboxRow {
    fn into_message(self) -> (i64, Outgoing) {
        (
            self.id,
            Outgoing {
                message_id: self.message_id,
                exchange: self.exchange,
                routing_key: self.routing_key,
                kind: self.kind,
                correlation_id: self.correlation_id,
                traceparent: self.traceparent,
                expiration: self
                    .expiration_ms
                    .and_then(|ms| u64::try_from(ms).ok())
                    .map(Duration::from_millis),
                body: self.body,
            },
        )
    }
}
