//! The handler API: what a domain worker implements.
//!
//! A handler sees a typed message and a [`Context`] holding the open database
//! transaction, and answers done (`Ok`) or a classified [`Failure`]. It never
//! acks, retries or dead-letters: the runtime turns the outcome into that.

use crate::envelope::{Envelope, Inbound, Outgoing};
use futures::StreamExt;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::future::Future;
use std::time::Duration;

/// An outside system a handler depends on: the database, a payment
/// provider, a mail server. Named in logs, in `/metrics` and `/readyz`, and
/// each has its own circuit breaker (`breaker.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Dependency(&'static str);

impl Dependency {
    /// The worker's PostgreSQL database.
    pub const DATABASE: Self = Self("database");

    /// A dependency called `name` (lowercase, such as `payment-gateway`).
    pub const fn named(name: &'static str) -> Self {
        Self(name)
    }

    pub const fn name(self) -> &'static str {
        self.0
    }
}

impl std::fmt::Display for Dependency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Why a handler could not finish a message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Failure {
    /// Worth trying again later: a timeout, a lost connection, a
    /// serialization conflict. The message goes to the next retry tier.
    #[error("{0}")]
    Transient(String),
    /// Transient because `dependency` did not answer or answered that it
    /// cannot serve (a refused connection, a 5xx): retried like
    /// [`Failure::Transient`], and counted by the dependency's circuit
    /// breaker, which stops the worker taking messages while the
    /// dependency is down, so that an outage longer than the retry tiers
    /// does not dead-letter every message in flight.
    #[error("{cause}")]
    Unavailable {
        dependency: Dependency,
        cause: String,
    },
    /// No retry can help: a business rule or validation. The message goes
    /// to the dead queue at once.
    #[error("{0}")]
    Permanent(String),
}

impl Failure {
    pub fn transient(cause: impl std::fmt::Display) -> Self {
        Self::Transient(cause.to_string())
    }

    pub fn unavailable(dependency: Dependency, cause: impl std::fmt::Display) -> Self {
        Self::Unavailable {
            dependency,
            cause: cause.to_string(),
        }
    }

    pub fn permanent(cause: impl std::fmt::Display) -> Self {
        Self::Permanent(cause.to_string())
    }

    /// Whether a retry may help (transient or unavailable).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Permanent(_))
    }
}

/// Database errors are classified by SQLSTATE class, never by message text:
/// a database that cannot be reached or cannot serve is unavailable,
/// conflicts and timeouts are transient; the rest is a fault in the data or
/// the code that a retry would repeat.
impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        if is_unavailable(&e) {
            Failure::unavailable(Dependency::DATABASE, format!("database: {e}"))
        } else if is_transient(&e) {
            Failure::Transient(format!("database: {e}"))
        } else {
            Failure::Permanent(format!("database: {e}"))
        }
    }
}

/// Worth retrying: the database is unavailable, or the statement lost a
/// conflict or ran out of time.
pub fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            // 40 rollback (serialization, deadlock), 55P03 lock not
            // available, 57014 statement timeout.
            code.starts_with("40") || code == "55P03" || code == "57014" || is_unavailable(e)
        }
        sqlx::Error::Protocol(_) => true,
        other => is_unavailable(other),
    }
}

/// The database cannot be reached or cannot serve: connection loss, its
/// resources exhausted (53), an operator's shutdown (57P), a system error (58).
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.to_string()).unwrap_or_default();
            ["08", "53", "57P", "58"]
                .iter()
                .any(|class| code.starts_with(class))
        }
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        _ => false,
    }
}

/// What the handler may touch while it handles one message.
pub struct Context {
    envelope: Envelope,
    tx: Transaction<'static, Postgres>,
    outbox: Vec<Outgoing>,
}

impl Context {
    pub(crate) fn new(envelope: Envelope, tx: Transaction<'static, Postgres>) -> Self {
        Self {
            envelope,
            tx,
            outbox: Vec::new(),
        }
    }

