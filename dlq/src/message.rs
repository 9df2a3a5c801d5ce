//! A dead message as `dlq` sees it: the reason it died, where it came from,
//! and its properties as JSON (for `show` and for reading the archive) and
//! as AMQP encodes them (for the archive, so `restore` is exact).

use chrono::{DateTime, Utc};
use contract::headers;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use runtime::envelope::{header_int, header_str};
use serde_json::{Map, Value, json};

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

/// Text as JSON can carry it (PostgreSQL's `jsonb` refuses `\u0000`):
/// UTF-8 without NUL as a string, anything else as `{"hex": "…"}`, so that
/// `show` prints it and `purge` can archive it.
fn bytes_json(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) if !text.contains('\0') => json!(text),
        _ => hex_json(bytes),
    }
}

fn hex_json(bytes: &[u8]) -> Value {
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    json!({ "hex": hex })
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
        AMQPValue::ShortString(s) => bytes_json(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => bytes_json(s.as_bytes()),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_to_json).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table_to_json(t),
        AMQPValue::ByteArray(b) => hex_json(b.as_slice()),
        AMQPValue::Void => Value::Null,
    }
}

pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().replace('\0', "\u{fffd}"), amqp_to_json(v)))
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
    let s = |v: &Option<ShortString>| v.as_ref().map(|x| bytes_json(x.as_str().as_bytes()));
    json!({
        "content_type": s(p.content_type()),
        "content_encoding": s(p.content_encoding()),
        "message_id": s(p.message_id()),
        "type": s(p.kind()),
        "correlation_id": s(p.correlation_id()),
        "reply_to": s(p.reply_to()),
        "app_id": s(p.app_id()),
        "user_id": s(p.user_id()),
        "timestamp": p.timestamp(),
        "delivery_mode": p.delivery_mode(),
        "priority": p.priority(),
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
    if let Some(x) = text("content_encoding") {
        p = p.with_content_encoding(x);
    }
    if let Some(x) = text("reply_to") {
        p = p.with_reply_to(x);
    }
    if let Some(x) = text("app_id") {
        p = p.with_app_id(x);
    }
    if let Some(x) = v["priority"].as_u64().and_then(|d| u8::try_from(d).ok()) {
        p = p.with_priority(x);
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

/// `p` as the AMQP content header carries it: every property and every
/// header with its type. JSON cannot hold that (byte strings that are not
/// UTF-8, timestamps, the width of integers), so the archive keeps this
/// beside the JSON and `restore` publishes from it. The encoding is read
/// back before it is returned: properties it would not give back exactly
/// are an error, and the message stays where it is.
pub fn encode_properties(p: &BasicProperties) -> anyhow::Result<Vec<u8>> {
    let encoded = cookie_factory::gen_simple(lapin::protocol::basic::gen_properties(p), Vec::new())
        .map_err(|e| anyhow::anyhow!("the message's properties could not be encoded: {e:?}"))?;
    if decode_properties(&encoded).ok().as_ref() != Some(p) {
        anyhow::bail!("the message's properties would not be archived exactly: {p:?}");
    }
    Ok(encoded)
}

/// The properties [`encode_properties`] wrote; an error for anything else
/// (a damaged archive row), never a guess.
pub fn decode_properties(bytes: &[u8]) -> anyhow::Result<BasicProperties> {
    match lapin::protocol::basic::parse_properties(bytes) {
        Ok(([], properties)) => Ok(properties),
        Ok((rest, _)) => anyhow::bail!(
            "the archived properties have {} bytes more than their encoding",
            rest.len()
        ),
        Err(e) => anyhow::bail!("the archived properties are not an AMQP encoding: {e}"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};

    /// Every property, and a header of every type, including what JSON
    /// loses: bytes that are not UTF-8, a timestamp, a byte array, a float.
    fn everything() -> BasicProperties {
        let mut death = FieldTable::default();
        death.insert("time".into(), AMQPValue::Timestamp(1_764_720_000));
        death.insert("count".into(), AMQPValue::LongLongInt(3));
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        let mut headers = FieldTable::default();
        headers.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        headers.insert(
            "x-binary".into(),
            AMQPValue::LongString(LongString::from(vec![0xff_u8, 0x00, 0xfe])),
        );
        headers.insert(
            "x-bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![1_u8, 2, 3])),
        );
        headers.insert("x-flag".into(), AMQPValue::Boolean(true));
        headers.insert("x-small".into(), AMQPValue::ShortShortInt(-3));
        // No short string: lapin writes one as `s`, which RabbitMQ (and
        // lapin's parser) read as a short integer; RabbitMQ never sends one.
        headers.insert("x-float".into(), AMQPValue::Float(1.5));
        headers.insert(
            "x-decimal".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1999,
            }),
        );
        headers.insert("x-void".into(), AMQPValue::Void);
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("gzip".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(7)
            .with_correlation_id("order-1".into())
            .with_reply_to("replies".into())
            .with_expiration("60000".into())
            .with_message_id("m-1".into())
            .with_timestamp(1_764_720_001)
            .with_type("inventory.reserve".into())
            .with_user_id("guest".into())
            .with_app_id("shop".into())
            .with_cluster_id("c".into())
    }

    #[test]
    fn every_property_and_header_survives_encoding() {
        let original = everything();
        let decoded = decode_properties(&encode_properties(&original).unwrap()).unwrap();
        assert_eq!(decoded, original);
    }

    #[test]
    fn json_loses_what_the_encoding_keeps() {
        // Why the archive keeps both: the JSON round trip is not exact.
        let original = everything();
        assert_ne!(properties_from_json(&properties_json(&original)), original);
    }

    #[test]
    fn json_carries_binary_as_hex_and_never_a_nul() {
        let json = properties_json(&everything());
        assert_eq!(json["headers"]["x-binary"], json!({"hex": "ff00fe"}));
        assert_eq!(json["headers"]["x-bytes"], json!({"hex": "010203"}));
        assert_eq!(json["priority"], json!(7));
        assert_eq!(json["app_id"], json!("shop"));
        assert!(!json.to_string().contains("\\u0000"));
    }

    #[test]
    fn no_properties_at_all_survive_too() {
        let none = BasicProperties::default();
        assert_eq!(
            decode_properties(&encode_properties(&none).unwrap()).unwrap(),
            none
        );
    }

    #[test]
    fn properties_that_would_not_come_back_exactly_are_refused() {
        // A short string in a table reads back as a short integer.
        let mut headers = FieldTable::default();
        headers.insert("x-short".into(), AMQPValue::ShortString("s".into()));
        let odd = BasicProperties::default().with_headers(headers);
        assert!(encode_properties(&odd).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_properties() {
        assert!(decode_properties(b"").is_err());
        // Flags announcing a content type whose length runs past the end.
        assert!(decode_properties(&[0x80, 0x00, 0x20, b'a']).is_err());
        let mut trailing = encode_properties(&everything()).unwrap();
        trailing.push(0);
        assert!(decode_properties(&trailing).is_err());
    }
}
