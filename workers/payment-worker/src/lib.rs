//! The payment domain: charge an order once, refund or void it once.
//!
//! A charge is asked of the gateway before the handler's transaction
//! (`Handler::prepare`), so slow gateway calls overlap and hold no database
//! connection; its idempotency key is derived from the order, so a retried
//! or duplicated charge never charges twice. The outcome is then recorded
//! under the payment row's lock. A refund or void that got there first (the
//! order gave up meanwhile) is honoured: a charge that landed anyway is
//! refunded at once. Refunds call the gateway under the row lock, so a
//! second refund never overtakes the first.

pub mod gateway;

use contract::Domain;
use contract::{ChargePayment, PaymentCharged, PaymentDeclined, PaymentRefunded, RefundPayment};
use futures::StreamExt;
use gateway::{ChargeOutcome, GatewayClient};
use runtime::config::{ConfigError, Source, Var};
use runtime::handler::PREPARES_AT_ONCE;
use runtime::{
    Context, Failure, Fresh, Handler, Inbound, Malformed, Outgoing, Together, Worker,
    WorkerSettings, WorkerSpec,
};
use sqlx::{PgConnection, PgPool};
use std::collections::HashSet;
use std::time::Duration;
use tracing::info;
use uuid::Uuid;

pub const SPEC: WorkerSpec = WorkerSpec::of(Domain::Payment);

const PAYMENT_GATEWAY_URL: Var = Var::new("PAYMENT_GATEWAY_URL", "http://127.0.0.1:8090");
const PAYMENT_GATEWAY_TIMEOUT: Var = Var::new("PAYMENT_GATEWAY_TIMEOUT", "5s");
const PAYMENT_GATEWAY_MAX_IN_FLIGHT: Var = Var::new("PAYMENT_GATEWAY_MAX_IN_FLIGHT", "16");
/// A PEM file of CAs to trust for the provider, beside the platform's roots.
const PAYMENT_GATEWAY_CA_FILE: Var = Var::optional("PAYMENT_GATEWAY_CA_FILE");

/// The payment worker's settings tree.
#[derive(Debug, Clone)]
pub struct Settings {
    pub worker: WorkerSettings,
    pub gateway: GatewaySettings,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Source::environment())
    }

    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            worker: WorkerSettings::read::<Payments>(source)?,
            gateway: GatewaySettings::read(source)?,
        })
    }

    pub fn log_effective(&self) {
        self.worker.log_effective(SPEC.name);
        let gateway = &self.gateway;
        tracing::info!(gateway = %gateway.url, timeout = ?gateway.timeout, max_in_flight = gateway.max_in_flight, ca_file = ?gateway.ca_file, "Effective configuration of the payment gateway");
    }
}

/// The payment provider and how it is called.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub url: String,
    pub timeout: Duration,
    pub max_in_flight: usize,
    /// CAs to trust beside the platform's roots (`PAYMENT_GATEWAY_CA_FILE`).
    pub ca_file: Option<std::path::PathBuf>,
}

impl GatewaySettings {
    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            url: source.parse(PAYMENT_GATEWAY_URL, |url| {
                topology::https::check_url(url).map(|()| url.to_owned())
            })?,
            timeout: source.duration(PAYMENT_GATEWAY_TIMEOUT)?,
            max_in_flight: source.parse(PAYMENT_GATEWAY_MAX_IN_FLIGHT, |raw| {
                let n: usize = raw.parse().map_err(|e| format!("{e}"))?;
                runtime::config::at_least(n, 1)
            })?,
            // Read now: a CA file that cannot be used stops the worker at
            // start, not at its first charge.
            ca_file: source.optional(PAYMENT_GATEWAY_CA_FILE, |raw| {
                let path = std::path::PathBuf::from(raw);
                topology::https::extra_roots(&path).map(|_| path)
            })?,
        })
    }
}

pub async fn build(
    settings: WorkerSettings,
    gateway: &GatewaySettings,
) -> anyhow::Result<Worker<Payments>> {
    let handler = Payments {
        gateway: GatewayClient::new(gateway)?,
    };
    Worker::build(SPEC, settings, handler).await
}

pub enum PaymentMessage {
    /// With the gateway's answer once prepared; `None` when an unlocked
    /// look found the payment already settled.
    Charge(ChargePayment, Option<ChargeOutcome>),
    Refund(RefundPayment),
}

contract::inbound! {
    /// What the payment worker consumes, as read off the wire.
    pub enum PaymentCommand for Domain::Payment {
        Charge(ChargePayment),
        Refund(RefundPayment),
    }
}

