//! Where a failed delivery goes: the next retry tier, or the dead queue,
//! each copy carrying the failure headers (`x-error`, `x-first-failed-at`,
//! where it was first published, its attempt or its dead kind). The
//! delivery is acked only once its copy is confirmed; when the copy cannot
//! be published it goes back to its queue instead.

use super::Inner;
use crate::broker::PublishError;
use crate::envelope::{Envelope, header_str, is_traceparent};
use crate::handler::Failure;
use crate::metrics::Outcome;
use crate::routing::{self, DeadKind, Route};
use backon::{ExponentialBuilder, Retryable};
use contract::headers;
use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use std::time::{Duration, Instant};
use tracing::{debug, error, warn};

/// The longest error text kept in `x-error`.
const MAX_ERROR_LEN: usize = 1000;

/// Where a message whose handling failed goes: the dead queue at once when
/// the failure is permanent, else the next retry tier (or the dead queue
/// when the tiers are used up); a failure of a dependency whose circuit
/// breaker is open (or opens with it) spends no attempt: the message waits
/// in the first tier and comes back to the gate.
pub(super) async fn settle_failure<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    envelope: &Envelope,
    failure: Failure,
) {
    match failure {
        Failure::Permanent(why) => {
            dead_letter(inner, delivery, DeadKind::Permanent, &why, envelope.attempt).await;
        }
        Failure::Unavailable { dependency, cause } => {
            if inner.breakers.failed(dependency, Instant::now()) {
                hold_back(inner, delivery, envelope, &cause).await;
            } else {
                next_tier(inner, delivery, envelope, &cause).await;
            }
        }
        Failure::Transient(why) => next_tier(inner, delivery, envelope, &why).await,
    }
}

/// After a transient failure: the next retry tier, or the dead queue when
/// the tiers are used up.
async fn next_tier<H>(inner: &Inner<H>, delivery: &Delivery, envelope: &Envelope, why: &str) {
    match routing::after_transient(envelope.attempt, &inner.settings.retry_delays) {
        Route::Retry { tier, delay } => retry(inner, delivery, envelope, tier, delay, why).await,
        Route::Dead(kind) => dead_letter(inner, delivery, kind, why, envelope.attempt).await,
    }
}

/// Sends the delivery to wait in the first retry tier with its attempt
/// unchanged, while its dependency's breaker is open; without tiers, gives
/// it back to its queue.
async fn hold_back<H>(inner: &Inner<H>, delivery: &Delivery, envelope: &Envelope, why: &str) {
    let Some(delay) = inner.settings.retry_delays.delay(1) else {
        inner.acks.requeue(delivery).await;
        inner.metrics.settled(Outcome::HeldBack, 1);
        return;
    };
    if move_to_tier(inner, delivery, 1, delay, why, &[]).await {
        debug!(queue = inner.spec.domain.queue(), message_id = %envelope.message_id, attempt = envelope.attempt, error = why, "Dependency unavailable and its breaker open; waiting without spending an attempt");
        inner.metrics.settled(Outcome::HeldBack, 1);
    }
}

/// Moves the delivery to retry tier `tier`, to come back after about
/// `delay` with its attempt counted.
async fn retry<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    envelope: &Envelope,
    tier: usize,
    delay: Duration,
    why: &str,
) {
    let next = AMQPValue::LongLongInt((envelope.attempt + 1).into());
    if move_to_tier(
        inner,
        delivery,
        tier,
        delay,
        why,
        &[(headers::ATTEMPT, next)],
    )
    .await
    {
        warn!(queue = inner.spec.domain.queue(), message_id = %envelope.message_id, kind = %envelope.kind, attempt = envelope.attempt, tier, trace_id = trace_id(delivery), error = why, "Transient failure, retrying");
        inner.metrics.settled(Outcome::Retried, 1);
    }
}

/// Publishes the delivery's copy, with the failure headers and `extra`, to
/// retry tier `tier`, expiring after about `delay`, and acks it once the
/// broker confirmed the copy: true. When the copy cannot be published the
/// delivery goes back to its queue instead: false.
async fn move_to_tier<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    tier: usize,
    delay: Duration,
    why: &str,
    extra: &[(&str, AMQPValue)],
) -> bool {
    let expiration = routing::jittered(delay).as_millis().to_string();
    let properties =
        failure_properties(delivery, why, extra).with_expiration(expiration.as_str().into());
    let target = inner.spec.domain.retry_queue(tier);
    match publish_with_retries(inner, &target, &delivery.data, properties).await {
        Ok(()) => {
            inner.acks.ack(&[delivery]).await;
            true
        }
        Err(e) => {
            requeue(inner, delivery, &target, &e).await;
            false
        }
    }
}

/// Moves the delivery to its domain's dead queue, labelled with `kind`.
pub(super) async fn dead_letter<H>(
    inner: &Inner<H>,
    delivery: &Delivery,
    kind: DeadKind,
    why: &str,
    attempts: u32,
) {
    let queue = inner.spec.domain.queue();
    let properties = failure_properties(
        delivery,
        why,
        &[
            (
                headers::ERROR_KIND,
                AMQPValue::LongString(kind.as_str().into()),
            ),
            (headers::ATTEMPTS, AMQPValue::LongLongInt(attempts.into())),
        ],
    );
    let properties = immortal(properties);
    let target = inner.spec.domain.dead_queue();
    match publish_with_retries(inner, &target, &delivery.data, properties).await {
        Ok(()) => {
            let message_id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap_or_default();
            error!(
                queue,
                message_id,
                trace_id = trace_id(delivery),
                kind = kind.as_str(),
                attempts,
                error = why,
                "Message dead-lettered"
            );
            inner.acks.ack(&[delivery]).await;
            inner.metrics.dead_lettered(kind);
        }
        Err(e) => requeue(inner, delivery, &target, &e).await,
    }
}

