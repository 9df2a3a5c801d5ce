//! The consumer loop: from a delivery to an ack, a retry tier or the dead queue.
//!
//! Invariants kept here:
//! - Only this module acks, nacks, retries or dead-letters a delivery.
//! - A delivery is acked only after its effect is committed, or after its
//!   copy in a retry tier or dead queue was confirmed by the broker.
//! - Concurrency is bounded by `PREFETCH` (broker side) and `CONCURRENCY`.
//! - On shutdown: stop taking deliveries, finish those in flight, relay what
//!   is left in the outbox, close connections, return.

use crate::acks::Acks;
use crate::broker::{self, PublishError, Publisher};
use crate::chunks::{InFlight, chunks};
use crate::config::WorkerSettings;
use crate::db;
use crate::envelope::{Envelope, Inbound, Outgoing, header_int, header_str};
use crate::handler::{Context, Failure, Fresh, Handler, Together, is_transient};
use crate::metrics::{Observer, Outcome, WorkerMetrics};
use crate::routing::{self, DeadKind, Route};
use crate::store::Store;
use backon::{ExponentialBuilder, Retryable};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Transaction};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use topology::{Domain, Topology, headers};
use tracing::{debug, error, info, warn};

/// How often a redelivered message may be handed to its handler without reaching an
/// outcome (its worker died or hung each time). At the next redelivery the
/// runtime dead-letters it with kind `delivery-limit` instead. Starts are
/// counted in the database rather than read from the broker's
/// `x-delivery-count`, because the broker also counts messages that merely
/// sat in a dying worker's prefetch buffer, which would condemn innocent
/// neighbours of a poison message. The queue's `x-delivery-limit` is higher
/// and only a backstop.
pub const MAX_STARTS: i32 = 3;

/// The longest a single broker call (ack, subscribe) may take before the
/// connection is treated as lost.
pub(crate) const BROKER_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest error text kept in `x-error`.
const MAX_ERROR_LEN: usize = 1000;

/// What a worker binary is: its name (inbox consumer, connection names,
/// logs), the domain whose queue it consumes and the schema it owns.
#[derive(Debug, Clone, Copy)]
pub struct WorkerSpec {
    pub name: &'static str,
    pub domain: Domain,
    pub schema: &'static str,
}

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

pub struct Worker<H: Handler> {
    inner: Arc<Inner<H>>,
    /// `METRICS_ADDR`'s server; its token is the worker's.
    observer: Observer,
}

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
    /// Outbox rows already relayed, to be deleted by the next handler
    /// transaction or the sweeper's next tick, well before the sweeper
    /// would consider them stale.
    relayed: std::sync::Mutex<Vec<i64>>,
    /// Outbox rows the relay is sending right now. The sweeper leaves them
    /// (and the relayed ones) alone: a relay slowed past
    /// `OUTBOX_SWEEP_AFTER_MS` (publisher reconnecting, busy broker) would
    /// otherwise have its rows sent twice.
    relaying: std::sync::Mutex<std::collections::HashSet<i64>>,
    /// The consumer channel's deliveries, settled through one place.
    acks: Acks,
    /// What `/metrics` shows (`METRICS_ADDR`).
    metrics: Arc<WorkerMetrics>,
}

