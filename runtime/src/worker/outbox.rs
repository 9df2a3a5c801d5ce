//! The transactional outbox: what a handler emits is written in its
//! transaction, relayed right after the commit, and sent by the sweeper
//! when the relay did not (a crash between commit and relay, or the broker
//! away at that moment). Relayed rows are deleted by the next handler
//! transaction, which saves each relay a commit of its own.

use super::Inner;
use crate::broker::PublishError;
use crate::envelope::Outgoing;
use crate::handler::{Context, Failure};
use sqlx::{Postgres, Transaction};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Outbox row ids and the messages they hold, committed and not yet relayed.
pub(super) type Committed = (Vec<i64>, Vec<Outgoing>);

/// What the relay is doing, so the sweeper never sends a row twice.
#[derive(Default)]
pub(super) struct Relays {
    /// Rows already relayed, to be deleted by the next handler transaction
    /// or the sweeper's next tick, well before the sweeper would consider
    /// them stale.
    relayed: Mutex<Vec<i64>>,
    /// Rows the relay is sending right now. The sweeper leaves them (and
    /// the relayed ones) alone: a relay slowed past `OUTBOX_SWEEP_AFTER_MS`
    /// (publisher reconnecting, busy broker) would otherwise have its rows
    /// sent twice.
    relaying: Mutex<HashSet<i64>>,
}

impl Relays {
    fn take_relayed(&self) -> Vec<i64> {
        self.relayed
            .lock()
            .map(|mut r| std::mem::take(&mut *r))
            .unwrap_or_default()
    }

    /// Queues relayed rows for deletion (again, when a deletion failed).
    fn mark_relayed(&self, ids: &[i64]) {
        if let Ok(mut r) = self.relayed.lock() {
            r.extend_from_slice(ids);
        }
    }

    /// Rows the sweeper must not send: being relayed, or relayed and not
    /// yet deleted.
    fn not_to_sweep(&self) -> Vec<i64> {
        let mut skip: Vec<i64> = self
            .relaying
            .lock()
            .map(|set| set.iter().copied().collect())
            .unwrap_or_default();
        if let Ok(relayed) = self.relayed.lock() {
            skip.extend(relayed.iter().copied());
        }
        skip
    }
}

/// Marks outbox rows as being relayed for as long as it lives, whichever way
/// the relay ends (a relay cancelled by shutdown included), so the sweeper
/// never skips a row forever.
struct Relaying<'a> {
    relays: &'a Relays,
    ids: &'a [i64],
}

impl<'a> Relaying<'a> {
    fn new(relays: &'a Relays, ids: &'a [i64]) -> Self {
        if let Ok(mut set) = relays.relaying.lock() {
            set.extend(ids.iter().copied());
        }
        Self { relays, ids }
    }
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.relays.relaying.lock() {
            for id in self.ids {
                set.remove(id);
            }
        }
    }
}

/// Commits a handler's transaction with what it emitted.
pub(super) async fn commit<H>(inner: &Inner<H>, ctx: Context) -> Result<Committed, Failure> {
    let (tx, outbox) = ctx.into_parts();
    let ids = commit_with_outbox(inner, tx, &outbox).await?;
    Ok((ids, outbox))
}

/// Writes `outbox`, deletes the rows relayed since the last commit (which
/// saves each relay a commit, and its WAL flush, of its own) and commits;
/// returns the outbox row ids.
pub(super) async fn commit_with_outbox<H>(
    inner: &Inner<H>,
    mut tx: Transaction<'static, Postgres>,
    outbox: &[Outgoing],
) -> Result<Vec<i64>, sqlx::Error> {
    let relayed = inner.relays.take_relayed();
    let result = async {
        let ids = inner.store.write_outbox(&mut tx, &relayed, outbox).await?;
        tx.commit().await?;
        Ok(ids)
    }
    .await;
    if result.is_err() {
        inner.relays.mark_relayed(&relayed);
    }
    result
}

/// Deletes relayed rows no handler transaction has taken along yet.
pub(super) async fn flush_relayed<H>(inner: &Inner<H>) -> Result<(), sqlx::Error> {
    let ids = inner.relays.take_relayed();
    if ids.is_empty() {
        return Ok(());
    }
    let deleted = async {
        let mut conn = inner.pool.acquire().await?;
        inner.store.delete_outbox(&mut conn, &ids).await
    };
    match deleted.await {
        Ok(()) => Ok(()),
        Err(e) => {
            inner.relays.mark_relayed(&ids);
            Err(e)
        }
    }
}

