//! `dlq serve`: the failed-message console, a web page and a JSON API over
//! the same library as the command line, with its guarantees: a replay is
//! confirmed by the broker before its dead copy is acked, a purge archived
//! before it, an applied message is not replayed again, replays count
//! against their budget, and every action is a row of the audit trail
//! under the name of the authenticated operator.
//!
//! Every page and API call needs the `admin` role of the publisher's
//! authentication (`API_KEYS`, JWTs). A browser signs in once with its
//! token, kept in an `HttpOnly`, `SameSite=Strict` cookie; scripts send
//! `Authorization: Bearer`. Every change is a `POST` that first shows what
//! it would do (a dry run) and acts only once confirmed.

mod actions;
mod pages;

use crate::{Dlq, Selectors, Snapshot, dead_queue};
use axum::Router;
use axum::extract::{Form, Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use contract::Domain;
use publisher::auth::{Authenticator, Role};
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

/// The cookie that carries a signed-in browser's token.
const COOKIE: &str = "orderflow_console";
/// Messages of a dead queue read to group them: memory stays flat however
/// deep the queue is.
pub const SAMPLE: usize = 1000;
/// Messages listed on a queue's page.
pub const LISTED: usize = 100;

/// What the console serves from.
pub struct Console {
    pub dlq: Dlq,
    pub authenticator: Authenticator,
    pub inbox_retention: Duration,
    pub max_replays: i64,
}

type Shared = Arc<Console>;

/// The console's routes; every one but the sign-in page, the stylesheet
/// and `/healthz` behind authentication.
pub fn router(console: Console) -> Router {
    let shared = Arc::new(console);
    let private = Router::new()
        .route("/", get(queues_page))
        .route("/queues/{queue}", get(queue_page))
        .route("/queues/{queue}/messages/{id}", get(message_page))
        .route("/queues/{queue}/replay", post(actions::replay))
        .route("/queues/{queue}/purge", post(actions::purge))
        .route("/archive", get(archive_page))
        .route("/archive/restore", post(actions::restore))
        .route("/audit", get(audit_page))
        .route("/logout", post(logout))
        .route("/api/queues", get(api_queues))
        .route("/api/queues/{queue}", get(api_queue))
        .route("/api/queues/{queue}/messages/{id}", get(api_message))
        .route("/api/audit", get(api_audit))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            authenticate,
        ));
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/console.css", get(stylesheet))
        .route("/healthz", get(|| async { "ok" }))
        .merge(private)
        .with_state(shared)
}

/// Serves the console on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    console: Console,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(console))
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// A failure shown as a page (or JSON under `/api`).
struct Failure {
    status: StatusCode,
    message: String,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new(StatusCode::BAD_GATEWAY, format!("{e:#}"))
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, pages::failure(self.status, &self.message)).into_response()
    }
}

/// The caller of a request: its bearer token or the sign-in cookie, with
/// the `admin` role. A browser without one is sent to the sign-in page.
async fn authenticate(State(console): State<Shared>, mut request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/api/");
    let headers = with_cookie_as_bearer(request.headers());
    let caller = match console.authenticator.caller(&headers).await {
        Ok(caller) => caller,
        Err(e) if api => return e.into_response(),
        Err(_) => return Redirect::to("/login").into_response(),
    };
    if let Err(e) = caller.require(Role::Admin) {
        return if api {
            e.into_response()
        } else {
            Failure::new(StatusCode::FORBIDDEN, e.to_string()).into_response()
        };
    }
    // A change comes from this console's own pages: a form posted from
    // another site is refused (the cookie is `SameSite=Strict` as well).
    if request.method() == axum::http::Method::POST && !same_origin(request.headers()) {
        return Failure::new(
            StatusCode::FORBIDDEN,
            "a change must come from the console's own pages",
        )
        .into_response();
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}

/// The request's headers, with the sign-in cookie's token as its bearer
/// token when it has none of its own.
fn with_cookie_as_bearer(headers: &HeaderMap) -> HeaderMap {
    let mut headers = headers.clone();
    if headers.contains_key(header::AUTHORIZATION) {
        return headers;
    }
    if let Some(token) = cookie(&headers, COOKIE)
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        headers.insert(header::AUTHORIZATION, value);
    }
    headers
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
}

