//! `dlq`: see why messages died, put them back, or throw them away, without
//! losing or duplicating anything.
//!
//! Safety rests on three rules:
//! - Reading a dead queue takes its messages on a channel of our own without
//!   acking them; closing the channel returns the unchosen ones to their
//!   place (dead queues are classic queues: no delivery count, no reordering),
//!   and while we hold them no other operator can take them.
//! - Moving is publish-with-confirm, then ack: a crash in between leaves the
//!   message in the dead queue as well, and the consumer's inbox ignores the
//!   second copy (the message id is kept).
//! - Purging archives the whole message in PostgreSQL before acking it.
#![forbid(unsafe_code)]

pub mod cli;
pub mod console;
pub mod message;
mod read;

pub use read::{Page, PageRequest, Scan, find, page};

use anyhow::{Context as _, bail};
use chrono::Utc;
use contract::{Domain, headers};
use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};
use message::DeadMessage;
use serde_json::{Value, json};
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// How often a message may be replayed before `dlq` refuses (`--max-replays`).
pub const DEFAULT_MAX_REPLAYS: i64 = 5;

/// Where a replay of `m` goes: `options.to_queue` through the default
/// exchange, else where it was first published; `None` when unknown.
fn destination(m: &DeadMessage, options: &ReplayOptions) -> Option<(String, String)> {
    match (
        &options.to_queue,
        &m.original_exchange,
        &m.original_routing_key,
    ) {
        (Some(q), _, _) => Some((String::new(), q.clone())),
        (None, Some(e), Some(k)) => Some((e.clone(), k.clone())),
        _ => None,
    }
}

/// A dead queue name, checked: `Q.dead` of a known domain.
pub fn dead_queue(name: &str) -> anyhow::Result<(String, Domain)> {
    let work = contract::names::work_queue_of_dead(name).with_context(|| {
        format!("{name:?} is not a dead queue (they end in .dead, e.g. inventory.dead)")
    })?;
    let domain = Domain::ALL
        .into_iter()
        .find(|d| d.queue() == work)
        .with_context(|| format!("{name:?} is not the dead queue of a known domain"))?;
    Ok((name.to_owned(), domain))
}

/// Which dead messages an operation applies to.
#[derive(Debug, Default, Clone)]
pub struct Selectors {
    /// Message ids.
    pub ids: Vec<String>,
    /// Message type, e.g. payment.charge.
    pub message_type: Option<String>,
    /// Part of the error text.
    pub error_contains: Option<String>,
    /// Died longer ago than this.
    pub older_than: Option<Duration>,
    /// Error kind: permanent, exhausted, malformed, delivery-limit.
    pub kind: Option<String>,
    /// Every message in the queue.
    pub all: bool,
}

/// Told how a long operation advances (a progress bar, or nothing).
pub trait Progress {
    fn start(&self, total: usize);
    fn advance(&self);
}

/// No progress shown.
impl Progress for () {
    fn start(&self, _total: usize) {}
    fn advance(&self) {}
}

/// An age such as `30s`, `10m` or `2h`.
pub fn parse_age(s: &str) -> Result<Duration, String> {
    settings::parse_duration(s).map_err(|e| e.to_string())
}

impl Selectors {
    pub fn is_empty(&self) -> bool {
        !self.all
            && self.ids.is_empty()
            && self.message_type.is_none()
            && self.error_contains.is_none()
            && self.older_than.is_none()
            && self.kind.is_none()
    }

    pub fn matches(&self, m: &DeadMessage, now: chrono::DateTime<Utc>) -> bool {
        (self.ids.is_empty() || self.ids.contains(&m.message_id))
            && self.message_type.as_ref().is_none_or(|t| &m.kind == t)
            && self
                .error_contains
                .as_ref()
                .is_none_or(|e| m.error.contains(e.as_str()))
            && self.kind.as_ref().is_none_or(|k| &m.error_kind == k)
            && self.older_than.is_none_or(|d| {
                m.age(now)
                    .and_then(|a| a.to_std().ok())
                    .is_some_and(|a| a >= d)
            })
    }
}

/// The messages of a dead queue, held unacked on a channel of their own.
pub struct Snapshot {
    channel: Channel,
    /// How many messages the queue held when the snapshot was taken.
    pub depth: u32,
    pub messages: Vec<DeadMessage>,
}