/// Sends what the handler emitted, right after commit. A failure here loses
/// nothing: the rows stay and the sweeper sends them. Rows confirmed are
/// marked relayed even when others of the batch failed, so the sweeper
/// does not send them a second time.
pub(super) async fn relay<H>(inner: &Inner<H>, (ids, messages): Committed) {
    if messages.is_empty() {
        return;
    }
    let _relaying = Relaying::new(&inner.relays, &ids);
    match inner.publisher.publish_each(&messages).await {
        Ok(outcomes) => {
            let (sent, failed) = split(&ids, &messages, &outcomes);
            inner.relays.mark_relayed(&sent);
            inner.metrics.relayed(sent.len());
            for (_, message, e) in failed {
                warn!(worker = inner.spec.name, message_id = %message.message_id, routing_key = message.routing_key, error = %e, "Outbox relay failed for this message; the sweeper will try it again");
            }
        }
        Err(e) => {
            warn!(worker = inner.spec.name, error = %e, "Outbox relay failed; the sweeper will send these rows")
        }
    }
}

/// The row ids confirmed, and the rows that failed: id, message and why.
fn split<'a>(
    ids: &[i64],
    messages: &'a [Outgoing],
    outcomes: &'a [Result<(), PublishError>],
) -> (Vec<i64>, Vec<Failed<'a>>) {
    let mut sent = Vec::with_capacity(ids.len());
    let mut failed = Vec::new();
    for ((id, message), outcome) in ids.iter().zip(messages).zip(outcomes) {
        match outcome {
            Ok(()) => sent.push(*id),
            Err(e) => failed.push((*id, message, e)),
        }
    }
    (sent, failed)
}

/// An outbox row the broker did not take: its id, its message and why.
type Failed<'a> = (i64, &'a Outgoing, &'a PublishError);

/// Relays outbox rows that the post-commit relay did not. Also prunes the
/// inbox: rows older than `INBOX_RETENTION_DAYS`, checked at the first tick
/// and then every ten minutes.
pub(super) async fn sweep_loop<H>(inner: Arc<Inner<H>>, token: CancellationToken) {
    let every = (inner.settings.outbox_sweep_after / 2).max(Duration::from_millis(100));
    let mut next_prune = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune = tokio::time::Instant::now() + Duration::from_secs(600);
            prune(&inner).await;
        }
        if let Err(e) = flush_relayed(&inner).await {
            warn!(worker = inner.spec.name, error = %e, "Relayed outbox rows not deleted yet");
        }
        match sweep_once(&inner, inner.settings.outbox_sweep_after).await {
            Ok(0) => {}
            Ok(n) => info!(
                worker = inner.spec.name,
                messages = n,
                "Outbox sweeper relayed messages"
            ),
            Err(e) => warn!(worker = inner.spec.name, error = %e, "Outbox sweep failed"),
        }
    }
}

/// Deletes inbox rows and handler start counts past their retention.
async fn prune<H>(inner: &Inner<H>) {
    let retention = inner.settings.inbox_retention;
    match inner.store.prune_inbox(&inner.pool, retention).await {
        Ok(0) => {}
        Ok(n) => info!(worker = inner.spec.name, rows = n, "Inbox pruned"),
        Err(e) => warn!(worker = inner.spec.name, error = %e, "Inbox prune failed"),
    }
    match inner.store.prune_starts(&inner.pool, retention).await {
        Ok(0) => {}
        Ok(n) => info!(
            worker = inner.spec.name,
            rows = n,
            "Handler start counts pruned"
        ),
        Err(e) => {
            warn!(worker = inner.spec.name, error = %e, "Handler start count prune failed")
        }
    }
}

/// Relays every outbox row older than `age`, in batches; returns how many.
/// Each row is settled on its own: one the broker cannot route (a type no
/// queue binds yet, during a rolling deploy) is kept, counted and logged
/// with its message id, and tried again at the next sweep; the rows beside
/// it go out once and are deleted.
pub(super) async fn sweep_once<H>(inner: &Inner<H>, age: Duration) -> anyhow::Result<usize> {
    let mut total = 0;
    let mut stuck = Vec::new();
    loop {
        let mut tx = inner.pool.begin().await?;
        let mut skip = inner.relays.not_to_sweep();
        skip.extend_from_slice(&stuck);
        let rows = inner
            .store
            .lock_stale_outbox(&mut tx, age, 500, &skip)
            .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let (ids, messages): (Vec<i64>, Vec<_>) = rows.into_iter().unzip();
        let outcomes = inner.publisher.publish_each(&messages).await?;
        let (sent, failed) = split(&ids, &messages, &outcomes);
        for (_, message, e) in &failed {
            warn!(worker = inner.spec.name, message_id = %message.message_id, routing_key = message.routing_key, error = %e, "Outbox row not relayed; it is kept and tried again at the next sweep");
        }
        inner.metrics.unroutable(failed.len());
        stuck.extend(failed.iter().map(|(id, _, _)| *id));
        inner.store.delete_outbox(&mut tx, &sent).await?;
        tx.commit().await?;
        inner.metrics.swept(sent.len());
        total += sent.len();
    }
}
