//! A dead message as `dlq` sees it: the reason it died, where it came from,
//! and its properties as JSON (for `show`, the archive and `restore`).

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use runtime::envelope::{header_int, header_str};
use serde_json::{Map, Value, json};
use topology::headers;

#[derive(Debug, Clone)]
pub struct DeadMessage {
    pub delivery_tag: u64,
    pub message_id: String,
    pub kind: String,
    pub correlation_id: String,
    pub error_kind: String,
    pub error: String,
    pub attempts: Option<i64>,
    pub replays: i64,
    pub first_failed_at: Option<DateTime<Utc>>,
    pub original_exchange: Option<String>,
    pub original_routing_key: Option<String>,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl DeadMessage {
    pub fn from_delivery(delivery_tag: u64, properties: BasicProperties, body: Vec<u8>) -> Self {
        let empty = FieldTable::default();
        let h = properties.headers().as_ref().unwrap_or(&empty);
        let death = first_death(h);
        let death_str = |key: &str| {
            death.as_ref().and_then(|d| match d.inner().get(key) {
                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                _ => None,
            })
        };
        // A message the broker dead-lettered (delivery limit) carries only x-death.
        let error_kind = header_str(h, headers::ERROR_KIND)
            .or_else(|| death_str("reason").map(|r| r.replace('_', "-")))
            .unwrap_or_else(|| "unknown".into());
        let error = header_str(h, headers::ERROR).unwrap_or_else(|| match death_str("reason") {
            Some(r) => format!("dead-lettered by the broker: {r}"),
            None => String::new(),
        });
        let death_key = death
            .as_ref()
            .and_then(|d| match d.inner().get("routing-keys") {
                Some(AMQPValue::FieldArray(a)) => a.as_slice().first().and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                }),
                _ => None,
            });
        let death_time = death.as_ref().and_then(|d| match d.inner().get("time") {
            Some(AMQPValue::Timestamp(t)) => {
                DateTime::from_timestamp(i64::try_from(*t).unwrap_or_default(), 0)
            }
            _ => None,
        });
        Self {
            delivery_tag,
            message_id: properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default(),
            kind: properties
                .kind()
                .as_ref()
                .map(|k| k.to_string())
                .unwrap_or_default(),
            correlation_id: properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string())
                .unwrap_or_default(),
            error_kind,
            error,
            attempts: header_int(h, headers::ATTEMPTS),
            replays: header_int(h, headers::REPLAYS).unwrap_or(0),
            first_failed_at: header_str(h, headers::FIRST_FAILED_AT)
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc))
                .or(death_time),
            original_exchange: header_str(h, headers::ORIGINAL_EXCHANGE)
                .or_else(|| death_str("exchange")),
            original_routing_key: header_str(h, headers::ORIGINAL_ROUTING_KEY).or(death_key),
            properties,
            body,
        }
    }

    pub fn age(&self, now: DateTime<Utc>) -> Option<chrono::Duration> {
        self.first_failed_at.map(|t| now - t)
    }

    /// The summary line of `list --json`.
    pub fn summary(&self, now: DateTime<Utc>) -> Value {
        json!({
            "message_id": self.message_id,
            "type": self.kind,
            "order_id": self.correlation_id,
            "error_kind": self.error_kind,
            "error": self.error,
            "attempts": self.attempts,
            "replays": self.replays,
            "first_failed_at": self.first_failed_at.map(|t| t.to_rfc3339()),
            "age_seconds": self.age(now).map(|a| a.num_seconds()),
            "original_exchange": self.original_exchange,
            "original_routing_key": self.original_routing_key,
        })
    }

    /// Everything, for `show`: properties, headers (with `x-death`) and the
    /// body, pretty-printed when it is JSON.
    pub fn details(&self) -> Value {
        let (body, body_is_json) = match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) => (v, true),
            Err(_) => (
                Value::String(String::from_utf8_lossy(&self.body).into_owned()),
                false,
            ),
        };
        json!({
            "properties": properties_json(&self.properties),
            "body": body,
            "body_is_json": body_is_json,
        })
    }
}

fn first_death(h: &FieldTable) -> Option<FieldTable> {
    match h.inner().get(headers::DEATH) {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().and_then(|v| match v {
            AMQPValue::FieldTable(t) => Some(t.clone()),
            _ => None,
        }),
        _ => None,
    }
}

pub fn amqp_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(i) => json!(i),
        AMQPValue::ShortShortUInt(i) => json!(i),
        AMQPValue::ShortInt(i) => json!(i),
        AMQPValue::ShortUInt(i) => json!(i),
        AMQPValue::LongInt(i) => json!(i),
        AMQPValue::LongUInt(i) => json!(i),
        AMQPValue::LongLongInt(i) => json!(i),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(format!("{d:?}")),
        AMQPValue::ShortString(s) => json!(s.to_string()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.to_string(), amqp_to_json(v)))
            .collect::<Map<_, _>>(),
    )
}

pub fn json_to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
        Value::Array(a) => AMQPValue::FieldArray(FieldArray::from(
            a.iter().map(json_to_amqp).collect::<Vec<_>>(),
        )),
        Value::Object(_) => AMQPValue::FieldTable(json_to_table(v)),
    }
}

pub fn json_to_table(v: &Value) -> FieldTable {
    let mut t = FieldTable::default();
    if let Value::Object(m) = v {
        for (k, val) in m {
            t.insert(ShortString::from(k.as_str()), json_to_amqp(val));
        }
    }
    t
}

pub fn properties_json(p: &BasicProperties) -> Value {
    let s = |v: &Option<ShortString>| v.as_ref().map(|x| x.to_string());
    json!({
        "content_type": s(p.content_type()),
        "message_id": s(p.message_id()),
        "type": s(p.kind()),
        "correlation_id": s(p.correlation_id()),
        "timestamp": p.timestamp(),
        "delivery_mode": p.delivery_mode(),
        "expiration": s(p.expiration()),
        "headers": p.headers().as_ref().map(table_to_json).unwrap_or_else(|| json!({})),
    })
}

pub fn properties_from_json(v: &Value) -> BasicProperties {
    let mut p = BasicProperties::default();
    let text = |k: &str| v[k].as_str().map(ShortString::from);
    if let Some(x) = text("content_type") {
        p = p.with_content_type(x);
    }
    if let Some(x) = text("message_id") {
        p = p.with_message_id(x);
    }
    if let Some(x) = text("type") {
        p = p.with_type(x);
    }
    if let Some(x) = text("correlation_id") {
        p = p.with_correlation_id(x);
    }
    if let Some(x) = v["timestamp"].as_u64() {
        p = p.with_timestamp(x);
    }
    if let Some(x) = v["delivery_mode"]
        .as_u64()
        .and_then(|d| u8::try_from(d).ok())
    {
        p = p.with_delivery_mode(x);
    }
    p.with_headers(json_to_table(&v["headers"]))
}
