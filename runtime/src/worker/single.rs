//! One delivery handled alone, in its own transaction: a chunk of one, a
//! redelivered message (one at a time, its starts counted), or what a
//! batch handed back.

use super::decode::{envelope_or_bury, is_redelivered, message_or_bury};
use super::failure::{dead_letter, settle_failure};
use super::guard::{begin, run_handler, run_prepare};
use super::{Inner, outbox};
use crate::envelope::Envelope;
use crate::handler::{Context, Failure, Handler};
use crate::metrics::Outcome;
use crate::routing::DeadKind;
use lapin::message::Delivery;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// How often a redelivered message may be handed to its handler without reaching an
/// outcome (its worker died or hung each time). At the next redelivery the
/// runtime dead-letters it with kind `delivery-limit` instead. Starts are
/// counted in the database rather than read from the broker's
/// `x-delivery-count`, because the broker also counts messages that merely
/// sat in a dying worker's prefetch buffer, which would condemn innocent
/// neighbours of a poison message. The queue's `x-delivery-limit` is higher
/// and only a backstop.
pub const MAX_STARTS: i32 = 3;

/// Handles one delivery to its end: ack, retry tier, dead queue, or (when
/// the infrastructure is down) left for the broker to redeliver.
pub(super) async fn process<H: Handler>(
    inner: &Inner<H>,
    delivery: Delivery,
    token: &CancellationToken,
) {
    let queue = inner.spec.domain.queue();
    let Some(envelope) = envelope_or_bury(inner, &delivery).await else {
        return;
    };
    let redelivered = is_redelivered(&delivery);
    let _alone = if redelivered {
        Some(inner.suspects.lock().await)
    } else {
        None
    };
    if redelivered && condemned(inner, &delivery, &envelope).await {
        return;
    }
    let Some(message) = message_or_bury(inner, &delivery, &envelope).await else {
        return;
    };
    let message = match run_prepare(inner, message).await {
        Ok(message) => message,
        Err(failure) => {
            settle_failure(inner, &delivery, &envelope, failure).await;
            return reached_an_outcome(inner, &envelope, redelivered).await;
        }
    };
    let Some(mut tx) = begin(inner, token, &inner.begin.one).await else {
        // Shutting down while the database is away: leave it to the broker.
        return;
    };
    let started = std::time::Instant::now();
    let outcome = match inner.store.record_inbox(&mut tx, envelope.message_id).await {
        Ok(false) => {
            drop(tx);
            debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "Duplicate, already applied");
            inner.acks.ack(&[&delivery]).await;
            inner.metrics.settled(Outcome::Duplicate, 1);
            return reached_an_outcome(inner, &envelope, redelivered).await;
        }
        Ok(true) => {
            let mut ctx = Context::new(envelope.clone(), tx);
            match run_handler(inner, &mut ctx, message).await {
                Ok(()) => outbox::commit(inner, ctx).await,
                Err(f) => Err(f),
            }
        }
        Err(e) => Err(Failure::from(e)),
    };
    match outcome {
        Ok(committed) => {
            // The effect and the messages it causes are committed: the ack
            // can go now, and so can the relay (or, after a crash, the
            // sweeper) that sends them.
            inner.metrics.transaction(started.elapsed());
            let acked = [&delivery];
            futures::join!(inner.acks.ack(&acked), outbox::relay(inner, committed));
            inner.metrics.settled(Outcome::Applied, 1);
            inner.breakers.applied();
            debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "Handled");
        }
        Err(failure) => settle_failure(inner, &delivery, &envelope, failure).await,
    }
    reached_an_outcome(inner, &envelope, redelivered).await;
}

/// A start that reached an outcome (applied, retried, dead, or returned to
/// its queue because it could not be moved) was no crash: its count goes,
/// so that only starts without an outcome add up to [`MAX_STARTS`].
async fn reached_an_outcome<H>(inner: &Inner<H>, envelope: &Envelope, redelivered: bool) {
    if redelivered {
        let _ = inner
            .store
            .forget_starts(&inner.pool, envelope.message_id)
            .await;
    }
}

/// Counts a redelivered message's start; once it reaches [`MAX_STARTS`],
/// dead-letters it as `delivery-limit` and returns true.
async fn condemned<H>(inner: &Inner<H>, delivery: &Delivery, envelope: &Envelope) -> bool {
    let id = envelope.message_id;
    match inner.store.count_start(&inner.pool, id).await {
        // The first start was not counted: it was not a redelivery.
        Ok(starts) if starts >= MAX_STARTS => {
            let why = format!(
                "handed to the handler {starts} times without an outcome; it crashes or hangs its worker"
            );
            dead_letter(
                inner,
                delivery,
                DeadKind::DeliveryLimit,
                &why,
                envelope.attempt,
            )
            .await;
            let _ = inner.store.forget_starts(&inner.pool, id).await;
            true
        }
        Ok(starts) => {
            debug!(queue = inner.spec.domain.queue(), message_id = %id, starts, "Redelivered message started alone");
            false
        }
        // The database is away; `begin` waits for it.
        Err(e) => {
            debug!(error = %e, "Start not counted");
            false
        }
    }
}