impl Inbound for PaymentMessage {
    fn decode(kind: &str, body: &[u8]) -> Result<Self, Malformed> {
        Ok(match PaymentCommand::decode(kind, body)? {
            PaymentCommand::Charge(charge) => Self::Charge(charge, None),
            PaymentCommand::Refund(refund) => Self::Refund(refund),
        })
    }
}

pub struct Payments {
    pub gateway: GatewayClient,
}

impl Handler for Payments {
    type Message = PaymentMessage;

    /// Asks the gateway for the charge unless an unlocked look finds the
    /// payment settled (charged, declined, refunded or voided): a charge
    /// for an order already given up is never made.
    async fn prepare(
        &self,
        db: &PgPool,
        message: PaymentMessage,
    ) -> Result<PaymentMessage, Failure> {
        let settled = settled_payments(db, [&message]).await?;
        self.charge_unless_settled(message, &settled).await
    }

    /// `prepare` for a chunk: one look for all its charges, then the
    /// gateway calls side by side.
    async fn prepare_many(
        &self,
        db: &PgPool,
        messages: Vec<PaymentMessage>,
    ) -> Vec<Result<PaymentMessage, Failure>> {
        let settled = match settled_payments(db, &messages).await {
            Ok(settled) => settled,
            Err(failure) => return messages.iter().map(|_| Err(failure.clone())).collect(),
        };
        let settled = &settled;
        futures::stream::iter(messages)
            .map(|message| self.charge_unless_settled(message, settled))
            .buffered(PREPARES_AT_ONCE)
            .collect()
            .await
    }

    async fn handle(&self, ctx: &mut Context, message: PaymentMessage) -> Result<(), Failure> {
        match message {
            PaymentMessage::Charge(cmd, outcome) => self.charge_payment(ctx, cmd, outcome).await,
            PaymentMessage::Refund(cmd) => self.refund_payment(ctx, cmd.order_id).await,
        }
    }

    /// The gateway's answers for many orders in one statement: every
    /// prepared charge of a pending (or new) payment, the only message of
    /// its order in the chunk, is recorded at once. The rest (a payment
    /// settled before, refunds) is left for `handle`, which looks closer.
    async fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<PaymentMessage>>,
    ) -> Result<Vec<Fresh<PaymentMessage>>, Failure> {
        let (alone, mut left) = Fresh::partition_unique(messages, |m| Some(order_id(m)));
        let mut answered = Vec::new();
        for Fresh { envelope, message } in alone {
            match message {
                PaymentMessage::Charge(cmd, Some(outcome)) => {
                    answered.push((envelope, cmd, outcome));
                }
                message => left.push(Fresh { envelope, message }),
            }
        }
        let recorded: HashSet<Uuid> = record_outcomes(
            ctx.db(),
            answered.iter().map(|(_, cmd, outcome)| (cmd, outcome)),
        )
        .await?
        .into_iter()
        .collect();
        for (envelope, cmd, outcome) in answered {
            if recorded.contains(&cmd.order_id) {
                ctx.emit(&envelope, announce(&cmd, outcome));
            } else {
                left.push(Fresh {
                    envelope,
                    message: PaymentMessage::Charge(cmd, Some(outcome)),
                });
            }
        }
        Ok(left)
    }

    /// Every message locks its order's payment row.
    fn lock_key(&self, message: &PaymentMessage) -> Option<String> {
        Some(order_id(message).to_string())
    }
}

/// Of the charges among `messages`, the orders whose payment is settled
/// (charged, declined, refunded or voided), in one unlocked look.
async fn settled_payments<'a>(
    db: &PgPool,
    messages: impl IntoIterator<Item = &'a PaymentMessage>,
) -> Result<HashSet<Uuid>, Failure> {
    let charges: Vec<Uuid> = messages
        .into_iter()
        .filter_map(|message| match message {
            PaymentMessage::Charge(cmd, _) => Some(cmd.order_id),
            PaymentMessage::Refund(_) => None,
        })
        .collect();
    if charges.is_empty() {
        return Ok(HashSet::new());
    }
    let settled: Vec<Uuid> = sqlx::query_scalar(
        "SELECT order_id FROM payments.payments WHERE order_id = ANY($1) AND status <> 'pending'",
    )
    .bind(&charges)
    .fetch_all(db)
    .await?;
    Ok(settled.into_iter().collect())
}

/// The order a message is about.
fn order_id(message: &PaymentMessage) -> Uuid {
    match message {
        PaymentMessage::Charge(cmd, _) => cmd.order_id,
        PaymentMessage::Refund(cmd) => cmd.order_id,
    }
}

