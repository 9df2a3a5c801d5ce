//! The notification domain: one email per final outcome of an order.
//!
//! The `(order_id, outcome)` row in `notifications.sent` is written in the
//! same transaction that sends the email, so a redelivered or replayed
//! event finds it and sends nothing; if sending fails the row is taken back
//! and the event retried. Each email carries a Message-ID derived from
//! the order and outcome, so that even the one window left (SMTP accepted,
//! commit lost) yields a duplicate that mail systems recognise.
//!
//! The outcomes that wait together are claimed in one statement and their
//! emails sent side by side (`handle_together`); an email that fails there
//! gives its claim back, and its failure is routed like `handle`'s (a
//! refusal to the dead queue, an unavailable server to a retry).

use lettre::message::{Mailbox, MultiPart, header};
mod smtp;

use contract::Domain;
use contract::{OrderCancelled, OrderConfirmed};
use futures::StreamExt;
use lettre::Message as Email;
use runtime::config::{ConfigError, Source, Var};
use runtime::{
    Context, Dependency, Failure, Fresh, Handler, Inbound, Malformed, Together, Worker,
    WorkerSettings, WorkerSpec,
};
use smtp::{Mailer, SendError};
use sqlx::PgConnection;
use std::collections::HashSet;
use std::time::Duration;
use tracing::{debug, info};
use uuid::Uuid;

pub const SPEC: WorkerSpec = WorkerSpec::of(Domain::Notification);

/// The SMTP server, as its circuit breaker and `/readyz` name it.
pub const MAIL_SERVER: Dependency = Dependency::named("smtp");

const SMTP_URL: Var = Var::new("SMTP_URL", "smtp://127.0.0.1:1025");
const MAIL_FROM: Var = Var::new("MAIL_FROM", "orderflow <orders@orderflow.local>");

/// The notification worker's settings tree.
#[derive(Debug, Clone)]
pub struct Settings {
    pub worker: WorkerSettings,
    pub mail: MailSettings,
}

impl Settings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Source::environment())
    }

    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            worker: WorkerSettings::read::<Notifications>(source)?,
            mail: MailSettings::read(source)?,
        })
    }

    pub fn log_effective(&self) {
        self.worker.log_effective(SPEC.name);
        tracing::info!(smtp_url = %self.mail.smtp_url, from = %self.mail.from, "Effective configuration of the mail");
    }
}

/// `SMTP_URL` and `MAIL_FROM`.
#[derive(Debug, Clone)]
pub struct MailSettings {
    pub smtp_url: runtime::SecretUrl,
    pub from: Mailbox,
}

