//! A payment provider simulator that behaves like a real one where it
//! matters to orderflow: idempotency keys (a repeated key never charges
//! twice), `402` declines for `pm_card_chargeDeclined`, refunds, an audit
//! listing, and injectable trouble (`503`s and latency), adjustable at run
//! time through `POST /_sim/config` so tests can take it "down" and "up".

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
pub mod tls;

use runtime::config::{ConfigError, Source, Var};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const DECLINED_METHOD: &str = "pm_card_chargeDeclined";

/// `SIM_TLS_CERT` and `SIM_TLS_KEY`: both, read and checked now, or neither.
fn tls_files(source: &Source) -> Result<Option<tls::TlsFiles>, ConfigError> {
    let path = |raw: &str| Ok(std::path::PathBuf::from(raw));
    let cert = source.optional(SIM_TLS_CERT, path)?;
    let key = source.optional(SIM_TLS_KEY, path)?;
    let files = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => tls::TlsFiles { cert, key },
        (Some(_), None) => {
            return Err(settings_error(
                SIM_TLS_KEY,
                source,
                "SIM_TLS_CERT is set: set its key too",
            ));
        }
        (None, Some(_)) => {
            return Err(settings_error(
                SIM_TLS_CERT,
                source,
                "SIM_TLS_KEY is set: set its certificate too",
            ));
        }
    };
    source.parse(SIM_TLS_CERT, |_| files.server_config().map(|_| ()))?;
    Ok(Some(files))
}

fn settings_error(var: Var, source: &Source, reason: &str) -> ConfigError {
    ConfigError {
        name: var.name,
        value: source.raw(var).to_owned(),
        reason: reason.to_owned(),
    }
}

/// Trouble to inject.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Trouble {
    /// Share of requests answered `503` without effect, 0..=1.
    pub error_rate: f64,
    /// Added to every answer.
    pub latency_ms: u64,
    /// A charge lands this long after its request, whether or not the
    /// caller still waits for the answer (a provider that completes a
    /// charge whose answer was lost); 0: at once.
    #[serde(default)]
    pub late_charge_ms: u64,
}

const HTTP_ADDR: Var = Var::new("HTTP_ADDR", "127.0.0.1:8090");
const SIM_ERROR_RATE: Var = Var::new("SIM_ERROR_RATE", "0");
const SIM_LATENCY_MS: Var = Var::new("SIM_LATENCY_MS", "0");
const SIM_LATE_CHARGE_MS: Var = Var::new("SIM_LATE_CHARGE_MS", "0");
/// A PEM certificate chain and its key: set both to serve HTTPS.
const SIM_TLS_CERT: Var = Var::optional("SIM_TLS_CERT");
const SIM_TLS_KEY: Var = Var::optional("SIM_TLS_KEY");

/// The simulator's settings tree.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `HTTP_ADDR`.
    pub http_addr: String,
    /// `SIM_ERROR_RATE` and `SIM_LATENCY_MS`.
    pub trouble: Trouble,
    /// HTTPS with these (`SIM_TLS_CERT`, `SIM_TLS_KEY`), checked at start;
    /// plain HTTP without.
    pub tls: Option<tls::TlsFiles>,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Source::environment())
    }

    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            http_addr: source.parse(HTTP_ADDR, runtime::config::host_port)?,
            trouble: Trouble {
                error_rate: source.parse(SIM_ERROR_RATE, |raw| {
                    let rate: f64 = raw.parse().map_err(|e| format!("{e}"))?;
                    if (0.0..=1.0).contains(&rate) {
                        Ok(rate)
                    } else {
                        Err("must be between 0 and 1".to_owned())
                    }
                })?,
                latency_ms: source.get(SIM_LATENCY_MS)?,
                late_charge_ms: source.get(SIM_LATE_CHARGE_MS)?,
            },
            tls: tls_files(source)?,
        })
    }

    pub fn log_effective(&self) {
        tracing::info!(
            http_addr = %self.http_addr,
            tls = ?self.tls,
            error_rate = self.trouble.error_rate,
            latency_ms = self.trouble.latency_ms,
            late_charge_ms = self.trouble.late_charge_ms,
            "Effective configuration"
        );
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Charge {
    pub id: String,
    pub order_id: String,
    pub amount_cents: u64,
    pub currency: String,
    pub payment_method: String,
    pub status: &'static str,
    pub refunded: bool,
    pub refund_id: Option<String>,
}

#[derive(Default)]
struct Ledger {
    charges: Vec<Charge>,
    /// Idempotency key → the answer given the first time.
    answers: HashMap<String, (u16, Value)>,
    /// Keys of requests still being processed (a late charge): a second
    /// request with one is answered `409`, as real providers do.
    in_flight: std::collections::HashSet<String>,
}

#[derive(Clone)]
pub struct Gateway {
    ledger: Arc<Mutex<Ledger>>,
    trouble: Arc<Mutex<Trouble>>,
}

impl Gateway {
    pub fn new(trouble: Trouble) -> Self {
        Self {
            ledger: Arc::default(),
            trouble: Arc::new(Mutex::new(trouble)),
        }
    }

    pub fn router(self) -> Router {
        Router::new()
            .route("/charges", post(create_charge).get(list_charges))
            .route("/refunds", post(create_refund))
            .route("/_sim/config", post(set_trouble).get(get_trouble))
            .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(self)
    }

    fn trouble(&self) -> Trouble {
        self.trouble.lock().map(|t| *t).unwrap_or_default()
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"error": code, "message": message}))).into_response()
}

