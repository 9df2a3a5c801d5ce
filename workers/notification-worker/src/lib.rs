//! The notification domain: one email per final outcome of an order.
//!
//! The `(order_id, outcome)` row in `notifications.sent` is written in the
//! same transaction that sends the email, so a redelivered or replayed
//! event finds it and sends nothing; if sending fails the row is rolled
//! back and the event retried. Each email carries a Message-ID derived from
//! the order and outcome, so that even the one window left (SMTP accepted,
//! commit lost) yields a duplicate that mail systems recognise.

use lettre::message::{Mailbox, MultiPart, header};
mod smtp;

use lettre::Message as Email;
use messages::{OrderCancelled, OrderConfirmed};
use runtime::config::env_or;
use runtime::{
    Context, Failure, Handler, Inbound, Malformed, Worker, WorkerSettings, WorkerSpec, decode_json,
};
use smtp::{Mailer, SendError};
use std::time::Duration;
use topology::{Domain, keys};
use tracing::info;
use uuid::Uuid;

pub const SPEC: WorkerSpec = WorkerSpec {
    name: "notification-worker",
    domain: Domain::Notification,
    schema: "notifications",
};

/// `SMTP_URL` and `MAIL_FROM`.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub smtp_url: runtime::SecretUrl,
    pub from: Mailbox,
}

impl MailSettings {
    pub fn from_env() -> anyhow::Result<Self> {
        let smtp_url: String = env_or("SMTP_URL", "smtp://127.0.0.1:1025")?;
        let from_raw: String = env_or("MAIL_FROM", "orderflow <orders@orderflow.local>")?;
        let from = from_raw
            .parse()
            .map_err(|e| anyhow::anyhow!("MAIL_FROM={from_raw:?} is not a mailbox: {e}"))?;
        // Fail at start, not at the first email.
        mailer(&smtp_url).map_err(|e| anyhow::anyhow!("SMTP_URL is not valid: {e}"))?;
        Ok(Self {
            smtp_url: runtime::SecretUrl::new(smtp_url),
            from,
        })
    }
}

fn mailer(url: &str) -> Result<Mailer, String> {
    Mailer::from_url(url, Duration::from_secs(10))
}

pub async fn build(
    settings: WorkerSettings,
    mail: MailSettings,
) -> anyhow::Result<Worker<Notifications>> {
    let handler = Notifications {
        mailer: mailer(mail.smtp_url.expose()).map_err(|e| anyhow::anyhow!(e))?,
        from: mail.from,
    };
    Worker::build(SPEC, settings, handler).await
}

pub enum NotificationMessage {
    Confirmed(OrderConfirmed),
    Cancelled(OrderCancelled),
}

impl Inbound for NotificationMessage {
    fn decode(kind: &str, body: &[u8]) -> Result<Self, Malformed> {
        Ok(match kind {
            keys::ORDER_CONFIRMED => Self::Confirmed(decode_json(kind, body)?),
            keys::ORDER_CANCELLED => Self::Cancelled(decode_json(kind, body)?),
            other => return Err(Malformed::UnknownType(other.to_owned())),
        })
    }
}

pub struct Notifications {
    mailer: Mailer,
    from: Mailbox,
}

/// What one email says.
struct Mail {
    order_id: Uuid,
    outcome: &'static str,
    to: String,
    subject: String,
    text: String,
    html: String,
}

