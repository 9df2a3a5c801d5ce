//! The consumer loop: from a delivery to an ack, a retry tier or the dead queue.
//!
//! The files follow a delivery:
//! - `consume`: the connection, the subscription, deliveries taken in chunks.
//! - `chunk`: a chunk sorted into fresh messages, prepared together, and
//!   redelivered ones.
//! - `batch`: fresh messages handled in one shared transaction.
//! - `single`: one delivery handled alone (redelivered ones always are).
//! - `decode`: the envelope and the message read from a delivery.
//! - `guard`: the handler's transaction opened, its calls guarded against panics.
//! - `failure`: retry tiers and dead letters, with their headers.
//! - `outbox`: committing what a handler emitted, the relay and the sweeper.
//! - `deadlines`: the handler's deadline scans.
//! - `shutdown`: the end of a worker's life.
//!
//! Invariants kept here:
//! - Only this module acks, nacks, retries or dead-letters a delivery.
//! - A delivery is acked only after its effect is committed, or after its
//!   copy in a retry tier or dead queue was confirmed by the broker.
//! - Concurrency is bounded by `PREFETCH` (broker side) and `CONCURRENCY`.
//! - On shutdown: stop taking deliveries, finish those in flight, relay what
//!   is left in the outbox, close connections, return.

mod batch;
mod chunk;
mod consume;
mod deadlines;
mod decode;
mod failure;
mod gate;
mod guard;
mod outbox;
mod shutdown;
mod single;

pub use shutdown::run_until_signalled;
pub use single::MAX_STARTS;

use crate::acks::Acks;
use crate::breaker::Breakers;
use crate::broker::{self, Publisher};
use crate::config::WorkerSettings;
use crate::db;
use crate::handler::Handler;
use crate::metrics::{Observer, WorkerMetrics};
use crate::store::Store;
use contract::Domain;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use topology::Topology;
use tracing::warn;

/// What a worker binary is: its name (inbox consumer, connection names,
/// logs), the domain whose queue it consumes and the schema it owns.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSpec {
    pub name: &'static str,
    pub domain: Domain,
    pub schema: &'static str,
}

impl WorkerSpec {
    /// The worker of `domain`, named by the contract.
    pub const fn of(domain: Domain) -> Self {
        Self {
            name: domain.worker(),
            domain,
            schema: domain.schema(),
        }
    }
}

pub struct Worker<H: Handler> {
    inner: Arc<Inner<H>>,
    /// `METRICS_ADDR`'s server; its token is the worker's.
    observer: Observer,
}

/// What every stage of a delivery shares.
struct Inner<H> {
    spec: WorkerSpec,
    settings: WorkerSettings,
    topology: Topology,
    pool: PgPool,
    /// Relays what handlers emit: messages built here, so its connection
    /// proposes the small frame (`broker::FRAME_MAX`).
    publisher: Publisher,
    /// Moves received messages, with whatever headers another client gave
    /// them, to a retry tier or the dead queue: the broker's frame. It
    /// connects on its first failure, and its buffers take memory only as
    /// traffic passes through them.
    republisher: Publisher,
    store: Store,
    handler: H,
    /// Redelivered messages run one at a time, so that when one of them
    /// kills the worker, only its start is counted and not those of the
    /// innocent messages that were in flight beside it.
    suspects: tokio::sync::Mutex<()>,
    /// Outbox rows being relayed or relayed and not yet deleted.
    relays: outbox::Relays,
    /// How its handler transactions begin.
    begin: guard::BeginStatements,
    /// The consumer channel's deliveries, settled through one place.
    acks: Acks,
    /// What `/metrics` shows (`METRICS_ADDR`).
    metrics: Arc<WorkerMetrics>,
    /// One circuit breaker per dependency a handler named unavailable.
    breakers: Breakers,
}

/// How long deliveries may be in hand with none settled before `/readyz`
/// reports the consumer stalled: a chunk prepared and handled together,
/// then again alone, may take four handler deadlines before its first
/// delivery settles; anything longer hangs where no deadline reaches (a
/// handler blocking its thread).
fn stall_after(settings: &WorkerSettings) -> Duration {
    settings.handler_timeout * 4
}

