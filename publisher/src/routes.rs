//! The HTTP API of the contract.
//!
//! Writes are commands: validated here, published with a confirm, answered
//! 202 only once the broker has the command. Reads come from the read
//! models the workers keep in PostgreSQL, which this service only reads.

use crate::auth::{Caller, Role};
use crate::domain::{
    FieldError, IdempotencyKey, NewOrder, OrderRequest, PriceRequest, RestockRequest, Sku,
    restock_quantity,
};
use crate::error::ApiError;
use crate::metrics::{CommandLabels, Metrics};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use contract::{CancelOrder, Message, PlaceOrder, Restock, SetPrice};
use runtime::{Outgoing, Publisher};
use serde::de::DeserializeOwned;
use serde_json::json;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Namespace of the ids derived from idempotency keys: the same key always
/// names the same order and the same command message, so a retried request
/// places one order without this service keeping any state.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_6c6f_775f_6964_735f_7631);

#[derive(Clone)]
pub struct AppState {
    pub publisher: Arc<Publisher>,
    pub pool: PgPool,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    pub shedding: Arc<crate::shedding::Shedding>,
}

fn derived_id(name: &str) -> Uuid {
    Uuid::new_v5(&ID_NAMESPACE, name.as_bytes())
}

/// The request's W3C `traceparent`: the command it publishes, and every
/// message that follows from it, continue the caller's trace.
fn traceparent(headers: &HeaderMap) -> Option<&str> {
    headers.get("traceparent").and_then(|v| v.to_str().ok())
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => {
            let raw = v
                .to_str()
                .map_err(|_| ApiError::BadRequest("Idempotency-Key must be ASCII".into()))?;
            IdempotencyKey::parse(raw)
                .map(Some)
                .map_err(ApiError::BadRequest)
        }
    }
}

/// The body as `T`: 413 when too large, 415 when not JSON by content type,
/// 400 when not JSON at all, 422 when JSON of the wrong shape.
fn json_body<T: DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge(state.max_body_bytes)
        } else {
            ApiError::BadJson(rejection.body_text())
        }
    })?;
    let json_content = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json_content {
        return Err(ApiError::UnsupportedMediaType);
    }
    serde_json::from_slice(&body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::BadShape(e.to_string()),
        _ => ApiError::BadJson(e.to_string()),
    })
}

/// Publishes and waits for the broker's confirm; anything else is a 503.
async fn publish(
    state: &AppState,
    command: &'static str,
    message: &Outgoing,
) -> Result<(), ApiError> {
    let started = Instant::now();
    let result = state.publisher.publish(message).await;
    state
        .metrics
        .publish_seconds
        .observe(started.elapsed().as_secs_f64());
    let labels = CommandLabels { command };
    match result {
        Ok(()) => {
            state.metrics.published.get_or_create(&labels).inc();
            Ok(())
        }
        Err(e) => {
            state.metrics.publish_failures.get_or_create(&labels).inc();
            tracing::warn!(command, error = %e, "Command not confirmed by the broker");
            Err(ApiError::Unavailable(format!(
                "the broker did not accept the command: {e}"
            )))
        }
    }
}