    /// The message's envelope (id, type, correlation id, attempt).
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The transaction the inbox row was written in; commit is the runtime's.
    pub fn db(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Sends `message` once the transaction has committed, continuing this
    /// message's trace and correlation. Written to the outbox in the same
    /// transaction, so it is sent if and only if the effect is committed.
    pub fn emit(&mut self, message: Outgoing) {
        let message = message.caused_by(&self.envelope);
        self.outbox.push(message);
    }

    /// Runs `step` under a savepoint of the transaction. If it fails, what
    /// it wrote and emitted is taken back and its failure returned, and
    /// the transaction goes on: one failing item of a deadline scan need
    /// not take back the others.
    pub async fn isolated<T>(
        &mut self,
        step: impl AsyncFnOnce(&mut Context) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        sqlx::raw_sql("SAVEPOINT isolated")
            .execute(&mut *self.tx)
            .await?;
        let emitted = self.outbox.len();
        let result = step(self).await;
        let end = if result.is_ok() {
            "RELEASE SAVEPOINT isolated"
        } else {
            self.outbox.truncate(emitted);
            "ROLLBACK TO SAVEPOINT isolated; RELEASE SAVEPOINT isolated"
        };
        let ended = sqlx::raw_sql(end).execute(&mut *self.tx).await;
        match (result, ended) {
            (Ok(value), Ok(_)) => Ok(value),
            (Ok(_), Err(e)) => Err(e.into()),
            // Had the rollback failed too, the transaction is broken and
            // the caller's next statement fails: the step's failure is the
            // one to tell.
            (Err(failure), _) => Err(failure),
        }
    }

    pub(crate) fn into_parts(self) -> (Transaction<'static, Postgres>, Vec<Outgoing>) {
        (self.tx, self.outbox)
    }
}

/// A fresh message of a shared transaction, with its envelope, as
/// [`Handler::handle_together`] sees it.
pub struct Fresh<M> {
    pub envelope: Envelope,
    pub message: M,
}

impl<M> Fresh<M> {
    /// Splits a chunk's messages into those that are the only one with
    /// their key (an order id) and the rest, both in chunk order; messages
    /// without a key go to the rest. What [`Handler::handle_together`] may
    /// take is usually among the first.
    pub fn partition_unique<K: Eq + std::hash::Hash>(
        messages: Vec<Self>,
        key: impl Fn(&M) -> Option<K>,
    ) -> (Vec<Self>, Vec<Self>) {
        let mut seen: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
        for fresh in &messages {
            if let Some(k) = key(&fresh.message) {
                *seen.entry(k).or_default() += 1;
            }
        }
        messages
            .into_iter()
            .partition(|fresh| key(&fresh.message).is_some_and(|k| seen.get(&k) == Some(&1)))
    }
}

/// What a handler may touch while it applies several messages together:
/// the shared transaction, and an outbox where each emitted message names
/// the message that caused it.
pub struct Together {
    tx: Transaction<'static, Postgres>,
    outbox: Vec<Outgoing>,
}

impl Together {
    pub(crate) fn new(tx: Transaction<'static, Postgres>) -> Self {
        Self {
            tx,
            outbox: Vec::new(),
        }
    }

    /// The shared transaction; commit is the runtime's.
    pub fn db(&mut self) -> &mut PgConnection {
        &mut self.tx
    }

    /// Sends `message` once the transaction has committed, continuing the
    /// trace and correlation of `cause` (see [`Context::emit`]).
    pub fn emit(&mut self, cause: &Envelope, message: Outgoing) {
        self.outbox.push(message.caused_by(cause));
    }

    pub(crate) fn into_parts(self) -> (Transaction<'static, Postgres>, Vec<Outgoing>) {
        (self.tx, self.outbox)
    }
}

/// How many deliveries of one chunk prepare at once by default
/// ([`Handler::prepare_many`]). Each waiting prepare is a future of some
/// kilobytes (a database read and an HTTP call inside); a whole chunk of
/// them at once took the payment worker's peak memory from 28.4 to
/// 30.7 MiB at `BATCH_SIZE` 64 (`docs/BENCHMARKS.md`), while its gateway
/// calls are bounded anyway (`PAYMENT_GATEWAY_MAX_IN_FLIGHT`).
pub const PREPARES_AT_ONCE: usize = 16;

/// A domain handler for the messages of one work queue.
pub trait Handler: Send + Sync + 'static {
    /// The payloads this queue carries, decoded by `type`.
    type Message: Inbound;

