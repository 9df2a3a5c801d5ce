//! A handler whose behaviour each message chooses, for the runtime's tests:
//! succeed, fail transiently until some attempt, fail permanently, crash the
//! process, sleep, emit an event. It records each invocation outside the
//! transaction and each effect inside it, so tests can count both.

use crate::{
    Context, Failure, Fresh, Handler, Inbound, Malformed, Message, Outgoing, Together, decode_json,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub const PROBE_KIND: &str = "inventory.probe";
pub const PROBED_KIND: &str = "inventory.probed";

pub const PROBE_TABLES: &str = "
    CREATE TABLE IF NOT EXISTS probe_invocations (id text NOT NULL, attempt int NOT NULL, at timestamptz NOT NULL DEFAULT now());
    CREATE TABLE IF NOT EXISTS probe_effects (id text NOT NULL, message_id uuid NOT NULL, at timestamptz NOT NULL DEFAULT now(), txid bigint NOT NULL DEFAULT txid_current());
";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Probe {
    pub id: String,
    /// `transient`, `permanent`, `crash`, `write-then-permanent` (writes its
    /// effect, then refuses) or `sql-error` (a failing statement, which
    /// aborts what the transaction did since the message began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<String>,
    /// With `transient`: the attempt that finally succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub succeed_at_attempt: Option<u32>,
    #[serde(default)]
    pub sleep_ms: u64,
    /// Blocks its thread this long at its first attempt, as a handler
    /// doing blocking work in place would: out of reach of the handler
    /// deadline.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub block_ms: u64,
    #[serde(default)]
    pub emit: bool,
}

impl Message for Probe {
    const KIND: &'static str = PROBE_KIND;
    const EXCHANGE: &'static str = contract::COMMANDS;
}

#[derive(Debug, Serialize)]
pub struct Probed {
    pub id: String,
}

impl Message for Probed {
    const KIND: &'static str = PROBED_KIND;
    const EXCHANGE: &'static str = contract::EVENTS;
}

pub enum ProbeMessage {
    Probe(Probe),
}

impl Inbound for ProbeMessage {
    fn decode(kind: &str, body: &[u8]) -> Result<Self, Malformed> {
        match kind {
            PROBE_KIND => decode_json(kind, body).map(ProbeMessage::Probe),
            other => Err(Malformed::UnknownType(other.to_owned())),
        }
    }
}

/// `OUTSIDE_EFFECTS` chooses how shared transactions treat it (savepoint
/// per message, or roll back and run alone); its invocation log is kept
/// outside the transaction either way.
pub struct ProbeHandler<const OUTSIDE_EFFECTS: bool = true> {
    pub pool: sqlx::PgPool,
}

impl<const OUTSIDE_EFFECTS: bool> Handler for ProbeHandler<OUTSIDE_EFFECTS> {
    type Message = ProbeMessage;
    const OUTSIDE_EFFECTS: bool = OUTSIDE_EFFECTS;

    async fn handle(&self, ctx: &mut Context, message: ProbeMessage) -> Result<(), Failure> {
        let ProbeMessage::Probe(probe) = message;
        let attempt = ctx.envelope().attempt;
        sqlx::query("INSERT INTO probe_invocations (id, attempt) VALUES ($1, $2)")
            .bind(&probe.id)
            .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
            .execute(&self.pool)
            .await?;
        if probe.sleep_ms > 0 {
            tokio::time::sleep(Duration::from_millis(probe.sleep_ms)).await;
        }
        if probe.block_ms > 0 && attempt == 1 {
            // In place: the handler's future is stuck in this poll, where
            // no deadline reaches it, while the runtime moves its other
            // tasks (the `/readyz` server among them) to another thread.
            tokio::task::block_in_place(|| {
                std::thread::sleep(Duration::from_millis(probe.block_ms))
            });
        }
        match probe.fail.as_deref() {
            Some("transient") if probe.succeed_at_attempt.is_none_or(|n| attempt < n) => {
                return Err(Failure::transient(format!(
                    "probe {} fails at attempt {attempt}",
                    probe.id
                )));
            }
            Some("permanent") => {
                return Err(Failure::permanent(format!("probe {} is refused", probe.id)));
            }
            Some("crash") => std::process::abort(),
            Some("write-then-permanent") => {
                sqlx::query("INSERT INTO probe_effects (id, message_id) VALUES ($1, $2)")
                    .bind(&probe.id)
                    .bind(ctx.envelope().message_id)
                    .execute(ctx.db())
                    .await?;
                return Err(Failure::permanent(format!(
                    "probe {} wrote, then refused",
                    probe.id
                )));
            }
            Some("sql-error") => {
                sqlx::query("SELECT 1 / 0").execute(ctx.db()).await?;
            }
            _ => {}
        }
        sqlx::query("INSERT INTO probe_effects (id, message_id) VALUES ($1, $2)")
            .bind(&probe.id)
            .bind(ctx.envelope().message_id)
            .execute(ctx.db())
            .await?;
        if probe.emit {
            ctx.emit(Outgoing::of(&Probed { id: probe.id }));
        }
        Ok(())
    }

    /// Plain probes of a chunk are recorded together, one statement for
    /// their invocations and one for their effects, so the fault tests run
    /// through the runtime's set-based path as the domain workers do.
    async fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<ProbeMessage>>,
    ) -> Result<Vec<Fresh<ProbeMessage>>, Failure> {
        let (plain, left): (Vec<_>, Vec<_>) = messages.into_iter().partition(|fresh| {
            let ProbeMessage::Probe(probe) = &fresh.message;
            probe.plain()
        });
        if plain.is_empty() {
            return Ok(left);
        }
        let mut ids = Vec::with_capacity(plain.len());
        let mut attempts = Vec::with_capacity(plain.len());
        let mut message_ids = Vec::with_capacity(plain.len());
        for fresh in &plain {
            let ProbeMessage::Probe(probe) = &fresh.message;
            ids.push(probe.id.clone());
            attempts.push(i32::try_from(fresh.envelope.attempt).unwrap_or(i32::MAX));
            message_ids.push(fresh.envelope.message_id);
        }
        sqlx::query(
            "INSERT INTO probe_invocations (id, attempt) SELECT * FROM UNNEST($1::text[], $2::int[])",
        )
        .bind(&ids)
        .bind(&attempts)
        .execute(&self.pool)
        .await?;
        sqlx::query(
            "INSERT INTO probe_effects (id, message_id) SELECT * FROM UNNEST($1::text[], $2::uuid[])",
        )
        .bind(&ids)
        .bind(&message_ids)
        .execute(ctx.db())
        .await?;
        for fresh in plain {
            let ProbeMessage::Probe(probe) = fresh.message;
            if probe.emit {
                ctx.emit(&fresh.envelope, Outgoing::of(&Probed { id: probe.id }));
            }
        }
        Ok(left)
    }
}

impl Probe {
    /// Succeeds at once, without sleeping: the handler may apply it
    /// together with others of its chunk.
    fn plain(&self) -> bool {
        self.fail.is_none() && self.sleep_ms == 0 && self.block_ms == 0
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

pub fn probe_spec() -> crate::WorkerSpec {
    crate::WorkerSpec {
        name: "probe-worker",
        domain: contract::Domain::Inventory,
        schema: "inventory",
    }
}
