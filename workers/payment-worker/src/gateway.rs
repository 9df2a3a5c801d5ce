//! The HTTP client of the payment provider.
//!
//! Errors are classified by what the provider answered, never by text:
//! timeouts, connection failures and 5xx are transient (the retry tiers
//! take them); other 4xx mean the request itself is wrong (permanent).
//! Declines are not errors: they are a business result.

use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;

use tokio::sync::{Semaphore, SemaphorePermit};
use uuid::Uuid;

/// The payment provider, as its circuit breaker and `/readyz` name it.
pub const GATEWAY: runtime::Dependency = runtime::Dependency::named("payment-gateway");

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("payment gateway unavailable: {0}")]
    Unavailable(String),
    /// The provider is still processing a request with the same
    /// idempotency key (an earlier attempt whose answer was lost): asking
    /// again later gets that request's answer. Says nothing of the
    /// provider's health, so its breaker does not count it.
    #[error("payment gateway still processing the same request: {0}")]
    InFlight(String),
    #[error("payment gateway refused the request: {0}")]
    Rejected(String),
}

impl From<GatewayError> for runtime::Failure {
    fn from(e: GatewayError) -> Self {
        match e {
            GatewayError::Unavailable(_) => runtime::Failure::unavailable(GATEWAY, e),
            GatewayError::InFlight(_) => runtime::Failure::transient(e),
            GatewayError::Rejected(_) => runtime::Failure::permanent(e),
        }
    }
}

pub enum ChargeOutcome {
    Charged { charge_id: String },
    Declined { reason: String },
}

#[derive(Debug, Deserialize)]
pub struct GatewayCharge {
    pub id: String,
    pub status: String,
    pub refunded: bool,
}

#[derive(Clone)]
pub struct GatewayClient {
    base: String,
    http: reqwest::Client,
    /// Requests in flight at once, over all messages: each holds a
    /// connection and its buffers, and providers limit them too.
    in_flight: Arc<Semaphore>,
}

impl GatewayClient {
    /// A client of the provider at `settings.url`, over HTTP or HTTPS,
    /// trusting the platform's roots and the CAs of `settings.ca_file`.
    pub fn new(settings: &crate::GatewaySettings) -> anyhow::Result<Self> {
        let max_in_flight = settings.max_in_flight.max(1);
        let mut builder = topology::https::client_builder()
            .timeout(settings.timeout)
            .pool_max_idle_per_host(max_in_flight);
        if let Some(ca_file) = &settings.ca_file {
            let roots = topology::https::extra_roots(ca_file).map_err(anyhow::Error::msg)?;
            builder = builder.tls_certs_merge(roots);
        }
        Ok(Self {
            base: settings.url.trim_end_matches('/').to_owned(),
            http: builder.build()?,
            in_flight: Arc::new(Semaphore::new(max_in_flight)),
        })
    }

    /// Waits for a free request slot; the slot is given back when dropped.
    async fn slot(&self) -> Result<SemaphorePermit<'_>, GatewayError> {
        self.in_flight
            .acquire()
            .await
            .map_err(|e| GatewayError::Unavailable(e.to_string()))
    }

    /// Charges once per order: the idempotency key is derived from the
    /// order, so a retried request returns the first answer.
    pub async fn charge(
        &self,
        order_id: Uuid,
        amount_cents: u64,
        currency: &str,
        payment_method: &str,
    ) -> Result<ChargeOutcome, GatewayError> {
        let _slot = self.slot().await?;
        let response = self
            .http
            .post(format!("{}/charges", self.base))
            .header("Idempotency-Key", format!("charge-{order_id}"))
            .json(&json!({
                "order_id": order_id,
                "amount_cents": amount_cents,
                "currency": currency,
                "payment_method": payment_method,
            }))
            .send()
            .await
            .map_err(unavailable)?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(unavailable)?;
        match status.as_u16() {
            200 | 201 => body["id"]
                .as_str()
                .map(|id| ChargeOutcome::Charged {
                    charge_id: id.to_owned(),
                })
                .ok_or_else(|| GatewayError::Unavailable("charge answer without an id".into())),
            402 => Ok(ChargeOutcome::Declined {
                reason: body["decline_code"]
                    .as_str()
                    .or(body["error"].as_str())
                    .unwrap_or("declined")
                    .to_owned(),
            }),
            code => Err(classify(code, &body)),
        }
    }

    pub async fn refund(&self, charge_id: &str) -> Result<(), GatewayError> {
        let _slot = self.slot().await?;
        let response = self
            .http
            .post(format!("{}/refunds", self.base))
            .header("Idempotency-Key", format!("refund-{charge_id}"))
            .json(&json!({ "charge_id": charge_id }))
            .send()
            .await
            .map_err(unavailable)?;
        let code = response.status().as_u16();
        if (200..300).contains(&code) {
            return Ok(());
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        Err(classify(code, &body))
    }

    pub async fn charges_of(&self, order_id: Uuid) -> Result<Vec<GatewayCharge>, GatewayError> {
        let _slot = self.slot().await?;
        let response = self
            .http
            .get(format!("{}/charges", self.base))
            .query(&[("order_id", order_id.to_string())])
            .send()
            .await
            .map_err(unavailable)?;
        let code = response.status().as_u16();
        let body: serde_json::Value = response.json().await.map_err(unavailable)?;
        if code != 200 {
            return Err(classify(code, &body));
        }
        serde_json::from_value(body["data"].clone())
            .map_err(|e| GatewayError::Unavailable(format!("unreadable charge list: {e}")))
    }
}

fn unavailable(e: reqwest::Error) -> GatewayError {
    GatewayError::Unavailable(e.to_string())
}

fn classify(code: u16, body: &serde_json::Value) -> GatewayError {
    let detail = format!("HTTP {code} {}", body["error"].as_str().unwrap_or(""));
    if code == 409 {
        GatewayError::InFlight(detail)
    } else if code >= 500 || code == 429 || code == 408 {
        GatewayError::Unavailable(detail)
    } else {
        GatewayError::Rejected(detail)
    }
}