    /// Whether handling acts outside the transaction (sends an email, calls
    /// a payment gateway). If it does, each message of a shared transaction
    /// runs under its own savepoint, so that a failing neighbour never
    /// makes it act twice. If it acts only on the database, a failure rolls
    /// the shared transaction back and its messages run again alone.
    const OUTSIDE_EFFECTS: bool = true;

    /// Transactions in flight at once unless `CONCURRENCY` says otherwise.
    /// Two, by default: more only split the deliveries waiting at a steady
    /// rate into smaller transactions contending for the same cores
    /// (`docs/BENCHMARKS.md`: at 400 orders/s, p99 and PostgreSQL CPU both
    /// lower). A handler that waits on something slow inside its
    /// transaction, message by message, wants more, or to do that work
    /// side by side in [`Handler::handle_together`] (the notification
    /// worker's emails); slow work that can run before the transaction
    /// belongs in [`Handler::prepare`].
    const DEFAULT_CONCURRENCY: usize = 2;

    /// Work a message needs outside the database before its transaction:
    /// a slow call whose answer the transaction then records (a payment
    /// gateway's). The runtime runs it, on no transaction, for the
    /// deliveries that wait together side by side (16 at once), so slow
    /// calls overlap instead of queueing one behind the other in a shared
    /// transaction, and none holds a database connection while it waits. `db` is for unlocked
    /// reads only: what must hold under a row lock, `handle` checks again.
    /// It runs again whenever the message does (a retry, a redelivery, a
    /// duplicate the inbox will drop), so it must be idempotent. A failure
    /// is routed like `handle`'s. Returns the message to handle, carrying
    /// what it learnt; the default returns it unchanged.
    fn prepare(
        &self,
        db: &PgPool,
        message: Self::Message,
    ) -> impl Future<Output = Result<Self::Message, Failure>> + Send {
        let _ = db;
        async { Ok(message) }
    }

    /// [`Handler::prepare`] for the fresh deliveries of a chunk that wait
    /// together, before their shared transaction: one result per message,
    /// in their order. The default prepares each, [`PREPARES_AT_ONCE`]
    /// side by side. A handler whose `prepare` reads the database
    /// overrides it to read once for the chunk (one statement instead of
    /// one per message), then does the outside work side by side. If it
    /// panics, the runtime handles the chunk's messages alone, each
    /// prepared by `prepare`.
    fn prepare_many(
        &self,
        db: &PgPool,
        messages: Vec<Self::Message>,
    ) -> impl Future<Output = Vec<Result<Self::Message, Failure>>> + Send {
        futures::stream::iter(messages)
            .map(move |message| self.prepare(db, message))
            .buffered(PREPARES_AT_ONCE)
            .collect()
    }

    fn handle(
        &self,
        ctx: &mut Context,
        message: Self::Message,
    ) -> impl Future<Output = Result<(), Failure>> + Send;

