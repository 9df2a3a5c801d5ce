//! The end of a worker's life: a signal, then what is left relayed and every
//! connection closed.

use super::{Inner, Worker, outbox};
use crate::handler::Handler;
use std::future::Future;
use std::time::Duration;
use tracing::{info, warn};

/// A worker binary's life: builds the worker (waiting for its database)
/// and runs it until SIGTERM or SIGINT, which may come at any point,
/// while it still builds included; either way the process ends with 0.
pub async fn run_until_signalled<H: Handler>(
    build: impl Future<Output = anyhow::Result<Worker<H>>>,
) -> anyhow::Result<()> {
    let shutdown = crate::shutdown::Shutdown::listen();
    match shutdown.unless_requested(build).await {
        Some(worker) => worker?.run(shutdown.requested()).await,
        None => Ok(()),
    }
}

/// Once no delivery is in flight: deletes what was relayed, relays whatever
/// the last handlers left regardless of age, and closes the connections.
pub(super) async fn drain<H>(inner: &Inner<H>) {
    if let Err(e) = outbox::flush_relayed(inner).await {
        warn!(worker = inner.spec.name, error = %e, "Relayed outbox rows not deleted; the next start relays them again and consumers deduplicate");
    }
    if let Err(e) = outbox::sweep_once(inner, Duration::ZERO).await {
        warn!(worker = inner.spec.name, error = %e, "Outbox not flushed at shutdown; the next start relays it");
    }
    inner.publisher.close().await;
    inner.republisher.close().await;
    inner.pool.close().await;
    info!(worker = inner.spec.name, "Stopped");
}