/// Applies latency, then maybe answers 503 before doing anything. Only the
/// calls that move money fail; the audit listing stays readable so tests can
/// check what was charged.
async fn trouble(gateway: &Gateway) -> Option<Response> {
    let t = gateway.trouble();
    if t.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(t.latency_ms)).await;
    }
    if t.error_rate > 0.0 && rand::random::<f64>() < t.error_rate {
        return Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "injected failure",
        ));
    }
    None
}

#[derive(Deserialize)]
struct ChargeRequest {
    order_id: String,
    amount_cents: u64,
    currency: String,
    payment_method: String,
}

async fn create_charge(
    State(gateway): State<Gateway>,
    headers: HeaderMap,
    body: Result<Json<ChargeRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(r) = trouble(&gateway).await {
        return r;
    }
    let Some(key) = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "Idempotency-Key header is required",
        );
    };
    let Ok(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body must be a charge request",
        );
    };
    if req.amount_cents == 0 || req.currency.len() != 3 {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "amount must be positive and currency a 3-letter code",
        );
    }
    let late = gateway.trouble().late_charge_ms;
    if late == 0 {
        return record_charge(&gateway, key, req);
    }
    if let Some(refused) = hold_key(&gateway, &key) {
        return refused;
    }
    // Spawned: the charge lands even if the caller stops waiting.
    let landing = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(late)).await;
        let answer = record_charge(&gateway, key.clone(), req);
        if let Ok(mut ledger) = gateway.ledger.lock() {
            ledger.in_flight.remove(&key);
        }
        answer
    });
    landing
        .await
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "charge lost"))
}

/// Marks `key` as being processed; `409` when a request with it is already
/// in flight, the first answer when one was given.
fn hold_key(gateway: &Gateway, key: &str) -> Option<Response> {
    let Ok(mut ledger) = gateway.ledger.lock() else {
        return Some(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger unavailable",
        ));
    };
    if let Some((status, body)) = ledger.answers.get(key) {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
        return Some((status, Json(body.clone())).into_response());
    }
    if !ledger.in_flight.insert(key.to_owned()) {
        return Some(error(
            StatusCode::CONFLICT,
            "idempotency_key_in_use",
            "a request with this Idempotency-Key is still being processed; retry later",
        ));
    }
    None
}

/// Charges (or declines) once per idempotency key; a repeated key gets the
/// first answer again.
fn record_charge(gateway: &Gateway, key: String, req: ChargeRequest) -> Response {
    let Ok(mut ledger) = gateway.ledger.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger unavailable",
        );
    };
    if let Some((status, body)) = ledger.answers.get(&key) {
        let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::OK);
        return (status, Json(body.clone())).into_response();
    }
    let (status, body) = if req.payment_method == DECLINED_METHOD {
        (
            StatusCode::PAYMENT_REQUIRED,
            json!({"error": "card_declined", "decline_code": "generic_decline", "message": "Your card was declined."}),
        )
    } else {
        let charge = Charge {
            id: format!("ch_{}", uuid::Uuid::new_v4().simple()),
            order_id: req.order_id,
            amount_cents: req.amount_cents,
            currency: req.currency,
            payment_method: req.payment_method,
            status: "succeeded",
            refunded: false,
            refund_id: None,
        };
        let body = serde_json::to_value(&charge).unwrap_or_default();
        ledger.charges.push(charge);
        (StatusCode::CREATED, body)
    };
    ledger.answers.insert(key, (status.as_u16(), body.clone()));
    (status, Json(body)).into_response()
}

#[derive(Deserialize)]
struct RefundRequest {
    charge_id: String,
}

async fn create_refund(
    State(gateway): State<Gateway>,
    body: Result<Json<RefundRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if let Some(r) = trouble(&gateway).await {
        return r;
    }
    let Ok(Json(req)) = body else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body must be {\"charge_id\": ...}",
        );
    };
    let Ok(mut ledger) = gateway.ledger.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger unavailable",
        );
    };
    let Some(charge) = ledger.charges.iter_mut().find(|c| c.id == req.charge_id) else {
        return error(
            StatusCode::NOT_FOUND,
            "no_such_charge",
            "no charge with that id",
        );
    };
    // A charge is refunded at most once; asking again returns the same refund.
    let status = if charge.refunded {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    if !charge.refunded {
        charge.refunded = true;
        charge.refund_id = Some(format!("re_{}", uuid::Uuid::new_v4().simple()));
    }
    let refund = json!({"id": charge.refund_id, "charge_id": charge.id, "amount_cents": charge.amount_cents});
    (status, Json(refund)).into_response()
}

#[derive(Deserialize)]
struct ChargeFilter {
    order_id: Option<String>,
}

async fn list_charges(
    State(gateway): State<Gateway>,
    Query(filter): Query<ChargeFilter>,
) -> Response {
    let Ok(ledger) = gateway.ledger.lock() else {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "ledger unavailable",
        );
    };
    let charges: Vec<&Charge> = ledger
        .charges
        .iter()
        .filter(|c| filter.order_id.as_ref().is_none_or(|o| &c.order_id == o))
        .collect();
    Json(json!({"data": charges})).into_response()
}

async fn set_trouble(State(gateway): State<Gateway>, Json(new): Json<Trouble>) -> Response {
    if !(0.0..=1.0).contains(&new.error_rate) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "error_rate must be between 0 and 1",
        );
    }
    if let Ok(mut t) = gateway.trouble.lock() {
        *t = new;
    }
    Json(new).into_response()
}

async fn get_trouble(State(gateway): State<Gateway>) -> Response {
    Json(gateway.trouble()).into_response()
}