impl<H: Handler> Worker<H> {
    /// Serves `METRICS_ADDR` at once (alive, not ready), then connects the
    /// database, waiting for it if it is not up yet, and creates and
    /// migrates it as needed (or, as a role that may not, waits until
    /// `migrate` has). The broker is connected by [`Worker::run`],
    /// which waits for it too.
    pub async fn build(
        spec: WorkerSpec,
        settings: WorkerSettings,
        handler: H,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(WorkerMetrics::new(spec.name, stall_after(&settings)));
        let mut observer = Observer::new(settings.metrics_addr, metrics.clone());
        observer.start(spec.name).await?;
        let reached = async {
            let pool = db::connect_when_reachable(
                settings.database_url.expose(),
                settings.database_pool_size,
                spec.name,
            )
            .await?;
            db::migrate_when_current(&pool).await?;
            Ok::<_, anyhow::Error>(pool)
        }
        .await;
        let pool = match reached {
            Ok(pool) => pool,
            Err(e) => {
                observer.stop().await;
                return Err(e);
            }
        };
        db::warn_if_autovacuum_off(&pool).await;
        observer.database_reached(&pool);
        Ok(Self::assemble(
            spec, settings, pool, handler, metrics, observer,
        ))
    }

    /// A worker on an existing pool whose migrations have run; it serves
    /// `METRICS_ADDR` from [`Worker::run`].
    pub fn with_pool(spec: WorkerSpec, settings: WorkerSettings, pool: PgPool, handler: H) -> Self {
        let metrics = Arc::new(WorkerMetrics::new(spec.name, stall_after(&settings)));
        let observer = Observer::new(settings.metrics_addr, metrics.clone());
        observer.database_reached(&pool);
        Self::assemble(spec, settings, pool, handler, metrics, observer)
    }

    fn assemble(
        spec: WorkerSpec,
        settings: WorkerSettings,
        pool: PgPool,
        handler: H,
        metrics: Arc<WorkerMetrics>,
        observer: Observer,
    ) -> Self {
        let topology = Topology::contract(&settings.retry_delays).for_domain(spec.domain);
        let url = settings.amqp_url.expose();
        let publisher =
            Publisher::lazy(url, &format!("{} publisher", spec.name)).own_messages_only();
        let republisher = Publisher::lazy(url, &format!("{} republisher", spec.name));
        let store = Store::new(spec.schema, spec.name);
        let begin =
            guard::BeginStatements::new(settings.handler_timeout, batch::BATCH_LOCK_TIMEOUT);
        let told = metrics.clone();
        let breakers = Breakers::new(spec.name, settings.breaker, move |dependency, state| {
            told.breaker(dependency, state);
        });
        Self {
            inner: Arc::new(Inner {
                spec,
                settings,
                topology,
                pool,
                publisher,
                republisher,
                store,
                handler,
                suspects: tokio::sync::Mutex::new(()),
                relays: outbox::Relays::default(),
                begin,
                acks: Acks::default(),
                metrics,
                breakers,
            }),
            observer,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Consumes until `shutdown` resolves, reconnecting after broker loss.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self {
            inner,
            mut observer,
        } = self;
        // Bound before anything starts (if `build` has not): a port taken
        // is bad configuration.
        observer.start(inner.spec.name).await?;
        let token = observer.token.clone();
        let trigger = token.clone();
        tokio::spawn(async move {
            shutdown.await;
            trigger.cancel();
        });
        let sweeper = tokio::spawn(outbox::sweep_loop(inner.clone(), token.clone()));
        let deadlines = inner.handler.deadline_scan_every().map(|every| {
            tokio::spawn(deadlines::deadline_loop(
                inner.clone(),
                token.clone(),
                every,
            ))
        });
        let name = format!("{} consumer", inner.spec.name);
        loop {
            let connection = tokio::select! {
                () = token.cancelled() => break,
                c = broker::connect_with_backoff(inner.settings.amqp_url.expose(), &name) => c,
            };
            let result = consume::consume(&inner, &connection, &token).await;
            inner.metrics.set_consuming(false);
            let _ = connection.close(200, "consumer stopping".into()).await;
            match result {
                Ok(()) => break,
                Err(e) => {
                    warn!(worker = inner.spec.name, error = %e, "Consumer lost its connection, reconnecting");
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        let _ = sweeper.await;
        if let Some(deadlines) = deadlines {
            let _ = deadlines.await;
        }
        observer.stop().await;
        shutdown::drain(&inner).await;
        Ok(())
    }
}