/// Whether a `POST` comes from this host: its `Origin` (or, without one,
/// its `Referer`) names the host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    match from {
        // Scripts with a bearer token send neither.
        None => headers.contains_key(header::AUTHORIZATION) && cookie(headers, COOKIE).is_none(),
        Some(from) => from
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next() == Some(host))
            .unwrap_or(false),
    }
}

async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
}

async fn login_page() -> impl IntoResponse {
    pages::login(None)
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(console): State<Shared>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim();
    let mut headers = HeaderMap::new();
    let refused = |why: &str| (StatusCode::UNAUTHORIZED, pages::login(Some(why))).into_response();
    let Ok(value) = format!("Bearer {token}").parse() else {
        return refused("that is not a token");
    };
    headers.insert(header::AUTHORIZATION, value);
    match console.authenticator.caller(&headers).await {
        Ok(caller) if caller.require(Role::Admin).is_ok() => {
            let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response()
        }
        Ok(_) => refused("this token does not have the admin role"),
        Err(_) => refused("unknown or invalid token"),
    }
}

async fn logout() -> Response {
    let cookie = format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    ([(header::SET_COOKIE, cookie)], Redirect::to("/login")).into_response()
}

/// One dead queue as the front page shows it.
#[derive(serde::Serialize)]
struct QueueRow {
    queue: String,
    depth: u32,
    oldest_age_seconds: Option<i64>,
}

async fn dead_queues(console: &Console) -> Result<Vec<QueueRow>, Failure> {
    let mut rows = Vec::new();
    for domain in Domain::ALL {
        let queue = contract::names::dead_queue(domain.queue());
        let oldest = Snapshot::take_at_most(&console.dlq.connection, &queue, 1).await?;
        let depth = oldest.depth;
        let age = oldest
            .messages
            .first()
            .and_then(|m| m.age(chrono::Utc::now()))
            .map(|a| a.num_seconds());
        oldest.release().await;
        rows.push(QueueRow {
            queue,
            depth,
            oldest_age_seconds: age,
        });
    }
    Ok(rows)
}

async fn queues_page(State(console): State<Shared>) -> Result<Response, Failure> {
    let rows = dead_queues(&console).await?;
    Ok(pages::queues(&rows).into_response())
}

async fn api_queues(State(console): State<Shared>) -> Result<Response, Failure> {
    Ok(axum::Json(dead_queues(&console).await?).into_response())
}

/// A dead queue's first messages and their groups.
struct QueueView {
    queue: String,
    depth: u32,
    sampled: usize,
    groups: Vec<Group>,
    /// The page of messages listed, from `after`.
    messages: Vec<serde_json::Value>,
    after: Option<String>,
    /// The cursor of the next page, if there are more.
    next: Option<String>,
}

/// `?after=<message id>`: the page of messages after it.
#[derive(Deserialize, Default)]
struct PageQuery {
    after: Option<String>,
}

/// Messages alike: the same kind of failure, type and error.
#[derive(serde::Serialize)]
struct Group {
    kind: String,
    message_type: String,
    error: String,
    count: usize,
}