impl MailSettings {
    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        Ok(Self {
            // Checked now, to fail at start rather than at the first email.
            smtp_url: source.secret_url(SMTP_URL, |url| mailer(url).map(|_| ()))?,
            from: source.parse(MAIL_FROM, |raw| {
                raw.parse().map_err(|e| {
                    format!("not a mailbox such as \"Shop <orders@shop.example>\": {e}")
                })
            })?,
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
    Worker::build(SPEC, settings, Notifications::new(&mail)?).await
}

pub struct NotificationMessage {
    outcome: Outcome,
    /// Why its email failed when it was sent with its chunk: `handle`
    /// reports that instead of offering the email to the server again.
    unsent: Option<Failure>,
}

contract::inbound! {
    /// The final outcomes of an order, one email each.
    enum Outcome for Domain::Notification {
        Confirmed(OrderConfirmed),
        Cancelled(OrderCancelled),
    }
}

impl NotificationMessage {
    fn order_id(&self) -> Uuid {
        match &self.outcome {
            Outcome::Confirmed(ev) => ev.order_id,
            Outcome::Cancelled(ev) => ev.order_id,
        }
    }

    fn mail(&self) -> Mail {
        match &self.outcome {
            Outcome::Confirmed(ev) => confirmed_mail(ev),
            Outcome::Cancelled(ev) => cancelled_mail(ev),
        }
    }
}

impl Inbound for NotificationMessage {
    fn decode(kind: &str, body: &[u8]) -> Result<Self, Malformed> {
        Ok(Self {
            outcome: Outcome::decode(kind, body)?,
            unsent: None,
        })
    }
}

pub struct Notifications {
    mailer: Mailer,
    from: Mailbox,
}

impl Notifications {
    pub fn new(mail: &MailSettings) -> anyhow::Result<Self> {
        Ok(Self {
            mailer: mailer(mail.smtp_url.expose()).map_err(|e| anyhow::anyhow!(e))?,
            from: mail.from.clone(),
        })
    }
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
        "price_changed" => "a price changed since you saw it; please review your basket",
        "unknown_product" => "an item is no longer sold",
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

/// Emails of one chunk in flight at once. Two chunks in flight (the
/// default concurrency) keep at most twice this many SMTP connections
/// busy, which the mailer's idle pool (16) then keeps for the next chunk.
const SENDS_AT_ONCE: usize = 8;

impl Handler for Notifications {
    type Message = NotificationMessage;

    async fn handle(&self, ctx: &mut Context, message: NotificationMessage) -> Result<(), Failure> {
        if let Some(failure) = message.unsent {
            return Err(failure);
        }
        let mail = message.mail();
        let to = recipient(&mail)?;
        if claim(ctx.db(), [&mail]).await?.is_empty() {
            info!(order_id = %mail.order_id, outcome = mail.outcome, "Email already sent");
            return Ok(());
        }
        self.send(mail, to).await
    }

    /// Claims the outcomes that are the only message of their order in the
    /// chunk in one statement, sends their emails side by side, and gives
    /// the claims of those that failed back: they go on to `handle`, which
    /// hands their failure to the runtime to route. An email sent
    /// here is at least once, as in `handle`: should the transaction be
    /// lost after it, the event runs again and the customer gets the same
    /// Message-ID twice.
    async fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<NotificationMessage>>,
    ) -> Result<Vec<Fresh<NotificationMessage>>, Failure> {
        let (alone, mut left) = Fresh::partition_unique(messages, |m| Some(m.order_id()));
        let mut ready = Vec::with_capacity(alone.len());
        for fresh in alone {
            let mail = fresh.message.mail();
            // An address that is not one fails in `handle`, with its reason.
            match recipient(&mail) {
                Ok(to) => ready.push((fresh, mail, to)),
                Err(_) => left.push(fresh),
            }
        }
        // Each order once here, so its id names its claim.
        let claimed: HashSet<Uuid> = claim(ctx.db(), ready.iter().map(|(_, mail, _)| mail))
            .await?
            .into_iter()
            .collect();
        let mut sending = Vec::with_capacity(ready.len());
        for (fresh, mail, to) in ready {
            if claimed.contains(&mail.order_id) {
                sending.push((fresh, mail, to));
            } else {
                info!(order_id = %mail.order_id, outcome = mail.outcome, "Email already sent");
            }
        }
        let sent: Vec<_> = futures::stream::iter(sending)
            .map(|(fresh, mail, to)| async move {
                let claim = (mail.order_id, mail.outcome);
                (fresh, claim, self.send(mail, to).await)
            })
            .buffer_unordered(SENDS_AT_ONCE)
            .collect()
            .await;
        let mut unsent = Vec::new();
        for (mut fresh, (order_id, outcome), result) in sent {
            if let Err(failure) = result {
                debug!(%order_id, outcome, error = %failure, "Email not sent with its chunk");
                unsent.push((order_id, outcome));
                fresh.message.unsent = Some(failure);
                left.push(fresh);
            }
        }
        unclaim(ctx.db(), &unsent).await?;
        Ok(left)
    }

    /// Every message writes its order's `sent` row.
    fn lock_key(&self, message: &NotificationMessage) -> Option<String> {
        Some(message.order_id().to_string())
    }
}

fn recipient(mail: &Mail) -> Result<Mailbox, Failure> {
    mail.to.parse().map_err(|e| {
        Failure::permanent(format!(
            "customer email {:?} is not an address: {e}",
            mail.to
        ))
    })
}

/// Writes the `sent` rows of `mails` that do not exist yet, in one
/// statement; returns the orders of those written, whose emails are to be
/// sent. A row another transaction is writing is waited for, so two
/// replicas never both send one email.
async fn claim<'a>(
    db: &mut PgConnection,
    mails: impl IntoIterator<Item = &'a Mail>,
) -> Result<Vec<Uuid>, Failure> {
    let mut order_ids = Vec::new();
    let mut outcomes = Vec::new();
    let mut emails = Vec::new();
    let mut subjects = Vec::new();
    for mail in mails {
        order_ids.push(mail.order_id);
        outcomes.push(mail.outcome);
        emails.push(mail.to.as_str());
        subjects.push(mail.subject.as_str());
    }
    if order_ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_scalar(
        "INSERT INTO notifications.sent (order_id, outcome, email, subject) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[]) \
         ON CONFLICT DO NOTHING RETURNING order_id",
    )
    .bind(&order_ids)
    .bind(&outcomes)
    .bind(&emails)
    .bind(&subjects)
    .fetch_all(db)
    .await?)
}

/// Gives back the claims of emails that were not sent.
async fn unclaim(db: &mut PgConnection, claims: &[(Uuid, &str)]) -> Result<(), Failure> {
    if claims.is_empty() {
        return Ok(());
    }
    let (order_ids, outcomes): (Vec<Uuid>, Vec<&str>) = claims.iter().copied().unzip();
    sqlx::query(
        "DELETE FROM notifications.sent s \
         USING UNNEST($1::uuid[], $2::text[]) AS u (order_id, outcome) \
         WHERE s.order_id = u.order_id AND s.outcome = u.outcome",
    )
    .bind(&order_ids)
    .bind(&outcomes)
    .execute(db)
    .await?;
    Ok(())
}

impl Notifications {
    /// Hands one claimed email to the SMTP server.
    async fn send(&self, mail: Mail, to: Mailbox) -> Result<(), Failure> {
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
            Err(e @ SendError::Unavailable(_)) => Err(Failure::unavailable(MAIL_SERVER, e)),
        }
    }
}