fn accepted(location: Option<String>, body: serde_json::Value) -> Response {
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Some(location) = location
        && let Ok(value) = location.parse()
    {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

pub async fn place_order(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Orders)?;
    state.shedding.admit_order()?;
    let key = idempotency_key(&headers)?;
    let request: OrderRequest = json_body(&state, &headers, body)?;
    let order = NewOrder::parse(request).map_err(ApiError::Invalid)?;
    refuse_what_the_catalog_refuses(&state, &order).await?;
    let order_id = match (&key, &caller.customer) {
        (Some(k), None) => derived_id(&format!("order:{}", k.as_str())),
        // A customer's keys are its own: another customer's key names
        // another order.
        (Some(k), Some(customer)) => {
            derived_id(&format!("order:customer:{customer}:{}", k.as_str()))
        }
        // Time-ordered, so the order's rows in every schema (keyed by
        // order id) are inserted at the right edge of their indexes
        // (decision 0015).
        (None, _) => Uuid::now_v7(),
    };
    let command = PlaceOrder {
        order_id,
        customer_email: order.customer_email.as_str().to_owned(),
        currency: order.currency.as_str().to_owned(),
        items: order.items,
        payment_method: order.payment_method,
        placed_by: caller.customer.clone(),
    };
    if key.is_some() {
        refuse_another_body(&state, &command).await?;
    }
    let message = Outgoing::of(&command)
        .correlated(order_id)
        .traced_from(traceparent(&headers));
    // A request retried with its key sends the same command message, which
    // the order queue's inbox then drops; without a key each request is an
    // order of its own and keeps the message's time-ordered id.
    let message = match &key {
        Some(_) => message.with_message_id(derived_id(&format!("{}:{order_id}", PlaceOrder::KIND))),
        None => message,
    };
    publish(&state, PlaceOrder::KIND, &message).await?;
    tracing::info!(order_id = %order_id, "Order accepted");
    Ok(accepted(
        Some(format!("/orders/{order_id}")),
        json!({ "order_id": order_id, "status": "PENDING" }),
    ))
}

/// `422` for lines the catalog already refuses: a SKU it does not sell in
/// the order's currency, or an expected price that is not its own. The
/// saga decides again when it places the order (a price set meanwhile
/// counts); with the read side unavailable the order goes on unchecked.
async fn refuse_what_the_catalog_refuses(
    state: &AppState,
    order: &NewOrder,
) -> Result<(), ApiError> {
    let skus: Vec<&str> = order.items.iter().map(|l| l.sku.as_str()).collect();
    let listed: Vec<(String, i64, String)> = match sqlx::query_as(
        "SELECT sku, unit_price_cents, currency FROM orders.products WHERE sku = ANY($1)",
    )
    .bind(&skus)
    .fetch_all(&state.pool)
    .await
    {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!(error = %e, "Order not checked against the catalog");
            return Ok(());
        }
    };
    let currency = order.currency.as_str();
    let mut errors = Vec::new();
    for (i, line) in order.items.iter().enumerate() {
        let price = listed
            .iter()
            .find(|(sku, _, c)| *sku == line.sku && c == currency)
            .map(|(_, p, _)| *p);
        match (price, line.unit_price_cents) {
            (None, _) => errors.push(FieldError {
                field: format!("items[{i}].sku"),
                message: format!("no product {} is sold in {currency}", line.sku),
            }),
            (Some(price), Some(given)) if i64::try_from(given).ok() != Some(price) => {
                errors.push(FieldError {
                    field: format!("items[{i}].unit_price_cents"),
                    message: format!("the price of {} is {price}", line.sku),
                });
            }
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid(errors))
    }
}

/// A key names one order: once the order it names is stored, a request
/// with that key and another body (email, currency, payment method or
/// lines) is refused with `409` rather than answered with the first order.
/// The check reads the order the saga stored; before it is stored (a few
/// milliseconds after the first `202`) the second body cannot be told
/// apart, and its command is dropped as a duplicate. With the read side
/// unavailable the request goes on unchecked: placing orders does not wait
/// for the read model.
async fn refuse_another_body(state: &AppState, command: &PlaceOrder) -> Result<(), ApiError> {
    let id = command.order_id;
    let stored = async {
        let order: Option<(String, String, String)> = sqlx::query_as(
            "SELECT customer_email, currency, payment_method FROM orders.orders WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&state.pool)
        .await?;
        let Some(order) = order else {
            return Ok(None);
        };
        let lines: Vec<(String, i32, Option<i64>)> = sqlx::query_as(
            "SELECT sku, quantity, unit_price_cents FROM orders.order_items WHERE order_id = $1 ORDER BY line",
        )
        .bind(id)
        .fetch_all(&state.pool)
        .await?;
        Ok::<_, sqlx::Error>(Some((order, lines)))
    };
    let ((email, currency, method), lines) = match stored.await {
        Ok(Some(stored)) => stored,
        Ok(None) => return Ok(()),
        Err(e) => {
            tracing::warn!(order_id = %id, error = %e, "Idempotency key not checked against the stored order");
            return Ok(());
        }
    };
    let same_lines = lines.len() == command.items.len()
        && lines
            .iter()
            .zip(&command.items)
            .all(|((sku, quantity, price), l)| {
                // The stored price is the catalog's; a line without an
                // expected price matches any.
                *sku == l.sku
                    && i64::from(*quantity) == i64::from(l.quantity)
                    && l.unit_price_cents.is_none_or(|given| {
                        price.and_then(|p| u64::try_from(p).ok()) == Some(given)
                    })
            });
    let same = email == command.customer_email
        && currency == command.currency
        && method == command.payment_method
        && same_lines;
    if same {
        Ok(())
    } else {
        Err(ApiError::Conflict(format!(
            "Idempotency-Key was used for order {id} with another body; use a new key for a new order"
        )))
    }
}

fn parse_order_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw)
        .map_err(|_| ApiError::BadRequest(format!("order id {raw:?} is not a UUID")))
}