impl<H: Handler> Worker<H> {
    /// Serves `METRICS_ADDR` at once (alive, not ready), then connects the
    /// database, waiting for it if it is not up yet, and creates and
    /// migrates it as needed. The broker is connected by [`Worker::run`],
    /// which waits for it too.
    pub async fn build(
        spec: WorkerSpec,
        settings: WorkerSettings,
        handler: H,
    ) -> anyhow::Result<Self> {
        let metrics = Arc::new(WorkerMetrics::new(spec.name));
        let mut observer = Observer::new(settings.metrics_addr, metrics.clone());
        observer.start(spec.name).await?;
        let reached = async {
            let pool = db::connect_when_reachable(
                settings.database_url.expose(),
                settings.database_pool_size,
                spec.name,
            )
            .await?;
            db::migrate(&pool).await?;
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
        let metrics = Arc::new(WorkerMetrics::new(spec.name));
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
                relayed: std::sync::Mutex::new(Vec::new()),
                relaying: std::sync::Mutex::new(std::collections::HashSet::new()),
                acks: Acks::default(),
                metrics,
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
        let sweeper = tokio::spawn(sweep_loop(inner.clone(), token.clone()));
        let deadlines = inner
            .handler
            .deadline_scan_every()
            .map(|every| tokio::spawn(deadline_loop(inner.clone(), token.clone(), every)));
        let name = format!("{} consumer", inner.spec.name);
        loop {
            let connection = tokio::select! {
                () = token.cancelled() => break,
                c = broker::connect_with_backoff(inner.settings.amqp_url.expose(), &name) => c,
            };
            let result = consume(&inner, &connection, &token).await;
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
        // Delete what was relayed, then relay whatever the last handlers
        // left, regardless of age.
        if let Err(e) = flush_relayed(&inner).await {
            warn!(worker = inner.spec.name, error = %e, "Relayed outbox rows not deleted; the next start relays them again and consumers deduplicate");
        }
        if let Err(e) = sweep_once(&inner, Duration::ZERO).await {
            warn!(worker = inner.spec.name, error = %e, "Outbox not flushed at shutdown; the next start relays it");
        }
        inner.publisher.close().await;
        inner.republisher.close().await;
        inner.pool.close().await;
        info!(worker = inner.spec.name, "Stopped");
        Ok(())
    }
}

/// One consuming session on one connection. Returns Ok on shutdown and Err
/// when the connection or channel is lost.
async fn consume<H: Handler>(
    inner: &Arc<Inner<H>>,
    connection: &Connection,
    token: &CancellationToken,
) -> anyhow::Result<()> {
    // Every broker round trip here is bounded: a broker that accepted the
    // connection but does not answer must not hang the worker.
    let mismatches = tokio::time::timeout(
        BROKER_CALL_TIMEOUT * 6,
        topology::declare(connection, &inner.topology),
    )
    .await
    .map_err(|_| anyhow::anyhow!("declaring the topology timed out"))??;
    for m in &mismatches {
        // The existing queue keeps being used; an operator must reconcile it.
        error!(worker = inner.spec.name, mismatch = %m, "Topology differs from the broker");
    }
    let queue = inner.spec.domain.queue();
    let subscribe = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(inner.settings.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("{}-{}", inner.spec.name, uuid::Uuid::new_v4())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    let (channel, consumer) = tokio::time::timeout(BROKER_CALL_TIMEOUT, subscribe)
        .await
        .map_err(|_| anyhow::anyhow!("subscribing to {queue} timed out"))??;
    // The previous channel's deliveries are all finished: `for_each_concurrent`
    // below returns only then.
    inner.acks.reset();
    inner.metrics.set_consuming(true);
    info!(
        worker = inner.spec.name,
        queue,
        prefetch = inner.settings.prefetch,
        concurrency = inner.settings.concurrency,
        "Consuming"
    );
    let stream_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let seen_error = stream_error.clone();
    // The delivery stream does not always end when the connection dies, so
    // the connection is watched too: either way, stop taking deliveries and
    // let the ones in flight finish (their acks fail; the broker redelivers).
    let connection_lost = async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if !connection.status().connected() || !channel.status().connected() {
                return;
            }
        }
    };
    let stop = async {
        tokio::select! {
            () = token.cancelled() => {}
            () = connection_lost => {}
        }
    };
    // Chunks take the deliveries already waiting, and wait for company
    // only when more are likely (`chunks.rs`).
    let in_flight = InFlight::default();
    let chunks = chunks(
        consumer.take_until(Box::pin(stop)),
        inner.settings.batch_size,
        inner.settings.batch_linger,
        in_flight.clone(),
    );
    chunks
        .for_each_concurrent(inner.settings.concurrency, |chunk| {
            let inner = inner.clone();
            let token = token.clone();
            let mut deliveries = Vec::with_capacity(chunk.len());
            for delivery in chunk {
                match delivery {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(e) => {
                        if let Ok(mut slot) = seen_error.lock() {
                            *slot = Some(e.to_string());
                        }
                    }
                }
            }
            // In channel order: chunks are taken one after the other.
            inner.acks.received(&deliveries);
            let in_flight = in_flight.enter();
            async move {
                // Spawned so handlers use every core; awaited so the
                // concurrency bound holds.
                let _ = tokio::spawn(async move { process_all(&inner, deliveries, &token).await })
                    .await;
                drop(in_flight);
            }
        })
        .await;
    if token.is_cancelled() {
        let _ = channel.close(200, "shutting down".into()).await;
        return Ok(());
    }
    let reason = stream_error
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_else(|| "the connection or channel closed".to_owned());
    anyhow::bail!(reason)
}

/// A fresh delivery ready for its handler.
struct Decoded<M> {
    delivery: Delivery,
    envelope: Envelope,
    message: M,
}

/// Handles the deliveries that were waiting together: one alone, several
/// prepared at once (`Handler::prepare`) and then handled in one
/// transaction. Redelivered ones always run alone, one at a time, so that
/// a message that kills its worker is counted and condemned alone.
async fn process_all<H: Handler>(
    inner: &Inner<H>,
    deliveries: Vec<Delivery>,
    token: &CancellationToken,
) {
    if deliveries.len() == 1 {
        for delivery in deliveries {
            process(inner, delivery, token).await;
        }
        return;
    }
    let mut fresh = Vec::with_capacity(deliveries.len());
    let mut alone = Vec::new();
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
    if fresh.len() == 1 {
        // Alone, it is prepared and handled by `process`.
        alone.extend(fresh.into_iter().map(|d| d.delivery));
        fresh = Vec::new();
    }
    // Their outside work, before the shared transaction.
    let (held, messages): (Vec<_>, Vec<_>) = fresh
        .into_iter()
        .map(|d| ((d.delivery, d.envelope), d.message))
        .unzip();
    let prepared = AssertUnwindSafe(inner.handler.prepare_many(&inner.pool, messages))
        .catch_unwind()
        .await;
    let mut ready = Vec::with_capacity(held.len());
    match prepared {
        Ok(prepared) => {
            let mut prepared = prepared.into_iter();
            for (delivery, envelope) in held {
                let prepared = prepared.next().unwrap_or_else(|| {
                    Err(Failure::Permanent(
                        "handler prepared fewer messages than it was given".to_owned(),
                    ))
                });
                match prepared {
                    Ok(message) => ready.push(Decoded {
                        delivery,
                        envelope,
                        message,
                    }),
                    Err(failure) => settle_failure(inner, &delivery, &envelope, failure).await,
                }
            }
        }
        Err(panic) => {
            // Alone, each is prepared under its own guard, and only the
            // one that panics is condemned.
            warn!(
                queue = inner.spec.domain.queue(),
                panic = panic_text(&panic),
                "Handler panicked preparing a chunk; preparing its messages alone"
            );
            alone.extend(held.into_iter().map(|(delivery, _)| delivery));
        }
    }
    // Stable: messages with equal keys keep their arrival order.
    ready.sort_by_cached_key(|d| inner.handler.lock_key(&d.message));
    if !ready.is_empty() {
        alone.extend(process_batch(inner, ready, token).await);
    }
    for delivery in alone {
        process(inner, delivery, token).await;
    }
}

/// The delivery's envelope, or `None` once a delivery without a valid one
/// is dead-lettered as malformed.
async fn envelope_or_bury<H>(inner: &Inner<H>, delivery: &Delivery) -> Option<Envelope> {
    match Envelope::parse(&delivery.properties) {
        Ok(envelope) => Some(envelope),
        Err(m) => {
            dead_letter(inner, delivery, DeadKind::Malformed, &m.to_string(), 1).await;
            None
        }
    }
}

/// The delivery's message, or `None` once a body its handler cannot read
/// is dead-lettered as malformed.
async fn message_or_bury<H: Handler>(
    inner: &Inner<H>,
    delivery: &Delivery,
    envelope: &Envelope,
) -> Option<H::Message> {
    match H::Message::decode(&envelope.kind, &delivery.data) {
        Ok(message) => Some(message),
        Err(m) => {
            let why = m.to_string();
            dead_letter(inner, delivery, DeadKind::Malformed, &why, envelope.attempt).await;
            None
        }
    }
}

fn is_redelivered(delivery: &Delivery) -> bool {
    delivery.redelivered
        || delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| header_int(h, headers::DELIVERY_COUNT))
            .is_some_and(|n| n > 0)
}

