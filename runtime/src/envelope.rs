//! The envelope: what every message carries besides its payload.
//!
//! AMQP properties `message_id` (UUID), `type`, `correlation_id` (the order
//! id), `timestamp`, `content_type` (`application/json`), persistent delivery
//! mode, and headers `x-attempt` and W3C `traceparent`. Payloads are typed
//! and named by `type`; see [`Message`] and [`Inbound`].

use contract::headers;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::Duration;
use uuid::Uuid;

pub const CONTENT_TYPE: &str = "application/json";
/// AMQP delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

// The payload traits live with the payloads, in the contract.
pub use contract::{Inbound, Malformed, Message, decode_json};

/// What the runtime read from a delivery's properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub message_id: Uuid,
    pub kind: String,
    pub correlation_id: Option<String>,
    pub timestamp: Option<u64>,
    pub traceparent: Option<String>,
    /// Which attempt this delivery is, from 1.
    pub attempt: u32,
}

impl Envelope {
    /// The envelope of work no delivery started (a deadline scan): a fresh
    /// id, no correlation, a new trace for whatever the work emits.
    pub fn started_here(kind: &str) -> Self {
        Self {
            message_id: Uuid::now_v7(),
            kind: kind.to_owned(),
            correlation_id: None,
            timestamp: Some(now_secs()),
            traceparent: None,
            attempt: 1,
        }
    }

    pub fn parse(properties: &BasicProperties) -> Result<Self, Malformed> {
        let content_type = properties.content_type().as_ref().map(|c| c.to_string());
        if content_type.as_deref() != Some(CONTENT_TYPE) {
            return Err(Malformed::ContentType(content_type));
        }
        let id = properties
            .message_id()
            .as_ref()
            .ok_or(Malformed::MissingMessageId)?
            .to_string();
        let message_id = Uuid::parse_str(&id).map_err(|_| Malformed::BadMessageId(id))?;
        let kind = properties
            .kind()
            .as_ref()
            .map(|k| k.to_string())
            .filter(|k| !k.is_empty())
            .ok_or(Malformed::MissingType)?;
        let headers = properties.headers().as_ref();
        Ok(Self {
            message_id,
            kind,
            correlation_id: properties.correlation_id().as_ref().map(|c| c.to_string()),
            timestamp: *properties.timestamp(),
            traceparent: headers.and_then(|h| header_str(h, headers::TRACEPARENT)),
            attempt: headers
                .and_then(|h| header_int(h, headers::ATTEMPT))
                .and_then(|a| u32::try_from(a).ok())
                .filter(|a| *a >= 1)
                .unwrap_or(1),
        })
    }
}

/// A message on its way out, from a handler (through the outbox) or a producer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub message_id: Uuid,
    pub exchange: String,
    pub routing_key: String,
    pub kind: String,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
    /// Per-message expiration. Nothing emits one now; outbox rows written
    /// by versions that scheduled payment timeouts through `order.delay`
    /// carry one and are relayed with it (decision 0008).
    pub expiration: Option<Duration>,
    pub body: Vec<u8>,
}

impl Outgoing {
    /// A typed message, routed by its kind on its exchange. Its id is a
    /// UUIDv7: ids that grow with time keep every consumer's inbox index
    /// appending at its right edge instead of touching a random page per
    /// message (decision 0015).
    pub fn of<M: Message>(payload: &M) -> Self {
        Self {
            message_id: Uuid::now_v7(),
            exchange: M::EXCHANGE.to_owned(),
            routing_key: M::KIND.to_owned(),
            kind: M::KIND.to_owned(),
            correlation_id: None,
            traceparent: Some(child_traceparent(None)),
            expiration: None,
            // Serializing plain data structs into a Vec cannot fail.
            body: serde_json::to_vec(payload).unwrap_or_default(),
        }
    }

    /// Sets the correlation id (the order id).
    pub fn correlated(mut self, correlation_id: impl ToString) -> Self {
        self.correlation_id = Some(correlation_id.to_string());
        self
    }

    /// Uses a chosen message id, so that the same cause always produces the
    /// same message and consumers can deduplicate it (an idempotency key).
    pub fn with_message_id(mut self, id: Uuid) -> Self {
        self.message_id = id;
        self
    }

    /// Continues the trace of a request that carried a W3C `traceparent`
    /// (the HTTP header); without one, or with one that is not valid, the
    /// message starts a trace of its own.
    pub fn traced_from(mut self, parent: Option<&str>) -> Self {
        if let Some(parent) = parent.filter(|p| is_traceparent(p)) {
            self.traceparent = Some(child_traceparent(Some(parent)));
        }
        self
    }

    /// Continues the trace and correlation of the message being handled.
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        if self.correlation_id.is_none() {
            self.correlation_id.clone_from(&cause.correlation_id);
        }
        self.traceparent = Some(child_traceparent(cause.traceparent.as_deref()));
        self
    }

    /// The AMQP properties of a first attempt.
    pub fn properties(&self) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(1));
        let traceparent = self
            .traceparent
            .clone()
            .unwrap_or_else(|| child_traceparent(None));
        headers.insert(
            headers::TRACEPARENT.into(),
            AMQPValue::LongString(LongString::from(traceparent.as_str())),
        );
        let mut props = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type(CONTENT_TYPE.into())
            .with_message_id(self.message_id.to_string().as_str().into())
            .with_type(self.kind.as_str().into())
            .with_timestamp(now_secs())
            .with_headers(headers);
        if let Some(c) = &self.correlation_id {
            props = props.with_correlation_id(c.as_str().into());
        }
        if let Some(e) = self.expiration {
            props = props.with_expiration(e.as_millis().to_string().as_str().into());
        }
        props
    }
}

