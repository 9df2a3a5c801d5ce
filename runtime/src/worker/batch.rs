//! Several fresh messages handled in one transaction: one inbox statement,
//! what the handler applies together, one savepoint per message left, one
//! outbox statement, one commit (one WAL flush) for all, then their acks
//! and one confirmed relay for everything they emitted.
//!
//! A [`Batch`] owns the chunk: each delivery with its envelope, its message
//! until a handler takes it, and its [`Verdict`]; it settles every delivery
//! in one place ([`Batch::settle`]) or hands them all back to run alone
//! ([`Batch::into_again`]) when nothing of the transaction stands.

use super::decode::Decoded;
use super::failure::dead_letter;
use super::guard::{begin, guarded, run_handler};
use super::{Inner, outbox};
use crate::envelope::{Envelope, Outgoing};
use crate::handler::{Context, Failure, Fresh, Handler, Together};
use crate::metrics::Outcome;
use crate::routing::DeadKind;
use lapin::message::Delivery;
use sqlx::{AssertSqlSafe, Postgres, Transaction};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// A batch bounds its lock waits (set in the same round trip as its
/// `BEGIN`), so a deadlock the key order could not prevent (a message
/// locking rows its key does not name) costs the batch a short wait rather
/// than PostgreSQL's deadlock timeout, and the message that waited runs
/// again alone.
pub(super) const BATCH_LOCK_TIMEOUT: Duration = Duration::from_millis(200);
/// The savepoint each message of a batch runs under, so that a failing
/// handler takes back only its own statements.
const FIRST_SAVEPOINT: &str = "SAVEPOINT message";
const NEXT_SAVEPOINT: &str = "RELEASE SAVEPOINT message; SAVEPOINT message";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT message";

type Tx = Transaction<'static, Postgres>;

/// Handles fresh messages, in the order given, in one transaction. Returns
/// the deliveries that must be handled again alone: those whose handler
/// failed transiently (the batch itself may have caused it, holding locks
/// longer), or all of them when the transaction broke.
pub(super) async fn process_batch<H: Handler>(
    inner: &Inner<H>,
    ready: Vec<Decoded<H::Message>>,
    token: &CancellationToken,
) -> Vec<Delivery> {
    let started = Instant::now();
    let mut batch = Batch::new(ready);
    let Some(tx) = begin(inner, token, &inner.begin.batch).await else {
        // Shutting down while the database is away: leave them to the broker.
        return Vec::new();
    };
    let committed = match batch.execute(inner, tx).await {
        Ok(committed) => committed,
        Err(why) => {
            debug!(queue = inner.spec.domain.queue(), error = %why, "Batch rolled back; handling its messages alone");
            return batch.into_again();
        }
    };
    let committed_at = Instant::now();
    inner.metrics.transaction(committed_at - started);
    let again = batch.settle(inner, committed).await;
    debug!(queue = inner.spec.domain.queue(), handled_and_committed = ?(committed_at - started), acked_and_relayed = ?committed_at.elapsed(), "Batch done");
    again
}

/// One delivery of a batch.
struct Entry<M> {
    delivery: Delivery,
    envelope: Envelope,
    /// Until a handler takes it.
    message: Option<M>,
    verdict: Verdict,
}

/// What became of a delivery in the batch's transaction.
enum Verdict {
    /// Not handled yet.
    Pending,
    /// Its message id was in the inbox already.
    Duplicate,
    /// Its effect is in the transaction.
    Applied,
    /// Its handler failed; its statements were taken back.
    Failed(Failure),
}

/// The chunk a shared transaction works on, and what it emitted.
struct Batch<M> {
    entries: Vec<Entry<M>>,
    outbox: Vec<Outgoing>,
}