/// How a batch's transaction begins, in the same round trip as its `BEGIN`:
/// a batch bounds its lock waits, so a deadlock the key order could not
/// prevent (a message locking rows its key does not name) costs the batch
/// a short wait rather than PostgreSQL's deadlock timeout, and the message
/// that waited runs again alone.
const BEGIN_BATCH: &str = "BEGIN; SET LOCAL lock_timeout = '200ms'";
/// The savepoint each message of a batch runs under, so that a failing
/// handler takes back only its own statements.
const FIRST_SAVEPOINT: &str = "SAVEPOINT message";
const NEXT_SAVEPOINT: &str = "RELEASE SAVEPOINT message; SAVEPOINT message";
const ROLLBACK_TO_SAVEPOINT: &str = "ROLLBACK TO SAVEPOINT message";

/// Handles several fresh messages in one transaction: one inbox statement,
/// one savepoint per message, one outbox statement, one commit (one WAL
/// flush) for all, then their acks and one confirmed relay for everything
/// they emitted. Returns the deliveries that must be handled again alone:
/// those whose handler failed transiently (the batch itself may have
/// caused it, holding locks longer), or all of them when the transaction
/// broke.
async fn process_batch<H: Handler>(
    inner: &Inner<H>,
    batch: Vec<Decoded<H::Message>>,
    token: &CancellationToken,
) -> Vec<Delivery> {
    let queue = inner.spec.domain.queue();
    let started = std::time::Instant::now();
    let Some(mut tx) = begin(inner, token, Some(BEGIN_BATCH)).await else {
        // Shutting down while the database is away: leave them to the broker.
        return Vec::new();
    };
    let ids: Vec<_> = batch.iter().map(|d| d.envelope.message_id).collect();
    let mut new: std::collections::HashSet<_> =
        match inner.store.record_inbox_many(&mut tx, &ids).await {
            Ok(new) => new.into_iter().collect(),
            Err(e) => {
                debug!(queue, error = %e, "Batch not started; handling its messages alone");
                return batch.into_iter().map(|d| d.delivery).collect();
            }
        };
    let mut done = Vec::with_capacity(batch.len());
    let mut outbox = Vec::new();
    let mut failed = Vec::new();
    let mut fresh = Vec::with_capacity(batch.len());
    let mut duplicates = 0;
    for decoded in batch {
        if new.remove(&decoded.envelope.message_id) {
            fresh.push(decoded);
        } else {
            duplicates += 1;
            let Decoded {
                delivery, envelope, ..
            } = decoded;
            debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "Duplicate, already applied");
            done.push((delivery, envelope));
        }
    }
    // What the handler applies together, set-based, comes first, before
    // any savepoint: when it fails the whole transaction is rolled back
    // and its messages run again alone. It acts only on the database, or
    // outside with its claims given back for what failed
    // (`Handler::handle_together`), so nothing it did outside is repeated
    // unless the transaction is lost after it, as with `handle`.
    if fresh.len() > 1 {
        match apply_together(inner, tx, fresh, &mut done, &mut outbox).await {
            Ok((kept_tx, left)) => (tx, fresh) = (kept_tx, left),
            Err((failure, fresh)) => {
                debug!(queue, error = %failure, "Messages applied together failed; handling them alone");
                let mut again: Vec<_> = done.into_iter().map(|(d, _)| d).collect();
                again.extend(fresh);
                return again;
            }
        }
    }
    // A handler that acts only on the database needs no savepoint: when one
    // fails, the whole transaction is rolled back and every message runs
    // again alone, which repeats nothing outside the database. This saves
    // a round trip and a subtransaction per message.
    let savepoints = H::OUTSIDE_EFFECTS;
    let mut savepoint = FIRST_SAVEPOINT;
    let mut broken = false;
    for Decoded {
        delivery,
        envelope,
        message,
    } in fresh
    {
        if broken {
            failed.push((delivery, envelope, None));
            continue;
        }
        if savepoints
            && sqlx::raw_sql(AssertSqlSafe(savepoint))
                .execute(&mut *tx)
                .await
                .is_err()
        {
            broken = true;
            failed.push((delivery, envelope, None));
            continue;
        }
        savepoint = NEXT_SAVEPOINT;
        let mut ctx = Context::new(envelope.clone(), tx);
        let result = run_handler(inner, &mut ctx, message).await;
        let emitted;
        (tx, emitted) = ctx.into_parts();
        match result {
            Ok(()) => {
                outbox.extend(emitted);
                done.push((delivery, envelope));
            }
            Err(failure) => {
                if !savepoints
                    || sqlx::raw_sql(AssertSqlSafe(ROLLBACK_TO_SAVEPOINT))
                        .execute(&mut *tx)
                        .await
                        .is_err()
                {
                    broken = true;
                }
                failed.push((delivery, envelope, Some(failure)));
            }
        }
    }
    // Nothing of the transaction stands: every message starts again.
    let all_again = |done: Vec<(Delivery, Envelope)>, failed: Vec<(Delivery, Envelope, _)>| {
        let mut again: Vec<_> = done.into_iter().map(|(d, _)| d).collect();
        again.extend(failed.into_iter().map(|(d, _, _)| d));
        again
    };
    if broken {
        return all_again(done, failed);
    }
    let undo: Vec<_> = failed.iter().map(|(_, e, _)| e.message_id).collect();
    let committed = match inner.store.forget_inbox(&mut tx, &undo).await {
        Ok(()) => commit_with_outbox(inner, tx, &outbox).await,
        Err(e) => Err(e),
    };
    let outbox_ids = match committed {
        Ok(ids) => ids,
        Err(e) => {
            debug!(queue, error = %e, "Batch not committed; handling its messages alone");
            return all_again(done, failed);
        }
    };
    let committed_at = std::time::Instant::now();
    inner.metrics.transaction(committed_at - started);
    // Both only need the commit: neither waits for the other.
    let deliveries: Vec<_> = done.iter().map(|(d, _)| d).collect();
    futures::join!(
        inner.acks.ack(&deliveries),
        relay(inner, (outbox_ids, outbox))
    );
    inner.metrics.settled(Outcome::Duplicate, duplicates);
    inner
        .metrics
        .settled(Outcome::Applied, done.len() - duplicates);
    debug!(queue, messages = done.len(), handled_and_committed = ?(committed_at - started), acked_and_relayed = ?committed_at.elapsed(), "Batch done");
    for (_, envelope) in &done {
        debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "Handled");
    }
    let mut again = Vec::new();
    for (delivery, envelope, failure) in failed {
        match failure {
            Some(Failure::Permanent(why)) => {
                dead_letter(
                    inner,
                    &delivery,
                    DeadKind::Permanent,
                    &why,
                    envelope.attempt,
                )
                .await
            }
            Some(Failure::Transient(why)) => {
                debug!(queue, message_id = %envelope.message_id, error = why, "Transient failure in a batch; handling it alone");
                again.push(delivery);
            }
            None => again.push(delivery),
        }
    }
    again
}