impl Snapshot {
    /// Takes every message now in `queue` without acking any.
    pub async fn take(connection: &Connection, queue: &str) -> anyhow::Result<Self> {
        Self::take_up_to(connection, queue, None).await
    }

    /// Takes the first `limit` messages of `queue` (at most) without acking
    /// any: the broker sends no more than that, so memory stays flat however
    /// deep the queue is.
    pub async fn take_at_most(
        connection: &Connection,
        queue: &str,
        limit: usize,
    ) -> anyhow::Result<Self> {
        Self::take_up_to(connection, queue, Some(limit)).await
    }

    async fn take_up_to(
        connection: &Connection,
        queue: &str,
        limit: Option<usize>,
    ) -> anyhow::Result<Self> {
        let channel = connection.create_channel().await?;
        let depth = topology::queue_depth(&channel, queue)
            .await
            .with_context(|| format!("queue {queue} does not exist"))?;
        let count = limit.map_or(depth as usize, |l| l.min(depth as usize));
        let mut messages = Vec::with_capacity(count);
        if count > 0 {
            // Unbounded for a whole queue; otherwise the broker stops
            // sending at the limit.
            let prefetch = limit.map_or(0, |_| u16::try_from(count).unwrap_or(u16::MAX));
            channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let mut consumer = channel
                .basic_consume(
                    queue.into(),
                    format!("dlq-{}", uuid::Uuid::new_v4()).as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            while messages.len() < count {
                match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
                    Ok(Some(Ok(d))) => messages.push(DeadMessage::from_delivery(
                        d.delivery_tag,
                        d.properties,
                        d.data,
                    )),
                    Ok(Some(Err(e))) => return Err(e.into()),
                    // Another reader holds the rest (another operator's dlq).
                    Ok(None) | Err(_) => break,
                }
            }
        }
        Ok(Self {
            channel,
            depth,
            messages,
        })
    }

    /// The messages the selectors choose, in queue order.
    pub fn chosen(&self, selectors: &Selectors) -> Vec<&DeadMessage> {
        let now = Utc::now();
        self.messages
            .iter()
            .filter(|m| selectors.matches(m, now))
            .collect()
    }

    async fn ack(&self, tag: u64) -> anyhow::Result<()> {
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await?;
        Ok(())
    }

    /// Returns every message not acked to its place in the queue.
    pub async fn release(self) {
        let _ = self.channel.close(200, "dlq done".into()).await;
    }
}

/// What an operation did to one message.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Outcome {
    pub message_id: String,
    pub action: &'static str,
    pub detail: String,
}

/// The tool's connections and who acts; cheap to clone, so that a console
/// serving several operators acts as each (`acting_as`).
#[derive(Clone)]
pub struct Dlq {
    pub connection: Arc<Connection>,
    pub publisher: Arc<runtime::Publisher>,
    pub pool: PgPool,
    pub operator: String,
}

pub struct ReplayOptions {
    pub dry_run: bool,
    pub rate: Option<f64>,
    pub to_queue: Option<String>,
    pub new_body: Option<Vec<u8>>,
    pub max_replays: i64,
    pub force: bool,
    /// The workers' `INBOX_RETENTION_DAYS`: a message dead for longer may
    /// have been forgotten by the inbox that would catch a second apply.
    pub inbox_retention: std::time::Duration,
}

impl Dlq {
    pub async fn connect(
        amqp_url: &str,
        database_url: &str,
        operator: &str,
    ) -> anyhow::Result<Self> {
        let connection = runtime::broker::connect(amqp_url, "dlq")
            .await
            .context("cannot connect to the broker at AMQP_URL")?;
        let publisher = runtime::Publisher::connect(amqp_url, "dlq publisher")
            .await
            .context("cannot open a publishing channel")?;
        let pool = runtime::db::connect(database_url, 2, "dlq").await?;
        runtime::db::migrate(&pool).await?;
        Ok(Self {
            connection: Arc::new(connection),
            publisher: Arc::new(publisher),
            pool,
            operator: operator.to_owned(),
        })
    }

    /// The same tool, acting as `operator` (for the audit trail and the
    /// archive).
    pub fn acting_as(&self, operator: &str) -> Self {
        Self {
            operator: operator.to_owned(),
            ..self.clone()
        }
    }

