//! Reading a delivery: its envelope, then its message. What cannot be read
//! is dead-lettered as malformed at once; retrying would not change it.

use super::{Inner, failure};
use crate::envelope::{Envelope, Inbound, header_int};
use crate::handler::Handler;
use crate::routing::DeadKind;
use contract::headers;
use lapin::message::Delivery;

/// A fresh delivery ready for its handler.
pub(super) struct Decoded<M> {
    pub delivery: Delivery,
    pub envelope: Envelope,
    pub message: M,
}

/// The delivery's envelope, or `None` once a delivery without a valid one
/// is dead-lettered as malformed.
pub(super) async fn envelope_or_bury<H>(inner: &Inner<H>, delivery: &Delivery) -> Option<Envelope> {
    match Envelope::parse(&delivery.properties) {
        Ok(envelope) => Some(envelope),
        Err(m) => {
            failure::dead_letter(inner, delivery, DeadKind::Malformed, &m.to_string(), 1).await;
            None
        }
    }
}

/// The delivery's message, or `None` once a body its handler cannot read
/// is dead-lettered as malformed.
pub(super) async fn message_or_bury<H: Handler>(
    inner: &Inner<H>,
    delivery: &Delivery,
    envelope: &Envelope,
) -> Option<H::Message> {
    match H::Message::decode(&envelope.kind, &delivery.data) {
        Ok(message) => Some(message),
        Err(m) => {
            let why = m.to_string();
            failure::dead_letter(inner, delivery, DeadKind::Malformed, &why, envelope.attempt)
                .await;
            None
        }
    }
}

/// Whether the broker handed this message out before: flagged by the
/// channel, or counted by a quorum queue.
pub(super) fn is_redelivered(delivery: &Delivery) -> bool {
    delivery.redelivered
        || delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| header_int(h, headers::DELIVERY_COUNT))
            .is_some_and(|n| n > 0)
}