/// Lets the handler apply what it can of `fresh` together
/// (`Handler::handle_together`): those it took join `done` and what they
/// emitted joins `outbox`; returns the transaction and the messages left
/// for `handle`, in chunk order. On failure the transaction is gone
/// (rolled back) and every fresh delivery is returned, to run again alone.
#[allow(clippy::type_complexity)]
async fn apply_together<H: Handler>(
    inner: &Inner<H>,
    tx: Transaction<'static, Postgres>,
    fresh: Vec<Decoded<H::Message>>,
    done: &mut Vec<(Delivery, Envelope)>,
    outbox: &mut Vec<Outgoing>,
) -> Result<(Transaction<'static, Postgres>, Vec<Decoded<H::Message>>), (Failure, Vec<Delivery>)> {
    // The deliveries in chunk order (so that they run again alone in that
    // order), found by message id: fresh ids are distinct, the inbox
    // statement returns each once.
    let mut slots = Vec::with_capacity(fresh.len());
    let mut slot_of = std::collections::HashMap::with_capacity(fresh.len());
    let mut messages = Vec::with_capacity(fresh.len());
    for Decoded {
        delivery,
        envelope,
        message,
    } in fresh
    {
        slot_of.insert(envelope.message_id, slots.len());
        slots.push(Some((delivery, envelope.clone())));
        messages.push(Fresh { envelope, message });
    }
    let mut ctx = Together::new(tx);
    let result = unless_panicked(
        "handler panicked applying messages together",
        inner.handler.handle_together(&mut ctx, messages),
    )
    .await;
    let left = match result {
        Ok(left) => left,
        Err(failure) => {
            let again = slots.into_iter().flatten().map(|(d, _)| d).collect();
            return Err((failure, again));
        }
    };
    let (tx, emitted) = ctx.into_parts();
    // What was left goes back to `handle` in chunk order (`lock_key`
    // order), whatever order the handler returned it in.
    let mut rest: Vec<Option<Decoded<H::Message>>> =
        std::iter::repeat_with(|| None).take(slots.len()).collect();
    for Fresh { envelope, message } in left {
        // Each id once: a message cannot be left twice.
        let Some(&i) = slot_of.get(&envelope.message_id) else {
            continue;
        };
        if let Some((delivery, _)) = slots[i].take() {
            rest[i] = Some(Decoded {
                delivery,
                envelope,
                message,
            });
        }
    }
    // What is still in its slot was taken together.
    done.extend(slots.into_iter().flatten());
    outbox.extend(emitted);
    Ok((tx, rest.into_iter().flatten().collect()))
}

