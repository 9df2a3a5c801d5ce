//! The deliveries that were waiting together: one alone, several prepared
//! at once (`Handler::prepare_many`) and then handled in one transaction
//! (`batch`). Redelivered ones always run alone, one at a time, so that a
//! message that kills its worker is counted and condemned alone.

use super::decode::{Decoded, envelope_or_bury, is_redelivered, message_or_bury};
use super::failure::settle_failure;
use super::guard::panic_text;
use super::{Inner, batch, gate, single};
use crate::breaker::Pass;
use crate::handler::{Failure, Handler};
use futures::FutureExt;
use lapin::message::Delivery;
use std::panic::AssertUnwindSafe;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// Handles a chunk to its end, once the gate lets it through: every
/// delivery acked, moved, or left to the broker.
pub(super) async fn process_all<H: Handler>(
    inner: &Inner<H>,
    mut deliveries: Vec<Delivery>,
    token: &CancellationToken,
) {
    loop {
        if deliveries.is_empty() {
            return;
        }
        match gate::admit(inner, token).await {
            // Shutting down, or the channel is lost: left to the broker.
            None => return,
            Some(Pass::Free) => break,
            Some(Pass::Probe(dependency)) => {
                let probe = deliveries.remove(0);
                let _working = inner.metrics.health.working();
                single::process(inner, probe, token).await;
                inner.breakers.probed(dependency);
            }
        }
    }
    let _working = inner.metrics.health.working();
    let mut alone = Vec::new();
    if deliveries.len() == 1 {
        alone = deliveries;
    } else {
        let fresh = sort(inner, deliveries, &mut alone).await;
        if fresh.len() == 1 {
            // Alone, it is prepared and handled by `single`.
            alone.extend(fresh.into_iter().map(|d| d.delivery));
        } else if !fresh.is_empty() {
            let mut ready = prepare(inner, fresh, &mut alone).await;
            // Stable: messages with equal keys keep their arrival order.
            ready.sort_by_cached_key(|d| inner.handler.lock_key(&d.message));
            if !ready.is_empty() {
                alone.extend(batch::process_batch(inner, ready, token).await);
            }
        }
    }
    for delivery in alone {
        single::process(inner, delivery, token).await;
    }
}

/// The chunk's fresh deliveries, decoded; redelivered ones go to `alone`,
/// unreadable ones to the dead queue.
async fn sort<H: Handler>(
    inner: &Inner<H>,
    deliveries: Vec<Delivery>,
    alone: &mut Vec<Delivery>,
) -> Vec<Decoded<H::Message>> {
    let mut fresh = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        if is_redelivered(&delivery) {
            alone.push(delivery);
            continue;
        }
        let Some(envelope) = envelope_or_bury(inner, &delivery).await else {
            continue;
        };
        let Some(message) = message_or_bury(inner, &delivery, &envelope).await else {
            continue;
        };
        fresh.push(Decoded {
            delivery,
            envelope,
            message,
        });
    }
    fresh
}

/// Their outside work, before the shared transaction: those prepared are
/// returned, those that failed are settled, and when the handler panics
/// all go to `alone`, where each is prepared under its own guard and only
/// the one that panics is condemned.
async fn prepare<H: Handler>(
    inner: &Inner<H>,
    fresh: Vec<Decoded<H::Message>>,
    alone: &mut Vec<Delivery>,
) -> Vec<Decoded<H::Message>> {
    let (held, messages): (Vec<_>, Vec<_>) = fresh
        .into_iter()
        .map(|d| ((d.delivery, d.envelope), d.message))
        .unzip();
    let limit = inner.settings.handler_timeout;
    let prepared =
        AssertUnwindSafe(inner.handler.prepare_many(&inner.pool, messages)).catch_unwind();
    let why = match tokio::time::timeout(limit, prepared).await {
        Ok(Ok(prepared)) => Ok(prepared),
        Ok(Err(panic)) => Err(format!("panicked: {}", panic_text(&panic))),
        Err(_) => Err(format!(
            "gave no outcome within {limit:?} (HANDLER_TIMEOUT)"
        )),
    };
    let mut prepared = match why {
        Ok(prepared) => prepared.into_iter(),
        Err(why) => {
            warn!(
                queue = inner.spec.domain.queue(),
                error = why,
                "Handler failed preparing a chunk; preparing its messages alone"
            );
            alone.extend(held.into_iter().map(|(delivery, _)| delivery));
            return Vec::new();
        }
    };
    let mut ready = Vec::with_capacity(held.len());
    for (delivery, envelope) in held {
        let outcome = prepared.next().unwrap_or_else(|| {
            Err(Failure::Permanent(
                "handler prepared fewer messages than it was given".to_owned(),
            ))
        });
        match outcome {
            Ok(message) => ready.push(Decoded {
                delivery,
                envelope,
                message,
            }),
            Err(failure) => settle_failure(inner, &delivery, &envelope, failure).await,
        }
    }
    ready
}
