//! The gate every chunk passes before it is handled. It stays shut while
//! the broker blocks the worker's publishes (a resource alarm: what a
//! handler emits could not be relayed, nor a failure moved to its retry
//! tier) and while a dependency's circuit breaker is open (`breaker.rs`).
//! A chunk held here stays unacked in the worker's hands, so at most
//! `PREFETCH` deliveries wait here; the rest wait in the queue.

use super::Inner;
use crate::breaker::Pass;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often a chunk held by a blocked broker looks again.
const BLOCKED_POLL: Duration = Duration::from_millis(250);

/// Waits until the chunk may go; `None` once `token` is cancelled (the
/// deliveries are then left to the broker).
pub(super) async fn admit<H>(inner: &Inner<H>, token: &CancellationToken) -> Option<Pass> {
    let mut held = false;
    loop {
        let blocked = inner.publisher.is_blocked().await || inner.republisher.is_blocked().await;
        inner.metrics.health.set_blocked(blocked);
        if !blocked {
            break;
        }
        if !held {
            warn!(
                worker = inner.spec.name,
                "The broker blocks this worker's publishes (a resource alarm); taking no messages until it lifts the block"
            );
            held = true;
        }
        tokio::select! {
            () = token.cancelled() => return None,
            () = tokio::time::sleep(BLOCKED_POLL) => {}
        }
    }
    if held {
        info!(
            worker = inner.spec.name,
            "The broker lifted the block; taking messages again"
        );
    }
    inner.breakers.admit(token).await
}