    async fn audit(
        &self,
        action: &str,
        queue: &str,
        message_id: &str,
        detail: Value,
    ) -> anyhow::Result<()> {
        sqlx::query("INSERT INTO dlq.audit (operator, action, queue, message_id, detail) VALUES ($1, $2, $3, $4, $5)")
            .bind(&self.operator)
            .bind(action)
            .bind(queue)
            .bind(message_id)
            .bind(detail)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether the consumer of the queue's domain has applied `message_id`.
    pub async fn already_applied(&self, domain: Domain, message_id: &str) -> anyhow::Result<bool> {
        let Ok(id) = uuid::Uuid::parse_str(message_id) else {
            return Ok(false);
        };
        // The consumer whose inbox decides: the worker of the dead queue's
        // domain, in the schema it owns (both named by the contract).
        let (schema, consumer) = (domain.schema(), domain.worker());
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {schema}.inbox WHERE consumer = $1 AND message_id = $2)"
        );
        Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(consumer)
            .bind(id)
            .fetch_one(&self.pool)
            .await?)
    }

    /// Replays the selected messages of `queue`; `progress` is told of each.
    /// Replays the selected messages of `queue`; `progress` is told of each
    /// message read. Streamed: the messages are taken one at a time, each
    /// chosen one published, confirmed and only then acked, the others held
    /// unacked and put back in place at the end, so memory stays flat
    /// however deep the queue. A replay that stops (a publish not
    /// confirmed, the process killed) loses nothing: what was not acked is
    /// back in the queue, and running it again goes on where it stopped (a
    /// copy confirmed but not acked is found applied by the inbox check).
    pub async fn replay(
        &self,
        queue: &str,
        domain: Domain,
        selectors: &Selectors,
        options: &ReplayOptions,
        progress: &(dyn Progress + Sync),
    ) -> anyhow::Result<Vec<Outcome>> {
        let mut outcomes = Vec::new();
        if options.new_body.is_some() {
            // A new body is for exactly the message it was read from.
            let snapshot = Snapshot::take(&self.connection, queue).await?;
            let chosen = snapshot.chosen(selectors);
            if chosen.len() != 1 {
                let n = chosen.len();
                drop(chosen);
                snapshot.release().await;
                if let ([id], 0) = (selectors.ids.as_slice(), n) {
                    bail!(
                        "message {id} is no longer in {queue} (replayed or purged meanwhile); the new body was for it, nothing replayed"
                    );
                }
                bail!("a new body replays exactly one message; the selectors chose {n}");
            }
            progress.start(1);
            progress.advance();
            let result = self
                .replay_one(
                    &snapshot.channel,
                    queue,
                    domain,
                    chosen[0],
                    options,
                    &mut outcomes,
                )
                .await;
            snapshot.release().await;
            return result.map(|()| outcomes);
        }
        let channel = self.connection.create_channel().await?;
        let mut scan = Scan::open(&channel, queue).await?;
        progress.start(scan.depth as usize);
        let now = Utc::now();
        let mut result = Ok(());
        loop {
            let m = match scan.next().await {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            progress.advance();
            if !selectors.matches(&m, now) {
                continue;
            }
            if let Err(e) = self
                .replay_one(&channel, queue, domain, &m, options, &mut outcomes)
                .await
            {
                result = Err(e);
                break;
            }
        }
        // Every message not acked goes back to its place.
        let _ = channel.close(200, "dlq replay done".into()).await;
        result.map(|()| outcomes)
    }

    /// Replays one message held unacked on `channel`: refused, skipped,
    /// described (dry run), or published with a confirm and then acked. An
    /// error stops the replay.
    async fn replay_one(
        &self,
        channel: &Channel,
        queue: &str,
        domain: Domain,
        m: &DeadMessage,
        options: &ReplayOptions,
        outcomes: &mut Vec<Outcome>,
    ) -> anyhow::Result<()> {
        let skip = |why: String| Outcome {
            message_id: m.message_id.clone(),
            action: "skipped",
            detail: why,
        };
        if let Some(why) = self.refusal(m, domain, options).await? {
            outcomes.push(skip(why));
            return Ok(());
        }
        let Some((exchange, routing_key)) = destination(m, options) else {
            outcomes.push(skip(
                "no original exchange and routing key; replay it to a queue by name".into(),
            ));
            return Ok(());
        };
        let target = format!(
            "{}/{}",
            if exchange.is_empty() {
                "(default)"
            } else {
                &exchange
            },
            routing_key
        );
        if options.dry_run {
            outcomes.push(Outcome {
                message_id: m.message_id.clone(),
                action: "would replay",
                detail: format!("to {target}"),
            });
            return Ok(());
        }
        let body = options.new_body.clone().unwrap_or_else(|| m.body.clone());
        self.publisher
            .publish_raw(&exchange, &routing_key, &body, replay_properties(m))
            .await
            .map_err(|e| {
                anyhow::anyhow!("replay of {} not confirmed, stopping: {e}", m.message_id)
            })?;
        // Confirmed: now the dead copy may go.
        channel
            .basic_ack(m.delivery_tag, BasicAckOptions::default())
            .await?;
        self.audit(
            "replay",
            queue,
            &m.message_id,
            json!({"to": target, "edited": options.new_body.is_some(), "replays": m.replays + 1}),
        )
        .await?;
        outcomes.push(Outcome {
            message_id: m.message_id.clone(),
            action: "replayed",
            detail: format!("to {target}"),
        });
        if let Some(rate) = options.rate.filter(|r| *r > 0.0) {
            tokio::time::sleep(Duration::from_secs_f64(1.0 / rate)).await;
        }
        Ok(())
    }

    /// Why `m` must not be replayed, if it must not: its replay budget is
    /// spent, or (unless forced) it died longer ago than the consumer's
    /// inbox remembers, or the inbox says its effect was applied.
    async fn refusal(
        &self,
        m: &DeadMessage,
        domain: Domain,
        options: &ReplayOptions,
    ) -> anyhow::Result<Option<String>> {
        if m.replays >= options.max_replays {
            return Ok(Some(format!(
                "replayed {} times already (budget {}); fix the cause or purge it",
                m.replays, options.max_replays
            )));
        }
        if options.force {
            return Ok(None);
        }
        let consumer = domain.worker();
        let dead_for = m.age(Utc::now()).and_then(|a| a.to_std().ok());
        if dead_for.is_some_and(|a| a > options.inbox_retention) {
            let days = |d: std::time::Duration| d.as_secs() / 86_400;
            return Ok(Some(format!(
                "dead for {} days, longer than the inbox retention ({} days): {consumer} may have forgotten whether it applied it, so a replay could apply it twice (check its effect, then force the replay)",
                dead_for.map(days).unwrap_or_default(),
                days(options.inbox_retention)
            )));
        }
        if self.already_applied(domain, &m.message_id).await? {
            return Ok(Some(format!(
                "already applied: {consumer}'s inbox has it; replaying would change nothing (purge it, or force the replay)"
            )));
        }
        Ok(None)
    }

    /// Archives, then removes, the selected messages of `queue`.
    pub async fn purge(
        &self,
        queue: &str,
        selectors: &Selectors,
        reason: Option<&str>,
        dry_run: bool,
        confirm: impl FnOnce(usize) -> bool,
    ) -> anyhow::Result<Vec<Outcome>> {
        let snapshot = Snapshot::take(&self.connection, queue).await?;
        let chosen = snapshot.chosen(selectors);
        let mut outcomes = Vec::new();
        if dry_run || chosen.is_empty() || !confirm(chosen.len()) {
            let action = if dry_run { "would purge" } else { "kept" };
            for m in chosen {
                outcomes.push(Outcome {
                    message_id: m.message_id.clone(),
                    action,
                    detail: String::new(),
                });
            }
            snapshot.release().await;
            return Ok(outcomes);
        }
        // Every chosen message is encoded before any is archived: if one
        // cannot be archived exactly, none is purged.
        let mut encoded = Vec::with_capacity(chosen.len());
        for m in &chosen {
            match message::encode_properties(&m.properties) {
                Ok(e) => encoded.push(e),
                Err(e) => {
                    let e = e.context(format!("{} was not purged", m.message_id));
                    snapshot.release().await;
                    return Err(e);
                }
            }
        }
        for (m, encoded) in chosen.into_iter().zip(encoded) {
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO dlq.archive \
                 (queue, message_id, properties, properties_encoded, body, purged_by, reason) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
            )
            .bind(queue)
            .bind(&m.message_id)
            .bind(message::properties_json(&m.properties))
            .bind(encoded)
            .bind(&m.body)
            .bind(&self.operator)
            .bind(reason)
            .fetch_one(&self.pool)
            .await?;
            snapshot.ack(m.delivery_tag).await?;
            self.audit(
                "purge",
                queue,
                &m.message_id,
                json!({"archive_id": id, "reason": reason}),
            )
            .await?;
            outcomes.push(Outcome {
                message_id: m.message_id.clone(),
                action: "purged",
                detail: format!("archived as {id}"),
            });
        }
        snapshot.release().await;
        Ok(outcomes)
    }

    /// Puts archived messages back into their dead queue.
    pub async fn restore(
        &self,
        queue: &str,
        ids: &[String],
        all: bool,
    ) -> anyhow::Result<Vec<Outcome>> {
        if ids.is_empty() && !all {
            bail!("name the messages to restore by id, or restore all");
        }
        let rows: Vec<ArchiveRow> = sqlx::query_as(
            "SELECT id, message_id, properties, properties_encoded, body FROM dlq.archive \
             WHERE queue = $1 AND restored_at IS NULL AND ($2 OR message_id = ANY($3)) ORDER BY id",
        )
        .bind(queue)
        .bind(all)
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        let mut outcomes = Vec::new();
        for (id, message_id, properties, encoded, body) in rows {
            let message_id = message_id.unwrap_or_default();
            // Rows archived before the exact encoding have only the JSON.
            let properties = match encoded {
                Some(encoded) => message::decode_properties(&encoded)
                    .with_context(|| format!("archive row {id} ({message_id})"))?,
                None => message::properties_from_json(&properties),
            };
            self.publisher
                .publish_raw("", queue, &body, properties)
                .await
                .with_context(|| format!("restoring {message_id} was not confirmed"))?;
            sqlx::query("UPDATE dlq.archive SET restored_at = now() WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?;
            self.audit("restore", queue, &message_id, json!({"archive_id": id}))
                .await?;
            outcomes.push(Outcome {
                message_id,
                action: "restored",
                detail: format!("from archive {id}"),
            });
        }
        Ok(outcomes)
    }
}