/// Runs the handler's outside work, turning a panic into a permanent failure.
async fn run_prepare<H: Handler>(
    inner: &Inner<H>,
    message: H::Message,
) -> Result<H::Message, Failure> {
    unless_panicked(
        "handler panicked preparing",
        inner.handler.prepare(&inner.pool, message),
    )
    .await
}

/// Runs the handler, turning a panic into a permanent failure.
async fn run_handler<H: Handler>(
    inner: &Inner<H>,
    ctx: &mut Context,
    message: H::Message,
) -> Result<(), Failure> {
    unless_panicked("handler panicked", inner.handler.handle(ctx, message)).await
}

/// Awaits handler code; a panic becomes a permanent failure whose text
/// starts with `what`, so one bad message cannot take its worker down.
async fn unless_panicked<T>(
    what: &str,
    work: impl Future<Output = Result<T, Failure>>,
) -> Result<T, Failure> {
    AssertUnwindSafe(work)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            Err(Failure::Permanent(format!(
                "{what}: {}",
                panic_text(&panic)
            )))
        })
}

/// Handles one delivery to its end: ack, retry tier, dead queue, or (when
/// the infrastructure is down) left for the broker to redeliver.
async fn process<H: Handler>(inner: &Inner<H>, delivery: Delivery, token: &CancellationToken) {
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
    if redelivered {
        match inner
            .store
            .count_start(&inner.pool, envelope.message_id)
            .await
        {
            // The first start was not counted: it was not a redelivery.
            Ok(starts) if starts >= MAX_STARTS => {
                let why = format!(
                    "handed to the handler {} times without an outcome; it crashes or hangs its worker",
                    starts
                );
                dead_letter(
                    inner,
                    &delivery,
                    DeadKind::DeliveryLimit,
                    &why,
                    envelope.attempt,
                )
                .await;
                let _ = inner
                    .store
                    .forget_starts(&inner.pool, envelope.message_id)
                    .await;
                return;
            }
            Ok(starts) => {
                debug!(queue, message_id = %envelope.message_id, starts, "Redelivered message started alone")
            }
            // The database is away; `begin` below waits for it.
            Err(e) => debug!(error = %e, "Start not counted"),
        }
    }
    let Some(message) = message_or_bury(inner, &delivery, &envelope).await else {
        return;
    };
    let message = match run_prepare(inner, message).await {
        Ok(message) => message,
        Err(failure) => return settle_failure(inner, &delivery, &envelope, failure).await,
    };

    let Some(mut tx) = begin(inner, token, None).await else {
        // Shutting down while the database is away: leave it to the broker.
        return;
    };
    let started = std::time::Instant::now();
    let outcome = match inner.store.record_inbox(&mut tx, envelope.message_id).await {
        Ok(false) => {
            drop(tx);
            debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "Duplicate, already applied");
            ack(inner, &delivery).await;
            inner.metrics.settled(Outcome::Duplicate, 1);
            return;
        }
        Ok(true) => {
            let mut ctx = Context::new(envelope.clone(), tx);
            match run_handler(inner, &mut ctx, message).await {
                Ok(()) => commit(inner, ctx).await,
                Err(f) => Err(f),
            }
        }
        Err(e) => Err(Failure::from(e)),
    };
    match outcome {
        Ok(ids_and_messages) => {
            // The effect and the messages it causes are committed: the ack
            // can go now, and so can the relay (or, after a crash, the
            // sweeper) that sends them.
            inner.metrics.transaction(started.elapsed());
            futures::join!(ack(inner, &delivery), relay(inner, ids_and_messages));
            inner.metrics.settled(Outcome::Applied, 1);
            if redelivered {
                let _ = inner
                    .store
                    .forget_starts(&inner.pool, envelope.message_id)
                    .await;
            }
            debug!(queue, message_id = %envelope.message_id, kind = %envelope.kind, "Handled");
        }
        Err(failure) => settle_failure(inner, &delivery, &envelope, failure).await,
    }
}

