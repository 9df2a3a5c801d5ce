//! What a worker counts, and the small HTTP server that shows it
//! (`METRICS_ADDR`): `/metrics` (OpenMetrics, for Prometheus), `/healthz`
//! (the process answers) and `/readyz` (consuming, and the database
//! answers), for orchestrators' probes and operators' dashboards.
//!
//! Every counter is moved where the outcome is settled: a message counts
//! as applied or duplicate once its transaction committed, as retried or
//! dead-lettered once the broker confirmed its copy, as requeued once it
//! was given back. A chunk rolled back and run again alone counts once.

use crate::breaker::BreakerState;
use crate::handler::Dependency;
use crate::health::Health;
use crate::routing::DeadKind;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How a consumed message ended.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// Its effect committed.
    Applied,
    /// Its id was in the inbox already: acked without effect.
    Duplicate,
    /// Moved to a retry tier.
    Retried,
    /// Moved to the dead queue.
    DeadLettered,
    /// Given back to its queue: moving it failed.
    Requeued,
    /// Sent to wait in the first retry tier without spending an attempt:
    /// the dependency it failed on has its circuit breaker open.
    HeldBack,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Duplicate => "duplicate",
            Self::Retried => "retried",
            Self::DeadLettered => "dead_lettered",
            Self::Requeued => "requeued",
            Self::HeldBack => "held_back",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DependencyLabels {
    dependency: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// A worker's counters, labelled with its name.
pub struct WorkerMetrics {
    registry: Registry,
    messages: Family<OutcomeLabels, Counter>,
    dead_letters: Family<KindLabels, Counter>,
    relayed: Counter,
    swept: Counter,
    unroutable: Counter,
    transaction_seconds: Histogram,
    consuming: Gauge,
    breaker_open: Family<DependencyLabels, Gauge>,
    /// What `/readyz` reports.
    pub health: Health,
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerMetrics").finish_non_exhaustive()
    }
}