    /// Applies several fresh messages of one shared transaction together,
    /// with set-based statements (one statement for all the orders of a
    /// chunk that move to the same state, instead of one each: per message,
    /// that is most of the database's work). Takes the messages it can
    /// apply that way and returns the others (in any order), which the
    /// runtime then hands to [`Handler::handle`] one by one in chunk order
    /// (`lock_key` order), in the same transaction, after these. So it must take only messages whose outcome does not depend
    /// on the others of the chunk (the only message of its order, say).
    /// A failure rolls the whole transaction back, and every message of it
    /// runs again alone, so outside work belongs in [`Handler::prepare`].
    /// Work that must happen inside the transaction (an email, whose
    /// `sent` row is its only dedupe) may happen here in one shape only:
    /// claim the rows of all in one statement, act, then give back the
    /// claims of those whose act failed and return them (carrying their
    /// failure for `handle` to report, say); nothing that can fail but
    /// that last statement comes after an act. The default takes none.
    fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<Self::Message>>,
    ) -> impl Future<Output = Result<Vec<Fresh<Self::Message>>, Failure>> + Send {
        let _ = ctx;
        async { Ok(messages) }
    }

    /// Names the contended rows this message will lock first (a SKU, an
    /// order id). Messages handled in one transaction run in key order, so
    /// concurrent transactions take shared rows in the same order and wait
    /// for each other instead of deadlocking. `None` (the default) runs
    /// first, in arrival order.
    fn lock_key(&self, message: &Self::Message) -> Option<String> {
        let _ = message;
        None
    }

    /// How often the runtime calls [`Handler::expire_deadlines`]; `None`
    /// (the default): this handler keeps no deadlines.
    fn deadline_scan_every(&self) -> Option<Duration> {
        None
    }

    /// Acts on the deadlines that have passed (an order whose payment never
    /// answered), kept as rows in the handler's own schema. Runs in a
    /// transaction of its own, like a message: what it emits is relayed
    /// after commit, and a failure takes back everything it did. Returns
    /// how many deadlines it acted on; while that is more than zero the
    /// runtime calls again at once, so a backlog is worked off in chunks.
    /// Replicas scan side by side: take the rows with `FOR UPDATE SKIP
    /// LOCKED`, so each deadline is acted on by one of them. Act on each
    /// deadline under [`Context::isolated`], so that one that fails for
    /// good does not take back the others, scan after scan.
    fn expire_deadlines(
        &self,
        ctx: &mut Context,
    ) -> impl Future<Output = Result<usize, Failure>> + Send {
        let _ = ctx;
        async { Ok(0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(keys: &[Option<&'static str>]) -> Vec<Fresh<Option<&'static str>>> {
        keys.iter()
            .map(|&key| Fresh {
                envelope: Envelope::started_here("test"),
                message: key,
            })
            .collect()
    }

    fn keys(messages: &[Fresh<Option<&'static str>>]) -> Vec<Option<&'static str>> {
        messages.iter().map(|fresh| fresh.message).collect()
    }

    #[test]
    fn only_the_single_message_of_a_key_is_unique_and_both_sides_keep_chunk_order() {
        let messages = chunk(&[Some("a"), Some("b"), None, Some("a"), Some("c")]);
        let (unique, rest) = Fresh::partition_unique(messages, |m| *m);
        assert_eq!(keys(&unique), [Some("b"), Some("c")]);
        assert_eq!(keys(&rest), [Some("a"), None, Some("a")]);
    }

    #[test]
    fn an_empty_chunk_splits_into_nothing() {
        let (unique, rest) = Fresh::partition_unique(chunk(&[]), |m| *m);
        assert!(unique.is_empty() && rest.is_empty());
    }

    #[derive(serde::Serialize)]
    struct Step {
        id: &'static str,
    }
    impl crate::envelope::Message for Step {
        const KIND: &'static str = "test.step";
        const EXCHANGE: &'static str = "events";
    }

    /// A step that writes, emits and then fails leaves neither behind; the
    /// transaction goes on and keeps what the next step does.
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn an_isolated_step_that_fails_takes_back_its_writes_and_emits_only() {
        let env = testkit::TestEnv::new().await;
        let pool = env.pool().await;
        sqlx::raw_sql("CREATE TABLE steps (id text PRIMARY KEY)")
            .execute(&pool)
            .await
            .unwrap();
        let tx = pool.begin().await.unwrap();
        let mut ctx = Context::new(Envelope::started_here("test"), tx);
        let write = |id: &'static str| {
            async move |ctx: &mut Context| {
                sqlx::query("INSERT INTO steps (id) VALUES ($1)")
                    .bind(id)
                    .execute(ctx.db())
                    .await?;
                ctx.emit(Outgoing::of(&Step { id }));
                Ok::<_, Failure>(())
            }
        };
        ctx.isolated(write("kept")).await.unwrap();
        let failed = ctx
            .isolated(async |ctx| {
                write("taken back")(ctx).await?;
                Err::<(), _>(Failure::permanent("refused"))
            })
            .await;
        assert!(matches!(failed, Err(Failure::Permanent(_))));
        ctx.isolated(write("after")).await.unwrap();
        let (tx, outbox) = ctx.into_parts();
        tx.commit().await.unwrap();
        assert_eq!(outbox.len(), 2);
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM steps ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(ids, ["after", "kept"]);
        pool.close().await;
        env.cleanup().await;
    }
}
