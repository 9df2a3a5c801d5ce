//! Helpers for the tests of the runtime and of the crates built on it
//! (feature `testing`): a worker run over one chunk of what waits in its
//! queue, and the probe handler (`probe`) of the runtime's own tests and
//! of the `probe-worker` binary they kill and restart.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

pub mod probe;

use crate::{Handler, SecretUrl, Worker, WorkerSettings};
use std::future::Future;
use std::time::Duration;

/// Settings under which a worker takes the deliveries already waiting in
/// its queue (up to 16) as one chunk: one transaction in flight, and a
/// linger long enough that the whole chunk is gathered before it starts.
/// Retry tiers of 100 ms.
pub fn one_chunk_settings(amqp_url: &str, database_url: &str) -> WorkerSettings {
    WorkerSettings {
        amqp_url: SecretUrl::new(amqp_url.to_owned()),
        database_url: SecretUrl::new(database_url.to_owned()),
        retry_delays: "100ms".parse().unwrap(),
        prefetch: 16,
        concurrency: 1,
        batch_size: 16,
        batch_linger: Duration::from_millis(500),
        database_pool_size: 4,
        outbox_sweep_after: Duration::from_secs(5),
        inbox_retention: Duration::from_secs(86_400),
        metrics_addr: None,
        handler_timeout: Duration::from_secs(60),
        breaker: crate::BreakerSettings::default(),
    }
}

/// Runs `worker` in this process until `until` completes, then stops it
/// and waits for it to end, which must be cleanly.
pub async fn run_until<H: Handler>(worker: Worker<H>, until: impl Future<Output = ()>) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    until.await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