impl WorkerMetrics {
    /// `stall_after`: how long work may be in hand with nothing settled
    /// before `/readyz` reports the consumer stalled.
    pub fn new(worker: &'static str, stall_after: Duration) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "orderflow_worker",
            [("worker".into(), worker.into())].into_iter(),
        );
        let messages = Family::<OutcomeLabels, Counter>::default();
        let dead_letters = Family::<KindLabels, Counter>::default();
        let relayed = Counter::default();
        let swept = Counter::default();
        let unroutable = Counter::default();
        let transaction_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        let consuming = Gauge::default();
        let breaker_open = Family::<DependencyLabels, Gauge>::default();
        registry.register(
            "messages",
            "Consumed messages by outcome: applied, duplicate, retried, dead_lettered, requeued, held_back",
            messages.clone(),
        );
        registry.register(
            "dead_letters",
            "Messages moved to the dead queue, by x-error-kind",
            dead_letters.clone(),
        );
        registry.register(
            "outbox_relayed",
            "Emitted messages relayed right after their transaction",
            relayed.clone(),
        );
        registry.register(
            "outbox_swept",
            "Emitted messages relayed by the sweeper (left by a crash or a failed relay)",
            swept.clone(),
        );
        registry.register(
            "outbox_unroutable",
            "Attempts to relay an outbox row the broker could not route or refused; the row is kept and tried again at each sweep",
            unroutable.clone(),
        );
        registry.register(
            "transaction_seconds",
            "Time from a chunk's first statement to its commit",
            transaction_seconds.clone(),
        );
        registry.register(
            "consuming",
            "1 while the worker is subscribed to its queue",
            consuming.clone(),
        );
        registry.register(
            "breaker_open",
            "1 while the dependency's circuit breaker is open or half-open: the worker takes no messages",
            breaker_open.clone(),
        );
        Self {
            registry,
            messages,
            dead_letters,
            relayed,
            swept,
            unroutable,
            transaction_seconds,
            consuming,
            breaker_open,
            health: Health::new(stall_after),
        }
    }

    pub fn settled(&self, outcome: Outcome, count: usize) {
        self.health.advanced();
        if count > 0 {
            self.messages
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.as_str(),
                })
                .inc_by(count as u64);
        }
    }

    pub fn dead_lettered(&self, kind: DeadKind) {
        self.settled(Outcome::DeadLettered, 1);
        self.dead_letters
            .get_or_create(&KindLabels {
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn relayed(&self, count: usize) {
        self.relayed.inc_by(count as u64);
    }

    pub fn swept(&self, count: usize) {
        self.swept.inc_by(count as u64);
    }

    pub fn unroutable(&self, count: usize) {
        self.unroutable.inc_by(count as u64);
    }

    pub fn transaction(&self, took: Duration) {
        self.transaction_seconds.observe(took.as_secs_f64());
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.set(i64::from(consuming));
        self.health.set_consuming(consuming);
    }

    /// A dependency's breaker changed state.
    pub fn breaker(&self, dependency: Dependency, state: BreakerState) {
        self.breaker_open
            .get_or_create(&DependencyLabels {
                dependency: dependency.name(),
            })
            .set(i64::from(state != BreakerState::Closed));
        self.health.set_breaker(dependency, state);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone)]
struct Observed {
    metrics: Arc<WorkerMetrics>,
    /// Set once the worker has reached its database: before, not ready.
    pool: Arc<OnceLock<PgPool>>,
}

/// The server on `METRICS_ADDR`, from the worker's first moments (while it
/// still waits for its database, `/healthz` answers and `/readyz` says what
/// is missing) until its token is cancelled.
pub(crate) struct Observer {
    addr: Option<SocketAddr>,
    metrics: Arc<WorkerMetrics>,
    pool: Arc<OnceLock<PgPool>>,
    /// Cancelled when the worker stops; the worker's own token.
    pub(crate) token: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Observer {
    /// Not serving yet; [`Observer::start`] binds `addr`, if any.
    pub(crate) fn new(addr: Option<SocketAddr>, metrics: Arc<WorkerMetrics>) -> Self {
        Self {
            addr,
            metrics,
            pool: Arc::new(OnceLock::new()),
            token: CancellationToken::new(),
            task: None,
        }
    }

    /// Binds and serves, once; a port taken is bad configuration.
    pub(crate) async fn start(&mut self, worker: &str) -> anyhow::Result<()> {
        let Some(addr) = self.addr else {
            return Ok(());
        };
        if self.task.is_some() {
            return Ok(());
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on METRICS_ADDR={addr}: {e}"))?;
        tracing::info!(worker, %addr, "Serving /metrics, /healthz and /readyz");
        self.task = Some(tokio::spawn(serve(
            listener,
            Observed {
                metrics: self.metrics.clone(),
                pool: self.pool.clone(),
            },
            self.token.clone(),
        )));
        Ok(())
    }

    /// The database readiness asks from now on.
    pub(crate) fn database_reached(&self, pool: &PgPool) {
        let _ = self.pool.set(pool.clone());
    }

    /// Stops serving and waits until the port is closed.
    pub(crate) async fn stop(&mut self) {
        self.token.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `token`
/// is cancelled.
async fn serve(listener: tokio::net::TcpListener, observed: Observed, token: CancellationToken) {
    let router = Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(alive))
        .route("/readyz", get(ready))
        .with_state(observed);
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::warn!(error = %e, "The metrics server stopped");
    }
}

async fn render(State(observed): State<Observed>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        observed.metrics.render(),
    )
        .into_response()
}

/// Alive: the process answers. The same body as the publisher's.
async fn alive() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        "{\"status\":\"ok\"}\n",
    )
        .into_response()
}

/// Ready while subscribed to the queue, not blocked by the broker, every
/// circuit breaker closed, the consumer making progress, and the database
/// answering within a second; the body says which is missing.
async fn ready(State(observed): State<Observed>) -> Response {
    let database = match observed.pool.get() {
        Some(pool) => tokio::time::timeout(
            Duration::from_secs(1),
            sqlx::query("SELECT 1").execute(pool),
        )
        .await
        .is_ok_and(|r| r.is_ok()),
        None => false,
    };
    let readiness = observed.metrics.health.readiness(Instant::now());
    let status = if readiness.ready(database) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        readiness.body(database),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn not_ready_while_not_consuming_or_without_a_database() {
        // Nothing listens on port 1: the database does not answer.
        let pool = sqlx::postgres::PgPoolOptions::new()
            .acquire_timeout(Duration::from_millis(500))
            .connect_lazy("postgres://postgres@127.0.0.1:1/none")
            .unwrap();
        let metrics = Arc::new(WorkerMetrics::new("test-worker", Duration::from_secs(60)));
        let observed = Observed {
            metrics: metrics.clone(),
            pool: Arc::new(OnceLock::new()),
        };
        // Not reached yet, then unreachable.
        let response = ready(State(observed.clone())).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let _ = observed.pool.set(pool);
        let response = ready(State(observed.clone())).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        metrics.set_consuming(true);
        let response = ready(State(observed)).await;
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        let body = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap().trim(),
            r#"{"broker":"ok","database":"unavailable","consumer":"ok","breakers":{}}"#
        );
    }

    #[test]
    fn outcomes_and_kinds_are_labelled_with_the_worker() {
        let metrics = WorkerMetrics::new("test-worker", Duration::from_secs(60));
        metrics.settled(Outcome::Applied, 3);
        metrics.settled(Outcome::Duplicate, 0);
        metrics.dead_lettered(DeadKind::DeliveryLimit);
        let text = metrics.render();
        assert!(
            text.contains(
                r#"orderflow_worker_messages_total{worker="test-worker",outcome="applied"} 3"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"outcome="duplicate""#), "{text}");
        assert!(
            text.contains(r#"orderflow_worker_dead_letters_total{worker="test-worker",kind="delivery-limit"} 1"#),
            "{text}"
        );
    }
}