/// Records the gateway's answers on payments that are pending or new, in
/// one statement (each order once); returns the orders recorded. A payment
/// settled before is left as it is and not returned.
async fn record_outcomes<'a>(
    db: &mut PgConnection,
    answers: impl Iterator<Item = (&'a ChargePayment, &'a ChargeOutcome)>,
) -> Result<Vec<Uuid>, Failure> {
    let mut columns = OutcomeColumns::default();
    for (cmd, outcome) in answers {
        columns.order_ids.push(cmd.order_id);
        match outcome {
            ChargeOutcome::Charged { charge_id } => {
                columns.statuses.push("charged");
                columns.charge_ids.push(Some(charge_id.as_str()));
                columns.declines.push(None);
                columns
                    .amounts
                    .push(Some(i64::try_from(cmd.amount_cents).unwrap_or(i64::MAX)));
                columns.currencies.push(Some(cmd.currency.as_str()));
            }
            ChargeOutcome::Declined { reason } => {
                columns.statuses.push("declined");
                columns.charge_ids.push(None);
                columns.declines.push(Some(reason.as_str()));
                columns.amounts.push(None);
                columns.currencies.push(None);
            }
        }
    }
    if columns.order_ids.is_empty() {
        return Ok(Vec::new());
    }
    let recorded = sqlx::query_scalar(
        "INSERT INTO payments.payments AS p (order_id, status, charge_id, decline, amount_cents, currency) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::text[]) \
         ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, \
         charge_id = COALESCE(EXCLUDED.charge_id, p.charge_id), decline = EXCLUDED.decline, \
         amount_cents = COALESCE(EXCLUDED.amount_cents, p.amount_cents), \
         currency = COALESCE(EXCLUDED.currency, p.currency), updated_at = now() \
         WHERE p.status = 'pending' RETURNING order_id",
    )
    .bind(&columns.order_ids)
    .bind(&columns.statuses)
    .bind(&columns.charge_ids)
    .bind(&columns.declines)
    .bind(&columns.amounts)
    .bind(&columns.currencies)
    .fetch_all(db)
    .await?;
    Ok(recorded)
}

/// Gateway answers as the columns of one `UNNEST`.
#[derive(Default)]
struct OutcomeColumns<'a> {
    order_ids: Vec<Uuid>,
    statuses: Vec<&'static str>,
    charge_ids: Vec<Option<&'a str>>,
    declines: Vec<Option<&'a str>>,
    amounts: Vec<Option<i64>>,
    currencies: Vec<Option<&'a str>>,
}

/// The event that tells the saga a recorded answer.
fn announce(cmd: &ChargePayment, outcome: ChargeOutcome) -> Outgoing {
    let order_id = cmd.order_id;
    match outcome {
        ChargeOutcome::Charged { charge_id } => {
            info!(%order_id, charge_id, amount_cents = cmd.amount_cents, "Payment charged");
            Outgoing::of(&PaymentCharged {
                order_id,
                charge_id,
            })
            .correlated(order_id)
        }
        ChargeOutcome::Declined { reason } => {
            info!(%order_id, reason, "Payment declined");
            Outgoing::of(&PaymentDeclined { order_id, reason }).correlated(order_id)
        }
    }
}

struct PaymentRow {
    status: String,
    charge_id: Option<String>,
    decline: Option<String>,
}

/// The order's payment row, created as `pending` if new, locked until commit.
async fn lock_payment(ctx: &mut Context, order_id: Uuid) -> Result<PaymentRow, Failure> {
    // One statement: `DO UPDATE` (a no-op change) locks an existing row and
    // returns it, as a new one is returned.
    let (status, charge_id, decline): (String, Option<String>, Option<String>) = sqlx::query_as(
        "INSERT INTO payments.payments (order_id, status) VALUES ($1, 'pending') \
         ON CONFLICT (order_id) DO UPDATE SET order_id = EXCLUDED.order_id \
         RETURNING status, charge_id, decline",
    )
    .bind(order_id)
    .fetch_one(ctx.db())
    .await?;
    Ok(PaymentRow {
        status,
        charge_id,
        decline,
    })
}