async fn queue_view(
    console: &Console,
    queue: &str,
    after: Option<String>,
) -> Result<QueueView, Failure> {
    let (queue, _) = known_dead_queue(queue)?;
    let snapshot = Snapshot::take_at_most(&console.dlq.connection, &queue, SAMPLE).await?;
    let all: Vec<_> = snapshot.messages.iter().collect();
    let now = chrono::Utc::now();
    let mut groups: Vec<Group> = Vec::new();
    for m in &all {
        match groups
            .iter_mut()
            .find(|g| g.kind == m.error_kind && g.message_type == m.kind && g.error == m.error)
        {
            Some(g) => g.count += 1,
            None => groups.push(Group {
                kind: m.error_kind.clone(),
                message_type: m.kind.clone(),
                error: m.error.clone(),
                count: 1,
            }),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    let (depth, sampled) = (snapshot.depth, all.len());
    snapshot.release().await;
    let request = crate::PageRequest {
        limit: LISTED,
        after: after.clone(),
        ..crate::PageRequest::default()
    };
    let page = crate::page(
        &console.dlq.connection,
        &queue,
        &Selectors::default(),
        &request,
    )
    .await
    .map_err(|e| Failure::new(StatusCode::NOT_FOUND, format!("{e:#}")))?;
    Ok(QueueView {
        queue,
        depth,
        sampled,
        groups,
        messages: page.messages.iter().map(|m| m.summary(now)).collect(),
        after,
        next: page.next,
    })
}

async fn queue_page(
    State(console): State<Shared>,
    Path(queue): Path<String>,
    axum::extract::Query(page): axum::extract::Query<PageQuery>,
) -> Result<Response, Failure> {
    let view = queue_view(&console, &queue, page.after).await?;
    Ok(pages::queue(&view).into_response())
}

async fn api_queue(
    State(console): State<Shared>,
    Path(queue): Path<String>,
    axum::extract::Query(page): axum::extract::Query<PageQuery>,
) -> Result<Response, Failure> {
    let view = queue_view(&console, &queue, page.after).await?;
    Ok(axum::Json(json!({
        "queue": view.queue,
        "depth": view.depth,
        "sampled": view.sampled,
        "groups": view.groups,
        "messages": view.messages,
        "next_cursor": view.next,
    }))
    .into_response())
}

async fn one_message(
    console: &Console,
    queue: &str,
    id: &str,
) -> Result<(String, serde_json::Value, serde_json::Value), Failure> {
    let (queue, _) = known_dead_queue(queue)?;
    let m = crate::find(&console.dlq.connection, &queue, id)
        .await?
        .ok_or_else(|| {
            Failure::new(
                StatusCode::NOT_FOUND,
                format!("message {id} is not in {queue} (replayed or purged meanwhile?)"),
            )
        })?;
    Ok((queue, m.summary(chrono::Utc::now()), m.details()))
}

async fn message_page(
    State(console): State<Shared>,
    Path((queue, id)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let (queue, summary, details) = one_message(&console, &queue, &id).await?;
    Ok(pages::message(&queue, &summary, &details).into_response())
}

async fn api_message(
    State(console): State<Shared>,
    Path((queue, id)): Path<(String, String)>,
) -> Result<Response, Failure> {
    let (_, summary, details) = one_message(&console, &queue, &id).await?;
    Ok(axum::Json(json!({"summary": summary, "details": details})).into_response())
}

/// `name` as a dead queue of a known domain, or `404`.
fn known_dead_queue(name: &str) -> Result<(String, Domain), Failure> {
    dead_queue(name).map_err(|e| Failure::new(StatusCode::NOT_FOUND, e.to_string()))
}

/// A purged message still in the archive.
#[derive(sqlx::FromRow, serde::Serialize)]
pub(crate) struct ArchivedRow {
    id: i64,
    queue: String,
    message_id: Option<String>,
    purged_by: String,
    reason: Option<String>,
    purged_at: chrono::DateTime<chrono::Utc>,
}

async fn archive_page(State(console): State<Shared>) -> Result<Response, Failure> {
    let rows: Vec<ArchivedRow> = sqlx::query_as(
        "SELECT id, queue, message_id, purged_by, reason, purged_at FROM dlq.archive \
         WHERE restored_at IS NULL ORDER BY id DESC LIMIT 200",
    )
    .fetch_all(&console.dlq.pool)
    .await
    .map_err(anyhow::Error::from)?;
    Ok(pages::archive(&rows).into_response())
}

/// One row of the audit trail.
#[derive(sqlx::FromRow, serde::Serialize)]
pub(crate) struct AuditRow {
    at: chrono::DateTime<chrono::Utc>,
    operator: String,
    action: String,
    queue: String,
    message_id: Option<String>,
    detail: serde_json::Value,
}

async fn audit_rows(console: &Console) -> Result<Vec<AuditRow>, Failure> {
    Ok(sqlx::query_as(
        "SELECT at, operator, action, queue, message_id, detail FROM dlq.audit ORDER BY id DESC LIMIT 200",
    )
    .fetch_all(&console.dlq.pool)
    .await
    .map_err(anyhow::Error::from)?)
}

async fn audit_page(State(console): State<Shared>) -> Result<Response, Failure> {
    Ok(pages::audit(&audit_rows(&console).await?).into_response())
}

async fn api_audit(State(console): State<Shared>) -> Result<Response, Failure> {
    Ok(axum::Json(audit_rows(&console).await?).into_response())
}