pub fn now_secs() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp()).unwrap_or_default()
}

/// A W3C traceparent for a new span: the parent's trace id (or a new one)
/// and a new span id.
pub fn child_traceparent(parent: Option<&str>) -> String {
    let trace_id = parent
        .and_then(|p| p.split('-').nth(1))
        .filter(|t| t.len() == 32 && t.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    format!("00-{trace_id}-{:016x}-01", rand::random::<u64>())
}

/// Whether `value` is a W3C traceparent this system can continue: version
/// `00`, a trace id and a parent id in lower-case hex, neither all zeros,
/// and flags.
pub fn is_traceparent(value: &str) -> bool {
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && s.bytes().any(|b| b != b'0')
    };
    let parts: Vec<&str> = value.trim().split('-').collect();
    matches!(parts.as_slice(), ["00", trace, parent, flags]
        if hex(trace, 32) && hex(parent, 16) && flags.len() == 2
            && flags.bytes().all(|b| b.is_ascii_hexdigit()))
}

pub fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

pub fn header_int(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::ShortShortInt(v) => Some((*v).into()),
        AMQPValue::ShortShortUInt(v) => Some((*v).into()),
        AMQPValue::ShortInt(v) => Some((*v).into()),
        AMQPValue::ShortUInt(v) => Some((*v).into()),
        AMQPValue::LongInt(v) => Some((*v).into()),
        AMQPValue::LongUInt(v) => Some((*v).into()),
        AMQPValue::LongLongInt(v) => Some(*v),
        AMQPValue::Timestamp(v) => i64::try_from(*v).ok(),
        AMQPValue::LongString(s) => s.to_string().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[derive(serde::Serialize)]
    struct Ping {
        n: u32,
    }
    impl Message for Ping {
        const KIND: &'static str = "test.ping";
        const EXCHANGE: &'static str = "commands";
    }

    #[test]
    fn an_outgoing_message_parses_back_into_its_envelope() {
        let out = Outgoing::of(&Ping { n: 1 }).correlated("order-1");
        let env = Envelope::parse(&out.properties()).expect("valid envelope");
        assert_eq!(env.message_id, out.message_id);
        assert_eq!(env.kind, "test.ping");
        assert_eq!(env.correlation_id.as_deref(), Some("order-1"));
        assert_eq!(env.attempt, 1);
        assert!(env.traceparent.is_some_and(|t| t.starts_with("00-")));
        assert_eq!(out.body, br#"{"n":1}"#);
    }

    /// Ids that grow with time keep the inbox indexes appending at their
    /// right edge (decision 0015).
    #[test]
    fn message_ids_are_time_ordered() {
        let ids: Vec<Uuid> = (0..1000)
            .map(|n| Outgoing::of(&Ping { n }).message_id)
            .collect();
        assert!(
            ids.iter()
                .all(|id| id.get_version() == Some(uuid::Version::SortRand))
        );
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn broken_envelopes_are_malformed_with_the_reason() {
        let good = Outgoing::of(&Ping { n: 1 }).properties();
        let no_ct = good.clone().with_content_type("text/plain".into());
        assert_eq!(
            Envelope::parse(&no_ct),
            Err(Malformed::ContentType(Some("text/plain".into())))
        );
        let bad_id = good.clone().with_message_id("42".into());
        assert_eq!(
            Envelope::parse(&bad_id),
            Err(Malformed::BadMessageId("42".into()))
        );
        assert_eq!(
            Envelope::parse(&BasicProperties::default().with_content_type(CONTENT_TYPE.into())),
            Err(Malformed::MissingMessageId)
        );
        let no_type = good.with_type("".into());
        assert_eq!(Envelope::parse(&no_type), Err(Malformed::MissingType));
    }

    #[test]
    fn a_request_s_traceparent_is_continued_only_when_valid() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let probe = || Outgoing::of(&Ping { n: 1 });
        let continued = probe().traced_from(Some(parent));
        let t = continued.traceparent.unwrap();
        assert!(t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{t}");
        assert!(
            !t.contains("00f067aa0ba902b7"),
            "a new span, not the parent's: {t}"
        );
        for garbage in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            let kept = probe().traced_from(Some(garbage)).traceparent.unwrap();
            assert!(
                !kept.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{garbage}: {kept}"
            );
            assert!(is_traceparent(&kept), "{kept}");
        }
        assert!(probe().traced_from(None).traceparent.is_some());
    }

    #[test]
    fn a_child_span_keeps_the_trace_id() {
        let parent = child_traceparent(None);
        let child = child_traceparent(Some(&parent));
        assert_eq!(parent.split('-').nth(1), child.split('-').nth(1));
        assert_ne!(parent, child);
        assert_eq!(child_traceparent(Some("garbage")).len(), 55);
    }
}