impl<M> Batch<M> {
    fn new(ready: Vec<Decoded<M>>) -> Self {
        let entries = ready
            .into_iter()
            .map(|d| Entry {
                delivery: d.delivery,
                envelope: d.envelope,
                message: Some(d.message),
                verdict: Verdict::Pending,
            })
            .collect();
        Self {
            entries,
            outbox: Vec::new(),
        }
    }

    fn pending(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.verdict, Verdict::Pending))
            .count()
    }

    /// Every delivery, in chunk order, to run again alone: nothing of the
    /// transaction stands.
    fn into_again(self) -> Vec<Delivery> {
        self.entries.into_iter().map(|e| e.delivery).collect()
    }
}

impl<M> Batch<M> {
    /// Runs the whole transaction; returns the committed outbox, or why
    /// nothing of it stands (the transaction is rolled back).
    async fn execute<H>(&mut self, inner: &Inner<H>, tx: Tx) -> Result<outbox::Committed, Failure>
    where
        H: Handler<Message = M>,
    {
        let tx = self.open(inner, tx).await?;
        let tx = self.apply_together(inner, tx).await?;
        let mut tx = self.handle_each(inner, tx).await?;
        let undo: Vec<_> = self
            .entries
            .iter()
            .filter(|e| matches!(e.verdict, Verdict::Failed(_)))
            .map(|e| e.envelope.message_id)
            .collect();
        inner.store.forget_inbox(&mut tx, &undo).await?;
        let ids = outbox::commit_with_outbox(inner, tx, &self.outbox).await?;
        Ok((ids, std::mem::take(&mut self.outbox)))
    }

    /// Records every message id in the inbox with one statement; those
    /// already there are duplicates, applied before.
    async fn open<H>(&mut self, inner: &Inner<H>, mut tx: Tx) -> Result<Tx, Failure> {
        let ids: Vec<_> = self.entries.iter().map(|e| e.envelope.message_id).collect();
        let mut new: HashSet<_> = inner
            .store
            .record_inbox_many(&mut tx, &ids)
            .await?
            .into_iter()
            .collect();
        for entry in &mut self.entries {
            // Removed, so that a second copy of one id in the chunk is a duplicate.
            if !new.remove(&entry.envelope.message_id) {
                entry.verdict = Verdict::Duplicate;
                entry.message = None;
            }
        }
        Ok(tx)
    }

    /// What the handler applies together, set-based, comes first, before
    /// any savepoint: when it fails the whole transaction is rolled back
    /// and its messages run again alone. It acts only on the database, or
    /// outside with its claims given back for what failed
    /// (`Handler::handle_together`), so nothing it did outside is repeated
    /// unless the transaction is lost after it, as with `handle`. What it
    /// leaves keeps its place in chunk order (`lock_key` order), whatever
    /// order the handler returned it in.
    async fn apply_together<H>(&mut self, inner: &Inner<H>, tx: Tx) -> Result<Tx, Failure>
    where
        H: Handler<Message = M>,
    {
        if self.pending() < 2 {
            return Ok(tx);
        }
        // Fresh ids are distinct: the inbox statement returned each once.
        let mut slot_of = HashMap::new();
        let mut fresh = Vec::new();
        for (i, entry) in self.entries.iter_mut().enumerate() {
            if let Some(message) = entry.message.take() {
                slot_of.insert(entry.envelope.message_id, i);
                fresh.push(Fresh {
                    envelope: entry.envelope.clone(),
                    message,
                });
            }
        }
        let mut ctx = Together::new(tx);
        let left = guarded(
            inner,
            "handler panicked applying messages together",
            "applying messages together",
            inner.handler.handle_together(&mut ctx, fresh),
        )
        .await?;
        let (tx, emitted) = ctx.into_parts();
        for Fresh { envelope, message } in left {
            // Each id once: a message cannot be left twice.
            if let Some(&i) = slot_of.get(&envelope.message_id) {
                self.entries[i].message.get_or_insert(message);
            }
        }
        for entry in &mut self.entries {
            if matches!(entry.verdict, Verdict::Pending) && entry.message.is_none() {
                entry.verdict = Verdict::Applied;
            }
        }
        self.outbox.extend(emitted);
        Ok(tx)
    }