/// Where a message whose handling failed goes: the dead queue at once when
/// the failure is permanent, else the next retry tier (or the dead queue
/// when the tiers are used up).
async fn settle_failure<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    envelope: &Envelope,
    failure: Failure,
) {
    match failure {
        Failure::Permanent(why) => {
            dead_letter(inner, delivery, DeadKind::Permanent, &why, envelope.attempt).await;
        }
        Failure::Transient(why) => {
            match routing::after_transient(envelope.attempt, &inner.settings.retry_delays) {
                Route::Retry { tier, delay } => {
                    retry(inner, delivery, envelope, tier, delay, &why).await
                }
                Route::Dead(kind) => {
                    dead_letter(inner, delivery, kind, &why, envelope.attempt).await
                }
            }
        }
    }
}

type Committed = (Vec<i64>, Vec<crate::envelope::Outgoing>);

async fn commit<H>(inner: &Inner<H>, ctx: Context) -> Result<Committed, Failure> {
    let (tx, outbox) = ctx.into_parts();
    let ids = commit_with_outbox(inner, tx, &outbox).await?;
    Ok((ids, outbox))
}

/// Writes `outbox`, deletes the rows relayed since the last commit (which
/// saves each relay a commit, and its WAL flush, of its own) and commits;
/// returns the outbox row ids.
async fn commit_with_outbox<H>(
    inner: &Inner<H>,
    mut tx: sqlx::Transaction<'static, sqlx::Postgres>,
    outbox: &[crate::envelope::Outgoing],
) -> Result<Vec<i64>, sqlx::Error> {
    let relayed = take_relayed(inner);
    let result = async {
        let ids = inner.store.write_outbox(&mut tx, &relayed, outbox).await?;
        tx.commit().await?;
        Ok(ids)
    }
    .await;
    if result.is_err() {
        mark_relayed(inner, &relayed);
    }
    result
}

fn take_relayed<H>(inner: &Inner<H>) -> Vec<i64> {
    inner
        .relayed
        .lock()
        .map(|mut r| std::mem::take(&mut *r))
        .unwrap_or_default()
}

/// Queues relayed rows for deletion (again, when a deletion failed).
fn mark_relayed<H>(inner: &Inner<H>, ids: &[i64]) {
    if let Ok(mut r) = inner.relayed.lock() {
        r.extend_from_slice(ids);
    }
}

/// Deletes relayed rows no handler transaction has taken along yet.
async fn flush_relayed<H>(inner: &Inner<H>) -> Result<(), sqlx::Error> {
    let ids = take_relayed(inner);
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
            mark_relayed(inner, &ids);
            Err(e)
        }
    }
}

/// Sends what the handler emitted, right after commit. A failure here loses
/// nothing: the rows stay and the sweeper sends them.
async fn relay<H>(inner: &Inner<H>, (ids, messages): Committed) {
    if messages.is_empty() {
        return;
    }
    let _relaying = Relaying::new(inner, &ids);
    match inner.publisher.publish_all(&messages).await {
        Ok(()) => {
            mark_relayed(inner, &ids);
            inner.metrics.relayed(messages.len());
        }
        Err(e) => {
            warn!(worker = inner.spec.name, error = %e, "Outbox relay failed; the sweeper will send these rows")
        }
    }
}

/// Marks outbox rows as being relayed for as long as it lives, whichever way
/// the relay ends (a relay cancelled by shutdown included), so the sweeper
/// never skips a row forever.
struct Relaying<'a> {
    set: &'a std::sync::Mutex<std::collections::HashSet<i64>>,
    ids: &'a [i64],
}