/// Gives the delivery back to the broker after a failed move, so it is not
/// held unacked while the publisher is away.
async fn requeue<H>(inner: &Inner<H>, delivery: &Delivery, target: &str, error: &PublishError) {
    let why = match error {
        PublishError::Unroutable { .. } => format!("queue {target:?} does not exist"),
        other => other.to_string(),
    };
    warn!(
        queue = inner.spec.domain.queue(),
        target,
        error = why,
        "Could not move the message; returning it to its queue"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    inner.acks.requeue(delivery).await;
    inner.metrics.settled(Outcome::Requeued, 1);
}

/// The trace id of the delivery's `traceparent`, for log lines an
/// operator joins with traces; empty when it has none.
fn trace_id(delivery: &Delivery) -> String {
    delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| header_str(h, headers::TRACEPARENT))
        .filter(|t| is_traceparent(t))
        .and_then(|t| t.split('-').nth(1).map(str::to_owned))
        .unwrap_or_default()
}

async fn publish_with_retries<H>(
    inner: &Inner<H>,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), PublishError> {
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_times(3);
    (|| {
        inner
            .republisher
            .publish_raw("", queue, body, properties.clone())
    })
    .retry(backoff)
    .await
}

/// The delivery's properties with the failure headers: the error, when it
/// first failed and where it was first published (kept from an earlier
/// failure), plus `extra`.
fn failure_properties(
    delivery: &Delivery,
    why: &str,
    extra: &[(&str, AMQPValue)],
) -> BasicProperties {
    let existing = delivery.properties.headers().clone().unwrap_or_default();
    let mut table = existing.inner().clone();
    let mut set = |name: &str, value: AMQPValue| {
        table.insert(ShortString::from(name), value);
    };
    if header_str(&existing, headers::FIRST_FAILED_AT).is_none() {
        set(
            headers::FIRST_FAILED_AT,
            AMQPValue::LongString(chrono::Utc::now().to_rfc3339().as_str().into()),
        );
    }
    if header_str(&existing, headers::ORIGINAL_EXCHANGE).is_none() {
        set(
            headers::ORIGINAL_EXCHANGE,
            AMQPValue::LongString(delivery.exchange.as_str().into()),
        );
        set(
            headers::ORIGINAL_ROUTING_KEY,
            AMQPValue::LongString(delivery.routing_key.as_str().into()),
        );
    }
    set(
        headers::ERROR,
        AMQPValue::LongString(LongString::from(truncated(why, MAX_ERROR_LEN))),
    );
    for (name, value) in extra {
        set(name, value.clone());
    }
    // The broker's delivery count belongs to the old queue; a fresh copy starts at zero.
    table.remove(&ShortString::from(headers::DELIVERY_COUNT));
    delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(table))
}

/// The properties without `expiration`, which is kept in the header
/// `x-original-expiration`: a dead copy with a TTL would expire out of the
/// dead queue before anyone saw it. The broker does the same for the
/// messages it dead-letters itself.
fn immortal(properties: BasicProperties) -> BasicProperties {
    let Some(expiration) = properties.expiration().clone() else {
        return properties;
    };
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(headers::ORIGINAL_EXPIRATION),
        AMQPValue::LongString(expiration.as_str().into()),
    );
    // Rebuilt field by field: the properties cannot unset one.
    let p = &properties;
    let mut copy = BasicProperties::default().with_headers(headers);
    let text = |v: &Option<ShortString>| v.clone();
    if let Some(v) = text(p.content_type()) {
        copy = copy.with_content_type(v);
    }
    if let Some(v) = text(p.content_encoding()) {
        copy = copy.with_content_encoding(v);
    }
    if let Some(v) = *p.delivery_mode() {
        copy = copy.with_delivery_mode(v);
    }
    if let Some(v) = *p.priority() {
        copy = copy.with_priority(v);
    }
    if let Some(v) = text(p.correlation_id()) {
        copy = copy.with_correlation_id(v);
    }
    if let Some(v) = text(p.reply_to()) {
        copy = copy.with_reply_to(v);
    }
    if let Some(v) = text(p.message_id()) {
        copy = copy.with_message_id(v);
    }
    if let Some(v) = *p.timestamp() {
        copy = copy.with_timestamp(v);
    }
    if let Some(v) = text(p.kind()) {
        copy = copy.with_type(v);
    }
    if let Some(v) = text(p.user_id()) {
        copy = copy.with_user_id(v);
    }
    if let Some(v) = text(p.app_id()) {
        copy = copy.with_app_id(v);
    }
    if let Some(v) = text(p.cluster_id()) {
        copy = copy.with_cluster_id(v);
    }
    copy
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

#[cfg(test)]
mod tests {
    use super::truncated;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("short", 10), "short");
        assert_eq!(truncated("abcdef", 3), "abc");
        // "é" is two bytes: a cut inside it falls back before it.
        assert_eq!(truncated("aé", 2), "a");
        assert_eq!(truncated("aé", 3), "aé");
    }
}
