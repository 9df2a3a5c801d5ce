//! Declaring the topology on a live broker, idempotently.

use crate::model::{Queue, Topology};
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use serde_json::Value;

/// A queue or exchange that already exists on the broker with other
/// properties than the declared ones. The broker refuses to change them in
/// place, so this needs an operator, never a restart loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub object: String,
    pub broker_says: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exists with other arguments than declared ({}). Run `topology diff` to see each \
             difference; to fix it, move its messages away (shovel or `dlq`), delete it and run \
             `topology apply`, or declare the old arguments again",
            self.object, self.broker_says
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeclareError {
    #[error("the broker refused the topology: {0}")]
    Broker(#[from] lapin::Error),
}

/// Declares every exchange, queue and binding. Objects that exist with other
/// arguments are reported, not fatal: the caller decides whether that stops
/// it (`topology apply`) or is logged while the existing queue keeps being
/// used (a worker, which must not crash-loop over an operator's change).
pub async fn declare(
    connection: &Connection,
    topology: &Topology,
) -> Result<Vec<Mismatch>, DeclareError> {
    let mut mismatches = Vec::new();
    let mut channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in &topology.exchanges {
        let kind = match exchange.kind {
            "topic" => ExchangeKind::Topic,
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            other => ExchangeKind::Custom(other.to_owned()),
        };
        let result = channel
            .exchange_declare(exchange.name.into(), kind, durable, FieldTable::default())
            .await;
        if let Some(m) = precondition_failed(result, || format!("exchange {}", exchange.name))? {
            mismatches.push(m);
            // A refused declaration closes the channel.
            channel = connection.create_channel().await?;
        }
    }
    for queue in &topology.queues {
        let result = channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                field_table(queue),
            )
            .await
            .map(|_| ());
        if let Some(m) = precondition_failed(result, || format!("queue {}", queue.name))? {
            mismatches.push(m);
            channel = connection.create_channel().await?;
        }
    }
    for binding in &topology.bindings {
        channel
            .queue_bind(
                binding.queue.as_str().into(),
                binding.exchange.into(),
                binding.routing_key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    // Closing is courtesy; the declarations are done either way.
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(mismatches)
}

fn precondition_failed(
    result: lapin::Result<()>,
    object: impl FnOnce() -> String,
) -> Result<Option<Mismatch>, DeclareError> {
    match result {
        Ok(()) => Ok(None),
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp)
                if *amqp.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED) =>
            {
                Ok(Some(Mismatch {
                    object: object(),
                    broker_says: amqp.get_message().to_string(),
                }))
            }
            _ => Err(e.into()),
        },
    }
}

/// The queue's arguments as AMQP field values.
pub fn field_table(queue: &Queue) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in &queue.arguments {
        table.insert(ShortString::from(key.as_str()), amqp_value(value));
    }
    table
}

fn amqp_value(value: &Value) -> AMQPValue {
    match value {
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        other => AMQPValue::LongString(LongString::from(other.to_string().as_str())),
    }
}

/// The messages ready in `queue`, by a passive declare: no permission is
/// needed, and a queue that does not exist is an error (which closes the
/// channel).
pub async fn queue_depth(channel: &Channel, queue: &str) -> Result<u32, lapin::Error> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(declared.message_count())
}