    /// Hands each message left to `handle`, under its own savepoint when
    /// the handler acts outside the database. A handler that acts only on
    /// the database needs none: when one fails, the whole transaction is
    /// rolled back and every message runs again alone, which repeats
    /// nothing outside the database. This saves a round trip and a
    /// subtransaction per message.
    async fn handle_each<H>(&mut self, inner: &Inner<H>, mut tx: Tx) -> Result<Tx, Failure>
    where
        H: Handler<Message = M>,
    {
        let savepoints = H::OUTSIDE_EFFECTS;
        let mut savepoint = FIRST_SAVEPOINT;
        for entry in &mut self.entries {
            let Some(message) = entry.message.take() else {
                continue;
            };
            if savepoints {
                execute(&mut tx, savepoint).await?;
                savepoint = NEXT_SAVEPOINT;
            }
            let mut ctx = Context::new(entry.envelope.clone(), tx);
            let result = run_handler(inner, &mut ctx, message).await;
            let emitted;
            (tx, emitted) = ctx.into_parts();
            match result {
                Ok(()) => {
                    self.outbox.extend(emitted);
                    entry.verdict = Verdict::Applied;
                }
                Err(failure) if savepoints => {
                    execute(&mut tx, ROLLBACK_TO_SAVEPOINT).await?;
                    entry.verdict = Verdict::Failed(failure);
                }
                Err(failure) => return Err(failure),
            }
        }
        Ok(tx)
    }

    /// After the commit: acks what was applied or duplicate (with one relay
    /// for what they emitted), dead-letters permanent failures, and returns
    /// the transient ones to run again alone.
    async fn settle<H>(self, inner: &Inner<H>, committed: outbox::Committed) -> Vec<Delivery> {
        let queue = inner.spec.domain.queue();
        let (done, failed): (Vec<_>, Vec<_>) = self
            .entries
            .into_iter()
            .partition(|e| matches!(e.verdict, Verdict::Applied | Verdict::Duplicate));
        let acked: Vec<_> = done.iter().map(|e| &e.delivery).collect();
        // Both only need the commit: neither waits for the other.
        futures::join!(inner.acks.ack(&acked), outbox::relay(inner, committed));
        let duplicates = done
            .iter()
            .filter(|e| matches!(e.verdict, Verdict::Duplicate))
            .count();
        inner.metrics.settled(Outcome::Duplicate, duplicates);
        inner
            .metrics
            .settled(Outcome::Applied, done.len() - duplicates);
        if done.len() > duplicates {
            inner.breakers.applied();
        }
        for Entry {
            envelope, verdict, ..
        } in &done
        {
            let what = match verdict {
                Verdict::Duplicate => "Duplicate, already applied",
                _ => "Handled",
            };
            debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "{what}");
        }
        let mut again = Vec::new();
        for Entry {
            delivery,
            envelope,
            verdict,
            ..
        } in failed
        {
            match verdict {
                Verdict::Failed(Failure::Permanent(why)) => {
                    dead_letter(
                        inner,
                        &delivery,
                        DeadKind::Permanent,
                        &why,
                        envelope.attempt,
                    )
                    .await
                }
                Verdict::Failed(failure) => {
                    debug!(queue, message_id = %envelope.message_id, error = %failure, "Transient failure in a batch; handling it alone");
                    again.push(delivery);
                }
                _ => again.push(delivery),
            }
        }
        again
    }
}

/// Runs one of the savepoint statements.
async fn execute(tx: &mut Tx, statement: &'static str) -> Result<(), sqlx::Error> {
    sqlx::raw_sql(AssertSqlSafe(statement))
        .execute(&mut **tx)
        .await
        .map(|_| ())
}