impl<'a> Relaying<'a> {
    fn new<H>(inner: &'a Inner<H>, ids: &'a [i64]) -> Self {
        if let Ok(mut set) = inner.relaying.lock() {
            set.extend(ids.iter().copied());
        }
        Self {
            set: &inner.relaying,
            ids,
        }
    }
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            for id in self.ids {
                set.remove(id);
            }
        }
    }
}

/// Rows the sweeper must not send: being relayed, or relayed and not yet
/// deleted.
fn not_to_sweep<H>(inner: &Inner<H>) -> Vec<i64> {
    let mut skip: Vec<i64> = inner
        .relaying
        .lock()
        .map(|set| set.iter().copied().collect())
        .unwrap_or_default();
    if let Ok(relayed) = inner.relayed.lock() {
        skip.extend(relayed.iter().copied());
    }
    skip
}

/// Opens the handler's transaction, waiting out a database outage rather
/// than spending the message's attempts on it. Shutdown interrupts only the
/// waits between attempts, never an attempt: an attempt dropped after its
/// `BEGIN` was sent would return its connection to the pool inside a
/// transaction. An attempt is bounded by the pool's acquire timeout.
/// `statement` replaces the plain `BEGIN` (it must begin the transaction).
async fn begin<H>(
    inner: &Inner<H>,
    token: &CancellationToken,
    statement: Option<&'static str>,
) -> Option<sqlx::Transaction<'static, sqlx::Postgres>> {
    use backon::BackoffBuilder;
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build();
    loop {
        let attempt = match statement {
            Some(statement) => inner.pool.begin_with(AssertSqlSafe(statement)).await,
            None => inner.pool.begin().await,
        };
        match attempt {
            Ok(tx) => return Some(tx),
            Err(e) if is_transient(&e) => {
                let delay = delays.next().unwrap_or(Duration::from_secs(5));
                warn!(worker = inner.spec.name, error = %e, retry_in = ?delay, "Database unavailable");
                tokio::select! {
                    () = token.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => {
                error!(worker = inner.spec.name, error = %e, "Cannot open a database transaction");
                return None;
            }
        }
    }
}

async fn ack<H>(inner: &Inner<H>, delivery: &Delivery) {
    inner.acks.ack(&[delivery]).await;
}

/// Gives the delivery back to the broker after a failed move, so it is not
/// held unacked while the publisher is away.
async fn requeue<H>(inner: &Inner<H>, delivery: &Delivery, error: &PublishError) {
    warn!(error = %error, "Could not move the message; returning it to its queue");
    tokio::time::sleep(Duration::from_secs(1)).await;
    inner.acks.requeue(delivery).await;
    inner.metrics.settled(Outcome::Requeued, 1);
}

async fn retry<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    envelope: &Envelope,
    tier: usize,
    delay: Duration,
    why: &str,
) {
    let queue = inner.spec.domain.queue();
    let next = envelope.attempt + 1;
    let mut properties = failure_properties(
        delivery,
        why,
        &[(headers::ATTEMPT, AMQPValue::LongLongInt(next.into()))],
    );
    properties = properties.with_expiration(
        routing::jittered(delay)
            .as_millis()
            .to_string()
            .as_str()
            .into(),
    );
    let target = inner.spec.domain.retry_queue(tier);
    match publish_with_retries(inner, &target, &delivery.data, properties).await {
        Ok(()) => {
            warn!(queue, message_id = %envelope.message_id, kind = %envelope.kind, attempt = envelope.attempt, tier, trace_id = trace_id(delivery), error = why, "Transient failure, retrying");
            ack(inner, delivery).await;
            inner.metrics.settled(Outcome::Retried, 1);
        }
        Err(e) => requeue(inner, delivery, &e).await,
    }
}

async fn dead_letter<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    kind: DeadKind,
    why: &str,
    attempts: u32,
) {
    let queue = inner.spec.domain.queue();
    let properties = failure_properties(
        delivery,
        why,
        &[
            (
                headers::ERROR_KIND,
                AMQPValue::LongString(kind.as_str().into()),
            ),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(attempts.into())),
        ],
    );
    let target = inner.spec.domain.dead_queue();
    match publish_with_retries(inner, &target, &delivery.data, properties).await {
        Ok(()) => {
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default();
            error!(
                queue,
                message_id,
                trace_id = trace_id(delivery),
                kind = kind.as_str(),
                attempts,
                error = why,
                "Message dead-lettered"
            );
            ack(inner, delivery).await;
            inner.metrics.dead_lettered(kind);
        }
        Err(e) => requeue(inner, delivery, &e).await,
    }
}

/// The trace id of the delivery's `traceparent`, for log lines an
/// operator joins with traces; empty when it has none.
fn trace_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| header_str(h, headers::TRACEPARENT))
        .filter(|t| crate::envelope::is_traceparent(t))
        .and_then(|t| t.split('-').nth(1).map(str::to_owned))
        .unwrap_or_default()
}

async fn publish_with_retries<H>(
    inner: &Inner<H>,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_times(3);
    (|| {
        inner
            .republisher
            .publish_raw("", queue, body, properties.clone())
    })
    .retry(backoff)
    .await
}