fn read_model_unavailable(e: sqlx::Error) -> ApiError {
    tracing::warn!(error = %e, "Read model query failed");
    ApiError::Unavailable("the order database is unavailable".into())
}

pub async fn cancel_order(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Orders)?;
    let key = idempotency_key(&headers)?;
    let order_id = parse_order_id(&id)?;
    // A customer's own orders only: another's is not found, so that ids
    // cannot be probed.
    let known: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM orders.orders WHERE id = $1 AND ($2::text IS NULL OR placed_by = $2))",
    )
    .bind(order_id)
    .bind(caller.customer.as_deref())
    .fetch_one(&state.pool)
    .await
    .map_err(read_model_unavailable)?;
    if !known {
        return Err(ApiError::NotFound("order"));
    }
    // Cancelling is idempotent by nature: one message id per order (or per key).
    let message_id = match &key {
        Some(k) => derived_id(&format!("{}:{order_id}:{}", CancelOrder::KIND, k.as_str())),
        None => derived_id(&format!("{}:{order_id}", CancelOrder::KIND)),
    };
    let message = Outgoing::of(&CancelOrder { order_id })
        .with_message_id(message_id)
        .correlated(order_id)
        .traced_from(traceparent(&headers));
    publish(&state, CancelOrder::KIND, &message).await?;
    Ok(accepted(
        Some(format!("/orders/{order_id}")),
        json!({ "order_id": order_id, "cancellation": "requested" }),
    ))
}

pub async fn restock(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(sku): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let key = idempotency_key(&headers)?;
    let sku = Sku::parse(&sku).map_err(|m| ApiError::BadRequest(format!("sku {m}")))?;
    let request: RestockRequest = json_body(&state, &headers, body)?;
    let quantity = restock_quantity(&request).map_err(ApiError::Invalid)?;
    let message_id = match &key {
        Some(k) => derived_id(&format!(
            "{}:{}:{}",
            Restock::KIND,
            sku.as_str(),
            k.as_str()
        )),
        None => Uuid::now_v7(),
    };
    let message = Outgoing::of(&Restock {
        sku: sku.as_str().to_owned(),
        quantity,
    })
    .with_message_id(message_id)
    .traced_from(traceparent(&headers));
    publish(&state, Restock::KIND, &message).await?;
    Ok(accepted(
        Some(format!("/inventory/{}", sku.as_str())),
        json!({ "sku": sku.as_str(), "quantity": quantity }),
    ))
}

pub async fn get_order(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Orders)?;
    let order_id = parse_order_id(&id)?;
    type OrderRow = (String, Option<String>, String, String, i64, bool);
    let order: Option<OrderRow> = sqlx::query_as(
        "SELECT status, reason, customer_email, currency, total_cents, refunded FROM orders.orders \
         WHERE id = $1 AND ($2::text IS NULL OR placed_by = $2)",
    )
    .bind(order_id)
    .bind(caller.customer.as_deref())
    .fetch_optional(&state.pool)
    .await
    .map_err(read_model_unavailable)?;
    let Some((status, reason, customer_email, currency, total_cents, refunded)) = order else {
        return Err(ApiError::NotFound("order"));
    };
    let items: Vec<(String, i32, Option<i64>)> = sqlx::query_as(
        "SELECT sku, quantity, unit_price_cents FROM orders.order_items WHERE order_id = $1 ORDER BY line",
    )
    .bind(order_id)
    .fetch_all(&state.pool)
    .await
    .map_err(read_model_unavailable)?;
    let history: Vec<(String, Option<String>, DateTime<Utc>)> = sqlx::query_as(
        "SELECT status, reason, at FROM orders.order_events WHERE order_id = $1 ORDER BY id",
    )
    .bind(order_id)
    .fetch_all(&state.pool)
    .await
    .map_err(read_model_unavailable)?;
    Ok(Json(json!({
        "order_id": order_id,
        "status": status,
        "reason": reason,
        "customer_email": customer_email,
        "currency": currency,
        "total_cents": total_cents,
        "refunded": refunded,
        "items": items.iter().map(|(sku, q, p)| json!({"sku": sku, "quantity": q, "unit_price_cents": p})).collect::<Vec<_>>(),
        "history": history.iter().map(|(s, r, at)| json!({"status": s, "reason": r, "at": at.to_rfc3339()})).collect::<Vec<_>>(),
    }))
    .into_response())
}