fn money(cents: u64, currency: &str) -> String {
    format!("{}.{:02} {currency}", cents / 100, cents % 100)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn confirmed_mail(ev: &OrderConfirmed) -> Mail {
    let subject = format!("Order {} confirmed", ev.order_id);
    let lines: Vec<String> = ev
        .items
        .iter()
        .map(|l| {
            format!(
                "{} x {} at {}",
                l.quantity,
                l.sku,
                money(l.unit_price_cents, &ev.currency)
            )
        })
        .collect();
    let total = money(ev.total_cents, &ev.currency);
    let text = format!(
        "Thank you for your order {}.\n\n{}\n\nTotal charged: {total}\n",
        ev.order_id,
        lines.join("\n")
    );
    let html = format!(
        "<p>Thank you for your order <strong>{}</strong>.</p><ul>{}</ul><p>Total charged: {}</p>",
        ev.order_id,
        lines
            .iter()
            .map(|l| format!("<li>{}</li>", escape(l)))
            .collect::<String>(),
        escape(&total)
    );
    Mail {
        order_id: ev.order_id,
        outcome: "confirmed",
        to: ev.customer_email.clone(),
        subject,
        text,
        html,
    }
}

fn cancelled_mail(ev: &OrderCancelled) -> Mail {
    let subject = format!("Order {} cancelled", ev.order_id);
    let why = match ev.reason.as_str() {
        "out_of_stock" => "some items are out of stock",
        "payment_declined" => "the payment was declined",
        "customer_cancelled" => "you cancelled it",
        "payment_timeout" => "the payment did not complete in time",
        _ => "it could not be completed",
    };
    let refund = if ev.refunded {
        format!(
            "The {} charged has been refunded.",
            money(ev.total_cents, &ev.currency)
        )
    } else {
        "Nothing was charged.".to_owned()
    };
    let text = format!(
        "Your order {} was cancelled because {why}.\n\n{refund}\n",
        ev.order_id
    );
    let html = format!(
        "<p>Your order <strong>{}</strong> was cancelled because {}.</p><p>{}</p>",
        ev.order_id,
        escape(why),
        escape(&refund)
    );
    Mail {
        order_id: ev.order_id,
        outcome: "cancelled",
        to: ev.customer_email.clone(),
        subject,
        text,
        html,
    }
}

impl Handler for Notifications {
    type Message = NotificationMessage;

    /// Each email is sent inside its transaction (it must be: SMTP has no
    /// idempotency key, the `sent` row is the dedupe), one after the other,
    /// so more transactions in flight keep a slow mail server busy.
    const DEFAULT_CONCURRENCY: usize = 6;

    async fn handle(&self, ctx: &mut Context, message: NotificationMessage) -> Result<(), Failure> {
        let mail = match &message {
            NotificationMessage::Confirmed(ev) => confirmed_mail(ev),
            NotificationMessage::Cancelled(ev) => cancelled_mail(ev),
        };
        self.send_once(ctx, mail).await
    }

    /// Every message writes its order's `sent` row.
    fn lock_key(&self, message: &NotificationMessage) -> Option<String> {
        let id = match message {
            NotificationMessage::Confirmed(ev) => ev.order_id,
            NotificationMessage::Cancelled(ev) => ev.order_id,
        };
        Some(id.to_string())
    }
}

impl Notifications {
    async fn send_once(&self, ctx: &mut Context, mail: Mail) -> Result<(), Failure> {
        let to: Mailbox = mail.to.parse().map_err(|e| {
            Failure::permanent(format!(
                "customer email {:?} is not an address: {e}",
                mail.to
            ))
        })?;
        let first = sqlx::query(
            "INSERT INTO notifications.sent (order_id, outcome, email, subject) VALUES ($1, $2, $3, $4) \
             ON CONFLICT DO NOTHING",
        )
        .bind(mail.order_id)
        .bind(mail.outcome)
        .bind(&mail.to)
        .bind(&mail.subject)
        .execute(ctx.db())
        .await?;
        if first.rows_affected() == 0 {
            info!(order_id = %mail.order_id, outcome = mail.outcome, "Email already sent");
            return Ok(());
        }
        let email = Email::builder()
            .from(self.from.clone())
            .to(to)
            .subject(&mail.subject)
            .message_id(Some(format!(
                "<{}.{}@orderflow>",
                mail.order_id, mail.outcome
            )))
            .header(header::MIME_VERSION_1_0)
            .multipart(MultiPart::alternative_plain_html(mail.text, mail.html))
            .map_err(|e| Failure::permanent(format!("cannot build the email: {e}")))?;
        match self.mailer.send(email.envelope(), &email.formatted()).await {
            Ok(()) => {
                info!(order_id = %mail.order_id, outcome = mail.outcome, "Email sent");
                Ok(())
            }
            Err(e @ SendError::Refused(_)) => Err(Failure::permanent(e)),
            Err(e @ SendError::Unavailable(_)) => Err(Failure::transient(e)),
        }
    }
}