/// The delivery's properties with the failure headers: the error, when it
/// first failed and where it was first published (kept from an earlier
/// failure), plus `extra`.
fn failure_properties(
    delivery: &Delivery,
    why: &str,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let mut table = delivery.properties.headers().clone().unwrap_or_default();
    let mut set = |name: &str, value: AMQPValue| {
        table.insert(ShortString::from(name), value);
    };
    let existing = delivery.properties.headers().clone().unwrap_or_default();
    if header_str(&existing, headers::FIRST_FAILED_AT).is_none() {
        set(
            headers::FIRST_FAILED_AT,
            AMQPValue::LongString(chrono::Utc::now().to_rfc3339().as_str().into()),
        );
    }
    if header_str(&existing, headers::ORIGINAL_EXCHANGE).is_none() {
        set(
            headers::ORIGINAL_EXCHANGE,
            AMQPValue::LongString(delivery.exchange.as_str().into()),
        );
        set(
            headers::ORIGINAL_ROUTING_KEY,
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
    }
    let mut error = why.to_owned();
    if error.len() > MAX_ERROR_LEN {
        let mut cut = MAX_ERROR_LEN;
        while !error.is_char_boundary(cut) {
            cut -= 1;
        }
        error.truncate(cut);
    }
    set(
        headers::ERROR,
        AMQPValue::LongString(LongString::from(error.as_str())),
    );
    for (name, value) in extra {
        set(name, value.clone());
    }
    // The broker's delivery count belongs to the old queue; a fresh copy starts at zero.
    let mut inner = table.inner().clone();
    inner.remove(&ShortString::from(headers::DELIVERY_COUNT));
    delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(inner))
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_owned())
}

/// Relays outbox rows that the post-commit relay did not (a crash between
/// commit and relay, or the broker away at that moment).
/// Also prunes the inbox: rows older than `INBOX_RETENTION_DAYS`, checked
/// at the first tick and then every ten minutes.
async fn sweep_loop<H>(inner: Arc<Inner<H>>, token: CancellationToken) {
    let every = (inner.settings.outbox_sweep_after / 2).max(Duration::from_millis(100));
    let mut next_prune = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        if tokio::time::Instant::now() >= next_prune {
            next_prune = tokio::time::Instant::now() + Duration::from_secs(600);
            match inner
                .store
                .prune_inbox(&inner.pool, inner.settings.inbox_retention)
                .await
            {
                Ok(0) => {}
                Ok(n) => info!(worker = inner.spec.name, rows = n, "Inbox pruned"),
                Err(e) => warn!(worker = inner.spec.name, error = %e, "Inbox prune failed"),
            }
            match inner
                .store
                .prune_starts(&inner.pool, inner.settings.inbox_retention)
                .await
            {
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

/// Scans the handler's deadlines every `every` until shutdown. A scan that
/// acted on some runs again at once; one that failed is rolled back,
/// logged, and run again at the next tick.
async fn deadline_loop<H: Handler>(
    inner: Arc<Inner<H>>,
    token: CancellationToken,
    every: Duration,
) {
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        loop {
            match expire_deadlines(&inner, &token).await {
                Ok(0) => break,
                Ok(n) => debug!(worker = inner.spec.name, deadlines = n, "Deadlines expired"),
                Err(e) => {
                    warn!(worker = inner.spec.name, error = %e, "Deadline scan failed; trying again at the next tick");
                    break;
                }
            }
            if token.is_cancelled() {
                return;
            }
        }
    }
}

/// One deadline scan in its own transaction, committed with what it emitted
/// and relayed like a handler's messages.
async fn expire_deadlines<H: Handler>(
    inner: &Inner<H>,
    token: &CancellationToken,
) -> Result<usize, Failure> {
    let Some(tx) = begin(inner, token, None).await else {
        return Ok(0);
    };
    let mut ctx = Context::new(Envelope::started_here("deadlines"), tx);
    let expired = unless_panicked(
        "deadline scan panicked",
        inner.handler.expire_deadlines(&mut ctx),
    )
    .await?;
    let (tx, outbox) = ctx.into_parts();
    if expired == 0 && outbox.is_empty() {
        // Nothing was due: nothing to commit (dropping rolls back).
        return Ok(0);
    }
    let ids = commit_with_outbox(inner, tx, &outbox).await?;
    relay(inner, (ids, outbox)).await;
    Ok(expired)
}

/// Relays every outbox row older than `age`, in batches; returns how many.
async fn sweep_once<H>(inner: &Inner<H>, age: Duration) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let mut tx = inner.pool.begin().await?;
        let skip = not_to_sweep(inner);
        let rows = inner
            .store
            .lock_stale_outbox(&mut tx, age, 500, &skip)
            .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let (ids, messages): (Vec<i64>, Vec<_>) = rows.into_iter().unzip();
        inner.publisher.publish_all(&messages).await?;
        inner.store.delete_outbox(&mut tx, &ids).await?;
        tx.commit().await?;
        inner.metrics.swept(ids.len());
        total += ids.len();
    }
}