async fn set_status(
    ctx: &mut Context,
    order_id: Uuid,
    status: &str,
    charge_id: Option<&str>,
    decline: Option<&str>,
) -> Result<(), Failure> {
    sqlx::query(
        "UPDATE payments.payments SET status = $2, charge_id = COALESCE($3, charge_id), decline = $4, updated_at = now() \
         WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(status)
    .bind(charge_id)
    .bind(decline)
    .execute(ctx.db())
    .await?;
    Ok(())
}

impl Payments {
    /// A charge with the gateway's answer, or with none if its payment is
    /// among `settled`; anything else unchanged.
    async fn charge_unless_settled(
        &self,
        message: PaymentMessage,
        settled: &HashSet<Uuid>,
    ) -> Result<PaymentMessage, Failure> {
        let PaymentMessage::Charge(cmd, _) = message else {
            return Ok(message);
        };
        if settled.contains(&cmd.order_id) {
            return Ok(PaymentMessage::Charge(cmd, None));
        }
        let outcome = self
            .gateway
            .charge(
                cmd.order_id,
                cmd.amount_cents,
                &cmd.currency,
                &cmd.payment_method,
            )
            .await?;
        Ok(PaymentMessage::Charge(cmd, Some(outcome)))
    }

    async fn charge_payment(
        &self,
        ctx: &mut Context,
        cmd: ChargePayment,
        prepared: Option<ChargeOutcome>,
    ) -> Result<(), Failure> {
        let id = cmd.order_id;
        // The common case in one statement: the answer on a pending payment.
        let prepared = match prepared {
            Some(outcome) => {
                let recorded = record_outcomes(ctx.db(), std::iter::once((&cmd, &outcome))).await?;
                if !recorded.is_empty() {
                    ctx.emit(announce(&cmd, outcome));
                    return Ok(());
                }
                Some(outcome)
            }
            None => None,
        };
        let row = lock_payment(ctx, id).await?;
        match row.status.as_str() {
            "charged" => {
                let charge_id = row.charge_id.unwrap_or_default();
                ctx.emit(
                    Outgoing::of(&PaymentCharged {
                        order_id: id,
                        charge_id,
                    })
                    .correlated(id),
                );
            }
            "declined" => {
                let reason = row.decline.unwrap_or_else(|| "declined".into());
                ctx.emit(
                    Outgoing::of(&PaymentDeclined {
                        order_id: id,
                        reason,
                    })
                    .correlated(id),
                );
            }
            // The order gave up on this payment while the charge was on its
            // way: a charge that landed is refunded now.
            // Without an answer (a retry, or a charge that found the payment
            // voided at its unlocked look), an earlier attempt may still have
            // landed at the gateway after the void: the gateway is asked.
            "refunded" | "voided" => {
                let refunded = self.refund_standing(id, &row).await?;
                if refunded.is_empty() {
                    info!(order_id = %id, "Charge skipped: payment already voided");
                } else {
                    let landed = match &prepared {
                        Some(ChargeOutcome::Charged { charge_id }) => charge_id.as_str(),
                        _ => "an earlier attempt",
                    };
                    info!(order_id = %id, charge = landed, refunded = ?refunded, "Charge landed after the payment was voided; refunded");
                    record_refund(ctx, id, "refunded", &row, refunded).await?;
                }
            }
            // Pending: recorded above when prepared. Settled at the
            // unlocked look, pending under the lock: nothing returns to
            // pending, so this is not reached; if it were, a retry prepares
            // the charge again. The gateway is asked in `prepare` only,
            // never inside the transaction.
            _ => {
                return Err(Failure::transient(format!(
                    "payment of order {id} is pending but its charge was not prepared"
                )));
            }
        }
        Ok(())
    }

    async fn refund_payment(&self, ctx: &mut Context, id: Uuid) -> Result<(), Failure> {
        let row = lock_payment(ctx, id).await?;
        if matches!(row.status.as_str(), "refunded" | "voided") {
            return Ok(());
        }
        let refunded = self.refund_standing(id, &row).await?;
        let status = if refunded.is_empty() {
            "voided"
        } else {
            "refunded"
        };
        record_refund(ctx, id, status, &row, refunded).await
    }

    /// Refunds what stands of the order's charges (called under the payment
    /// row's lock) and returns their ids.
    async fn refund_standing(&self, id: Uuid, row: &PaymentRow) -> Result<Vec<String>, Failure> {
        if let ("charged", Some(charge_id)) = (row.status.as_str(), &row.charge_id) {
            self.gateway.refund(charge_id).await?;
            return Ok(vec![charge_id.clone()]);
        }
        // No charge recorded here, but one may have landed at the gateway
        // with its answer lost, or after a void: ask, refund what stands.
        let mut refunded = Vec::new();
        for charge in self.gateway.charges_of(id).await? {
            if charge.status == "succeeded" && !charge.refunded {
                self.gateway.refund(&charge.id).await?;
                refunded.push(charge.id);
            }
        }
        Ok(refunded)
    }
}

async fn record_refund(
    ctx: &mut Context,
    id: Uuid,
    status: &str,
    row: &PaymentRow,
    refunded: Vec<String>,
) -> Result<(), Failure> {
    set_status(ctx, id, status, None, row.decline.as_deref()).await?;
    info!(order_id = %id, status, charges = ?refunded, "Payment refunded or voided");
    ctx.emit(
        Outgoing::of(&PaymentRefunded {
            order_id: id,
            charge_ids: refunded,
        })
        .correlated(id),
    );
    Ok(())
}