/// An archived message as `restore` reads it: id, message id, properties
/// as JSON, properties as AMQP encodes them (none for rows archived before
/// that column), body.
type ArchiveRow = (i64, Option<String>, Value, Option<Vec<u8>>, Vec<u8>);

/// The replayed copy: same id and body, a fresh attempt count, one more
/// replay, and none of the previous death's headers.
pub fn replay_properties(m: &DeadMessage) -> BasicProperties {
    let mut table = m
        .properties
        .headers()
        .clone()
        .unwrap_or_default()
        .inner()
        .clone();
    for h in [
        headers::ERROR_KIND,
        headers::ERROR,
        headers::ATTEMPTS,
        headers::FIRST_FAILED_AT,
        headers::ORIGINAL_EXCHANGE,
        headers::ORIGINAL_ROUTING_KEY,
        headers::DEATH,
        headers::DELIVERY_COUNT,
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    ] {
        table.remove(&ShortString::from(h));
    }
    table.insert(
        ShortString::from(headers::ATTEMPT),
        AMQPValue::LongLongInt(1),
    );
    table.insert(
        ShortString::from(headers::REPLAYS),
        AMQPValue::LongLongInt(m.replays + 1),
    );
    m.properties.clone().with_headers(FieldTable::from(table))
}

/// Counts per group for `list --group-by`.
pub fn group(messages: &[&DeadMessage], by: GroupBy) -> Vec<(String, usize)> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for m in messages {
        let key = match by {
            GroupBy::Error => m.error.clone(),
            GroupBy::Type => m.kind.clone(),
            GroupBy::Kind => m.error_kind.clone(),
        };
        *counts.entry(key).or_default() += 1;
    }
    let mut out: Vec<(String, usize)> = counts.into_iter().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[derive(Debug, Clone, Copy)]
pub enum GroupBy {
    Error,
    Type,
    Kind,
}
