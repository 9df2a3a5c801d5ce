//! Building the application from settings and running it until stopped.

use crate::auth::{self, Authenticator};
use crate::metrics::{Metrics, RequestLabels};
use crate::routes::{self, AppState};
use crate::settings::PublisherSettings;
use crate::shedding::{self, Shedding};
use axum::Router;
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use runtime::Publisher;
use sqlx::postgres::PgPoolOptions;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower_http::timeout::TimeoutLayer;

pub struct Application {
    listener: TcpListener,
    router: Router,
    /// `METRICS_ADDR`'s listener and its router, serving `/metrics` only.
    metrics: Option<(TcpListener, Router)>,
    publisher: Arc<Publisher>,
    /// Ends the backlog watcher with the application.
    token: CancellationToken,
}

impl Application {
    /// Binds the port and prepares the connections. The broker and the
    /// database are connected lazily, so the service starts (and reports
    /// itself not ready) while they are away.
    pub async fn build(settings: PublisherSettings) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&settings.http_addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen on HTTP_ADDR={}: {e}", settings.http_addr)
        })?;
        let publisher =
            Arc::new(Publisher::lazy(settings.amqp_url.expose(), "publisher").own_messages_only());
        if let Err(e) = publisher.ensure_connected().await {
            tracing::warn!(error = %e, "Broker not reachable yet; requests will get 503 until it is");
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.database_pool_size.max(1))
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy_with(runtime::db::connect_options(
                settings.database_url.expose(),
                "publisher",
            )?);
        let shedding = Arc::new(Shedding::new(&settings.shedding));
        let token = CancellationToken::new();
        shedding.watch_backlog(settings.amqp_url.expose().to_owned(), token.clone());
        let metrics = match &settings.metrics_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on METRICS_ADDR={addr}: {e}"))?,
            ),
            None => None,
        };
        let state = AppState {
            publisher: publisher.clone(),
            pool,
            metrics: Arc::new(Metrics::new()),
            max_body_bytes: settings.max_body_bytes,
            shedding,
        };
        let authenticator = Arc::new(Authenticator::start(settings.auth.clone()).await?);
        let metrics = metrics.map(|listener| (listener, metrics_router(state.metrics.clone())));
        let router = router(state, authenticator, settings.request_timeout);
        Ok(Self {
            listener,
            router,
            metrics,
            publisher,
            token,
        })
    }

    /// The port of `METRICS_ADDR`, when set.
    pub fn metrics_port(&self) -> Option<u16> {
        self.metrics
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
            .map(|a| a.port())
    }

    pub fn port(&self) -> u16 {
        self.listener
            .local_addr()
            .map(|a| a.port())
            .unwrap_or_default()
    }

    /// Serves until `shutdown` resolves, then finishes open requests.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(port = self.port(), metrics_port = ?self.metrics_port(), "Publisher listening");
        // The metrics port ends with the API.
        let metrics = self.metrics.map(|(listener, router)| {
            let token = self.token.clone();
            tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(async move { token.cancelled().await })
                    .await
            })
        });
        let served = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await;
        self.token.cancel();
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        served?;
        self.publisher.close().await;
        tracing::info!("Publisher stopped");
        Ok(())
    }
}

pub fn router(
    state: AppState,
    authenticator: Arc<Authenticator>,
    request_timeout: Duration,
) -> Router {
    let max_body = state.max_body_bytes;
    // Every route but the probes knows its caller (the last layer runs
    // first), is held to the caller's rate, and checks the role it needs
    // (`Caller::require`).
    let shedding = state.shedding.clone();
    let authenticated = Router::new()
        .route("/orders", post(routes::place_order))
        .route("/orders/{id}", get(routes::get_order))
        .route("/orders/{id}/cancel", post(routes::cancel_order))
        .route("/inventory/{sku}", get(routes::get_inventory))
        .route("/inventory/{sku}/restock", post(routes::restock))
        .route(
            "/products/{sku}",
            get(routes::get_product).put(routes::set_price),
        )
        .route("/metrics", get(routes::metrics))
        .route_layer(middleware::from_fn_with_state(shedding, shedding::limit))
        .route_layer(middleware::from_fn_with_state(
            authenticator,
            auth::authenticate,
        ));
    Router::new()
        .merge(authenticated)
        .route("/healthz", get(routes::healthz))
        .route("/readyz", get(routes::readyz))
        .fallback(routes::not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .with_state(state)
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = match request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
    {
        Some(p) => route_label(&p),
        None => "unmatched",
    };
    let response = next.run(request).await;
    let labels = RequestLabels {
        route,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    response
}

/// Route labels are a fixed set, so a scan of random paths cannot blow up
/// the number of metric series.
fn route_label(path: &str) -> &'static str {
    match path {
        "/orders" => "/orders",
        "/orders/{id}" => "/orders/{id}",
        "/orders/{id}/cancel" => "/orders/{id}/cancel",
        "/inventory/{sku}" => "/inventory/{sku}",
        "/inventory/{sku}/restock" => "/inventory/{sku}/restock",
        "/products/{sku}" => "/products/{sku}",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

/// `METRICS_ADDR`'s routes: `/metrics` without a key, for a scraper inside
/// the deployment; nothing of the API.
fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(),
                )
            }
        }),
    )
}