pub async fn get_inventory(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Orders)?;
    let sku = Sku::parse(&sku).map_err(|m| ApiError::BadRequest(format!("sku {m}")))?;
    let row: Option<(i64, i64, i64)> =
        sqlx::query_as("SELECT available, reserved, sold FROM inventory.stock WHERE sku = $1")
            .bind(sku.as_str())
            .fetch_optional(&state.pool)
            .await
            .map_err(read_model_unavailable)?;
    let Some((available, reserved, sold)) = row else {
        return Err(ApiError::NotFound("sku"));
    };
    Ok(Json(
        json!({ "sku": sku.as_str(), "available": available, "reserved": reserved, "sold": sold }),
    )
    .into_response())
}

/// `PUT /products/{sku}`: a command that sets the product's price; orders
/// placed once it is applied are charged so.
pub async fn set_price(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Path(sku): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    let sku = Sku::parse(&sku).map_err(|m| ApiError::BadRequest(format!("sku {m}")))?;
    let request: PriceRequest = json_body(&state, &headers, body)?;
    let (unit_price_cents, currency) = crate::domain::price(&request).map_err(ApiError::Invalid)?;
    let command = SetPrice {
        sku: sku.as_str().to_owned(),
        unit_price_cents,
        currency: currency.as_str().to_owned(),
    };
    let message = Outgoing::of(&command).traced_from(traceparent(&headers));
    publish(&state, SetPrice::KIND, &message).await?;
    tracing::info!(sku = sku.as_str(), unit_price_cents, currency = currency.as_str(), caller = %caller.name, "Price set");
    Ok(accepted(
        Some(format!("/products/{}", sku.as_str())),
        json!({ "sku": sku.as_str(), "unit_price_cents": unit_price_cents, "currency": currency.as_str() }),
    ))
}

/// `GET /products/{sku}`: the product's price as the catalog has it.
pub async fn get_product(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(sku): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Orders)?;
    let sku = Sku::parse(&sku).map_err(|m| ApiError::BadRequest(format!("sku {m}")))?;
    let row: Option<(i64, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT unit_price_cents, currency, updated_at FROM orders.products WHERE sku = $1",
    )
    .bind(sku.as_str())
    .fetch_optional(&state.pool)
    .await
    .map_err(read_model_unavailable)?;
    let Some((unit_price_cents, currency, updated_at)) = row else {
        return Err(ApiError::NotFound("product"));
    };
    Ok(Json(json!({
        "sku": sku.as_str(),
        "unit_price_cents": unit_price_cents,
        "currency": currency,
        "updated_at": updated_at.to_rfc3339(),
    }))
    .into_response())
}

pub async fn healthz() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// Ready when the broker and the database both answer, within a second each.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let wait = Duration::from_secs(1);
    let broker = matches!(
        tokio::time::timeout(wait, state.publisher.ensure_connected()).await,
        Ok(Ok(()))
    );
    let blocked = broker && state.publisher.is_blocked().await;
    let database = matches!(
        tokio::time::timeout(wait, sqlx::query("SELECT 1").execute(&state.pool)).await,
        Ok(Ok(_))
    );
    let status = if broker && database && !blocked {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let broker = if blocked { "blocked" } else { word(broker) };
    (
        status,
        Json(json!({ "broker": broker, "database": word(database) })),
    )
        .into_response()
}

pub async fn metrics(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::NotFound("route")
}
