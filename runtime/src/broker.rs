//! Connections to RabbitMQ and the publisher every binary sends through.
//!
//! Invariant: every publish waits for the broker's confirm and is
//! `mandatory`, so an unroutable message is an error, never a silent drop.
//! While the broker is unreachable a publish fails within the confirm
//! timeout instead of hanging, and the next publish reconnects.

use crate::envelope::Outgoing;
use backon::{ExponentialBuilder, Retryable};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use std::time::Duration;
use tokio::sync::Mutex;
use topology::BrokerAddresses;
use tracing::{info, warn};

/// How long a publish may wait for the broker's confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest a single broker call on an open channel (ack, subscribe) may
/// take before the connection is treated as lost.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The frame every connection proposes unless `AMQP_URL` names one
/// (`?frame_max=`): RabbitMQ's default. Connections that receive or
/// republish messages from elsewhere (a worker's consumer, its republisher
/// to retry tiers and dead queues, the `dlq` tool) need it whole: the
/// properties of a message travel in one frame, and lapin drops a
/// connection that receives a frame larger than it agreed, after which the
/// broker redelivers the message to it, for ever.
///
/// Proposed rather than left to the broker because of how lapin sizes its
/// two ring buffers of 32 frames per connection: for the frame it proposes,
/// allocated zeroed and resident only as traffic reaches each page; for a
/// larger frame agreed later, grown by writing zeros over all of it at once
/// (8 MiB resident per connection from the start; `docs/BENCHMARKS.md`,
/// 2026-12-02, fourth session). A broker configured with a larger
/// `frame_max` needs the same in `AMQP_URL`.
pub const BROKER_FRAME_MAX: u32 = 128 * 1024;

/// The frame a publisher of its own messages proposes
/// ([`Publisher::own_messages_only`]) unless `AMQP_URL` names one: a body
/// larger than a frame is split over several, and 32 KiB of properties is
/// far more than any header this system writes; the buffers are a quarter
/// of [`BROKER_FRAME_MAX`]'s.
pub const FRAME_MAX: u32 = 32 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker is unreachable or the channel broke: worth retrying later.
    #[error("the broker is unavailable: {0}")]
    Unavailable(String),
    #[error("the broker did not confirm within {0:?}")]
    Timeout(Duration),
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The broker blocks publishers (a memory or disk alarm): a publish
    /// would wait until the alarm clears, so none is started.
    #[error("the broker is blocking publishers (a memory or disk alarm)")]
    Blocked,
    /// No queue is bound for this exchange and routing key: a topology bug,
    /// or a queue deleted by hand.
    #[error("no queue is bound to exchange {exchange:?} with routing key {routing_key:?}")]
    Unroutable {
        exchange: String,
        routing_key: String,
    },
}

/// Opens a connection, named for the management UI, within
/// [`CONNECT_TIMEOUT`], proposing [`BROKER_FRAME_MAX`] unless `url` names a
/// `frame_max`.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    connect_with_frame_max(url, name, BROKER_FRAME_MAX).await
}

/// [`connect`], proposing `frame_max` unless `url` names one. `url` may
/// name the nodes of a cluster (`topology::addresses`): the first that
/// answers is taken.
async fn connect_with_frame_max(
    url: &str,
    name: &str,
    frame_max: u32,
) -> Result<Connection, lapin::Error> {
    let addresses = BrokerAddresses::parse(url).map_err(|e| {
        lapin::Error::from(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("AMQP_URL is not an AMQP URI: {e}"),
        ))
    })?;
    addresses
        .connect(name, Some(frame_max), CONNECT_TIMEOUT)
        .await
}

/// How a process waits for a server it needs (the broker, the database):
/// from 200 ms, doubling to 5 s, jittered, never giving up; the caller
/// decides what is worth waiting for and races its shutdown signal.
pub(crate) fn until_reachable() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

/// Connects, retrying with exponential backoff (capped at 5 s) until it
/// succeeds. Callers race it against their shutdown signal.
pub async fn connect_with_backoff(url: &str, name: &str) -> Connection {
    let result = (|| connect(url, name))
        .retry(until_reachable())
        .notify(|e, delay| warn!(connection = name, error = %e, retry_in = ?delay, "Broker unreachable"))
        .await;
    match result {
        Ok(c) => {
            info!(connection = name, "Connected to the broker");
            c
        }
        // `without_max_times` never gives up, so this arm cannot be reached.
        Err(_) => std::future::pending().await,
    }
}

/// Publishes with confirms on a connection of its own (the broker throttles
/// publishing connections, which must not slow down consumers).
pub struct Publisher {
    url: String,
    name: String,
    /// The frame its connection proposes unless the URL names one.
    frame_max: u32,
    channel: Mutex<Option<(Connection, Channel)>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("name", &self.name)
            .finish()
    }
}

impl Publisher {
    /// A publisher that connects on first use (and after any failure).
    pub fn lazy(url: &str, name: &str) -> Self {
        Self {
            url: url.to_owned(),
            name: name.to_owned(),
            frame_max: BROKER_FRAME_MAX,
            channel: Mutex::new(None),
        }
    }

    /// For a publisher whose every message, headers included, is built in
    /// this process: its connection proposes [`FRAME_MAX`], a quarter of
    /// the buffers. Not for one that republishes what it received.
    pub fn own_messages_only(self) -> Self {
        Self {
            frame_max: FRAME_MAX,
            ..self
        }
    }

    /// A publisher that is connected before it is returned.
    pub async fn connect(url: &str, name: &str) -> Result<Self, PublishError> {
        let publisher = Self::lazy(url, name);
        publisher.channel().await?;
        Ok(publisher)
    }

    /// Whether the last connection is still open (for readiness checks).
    pub async fn is_connected(&self) -> bool {
        let guard = self.channel.lock().await;
        guard
            .as_ref()
            .is_some_and(|(c, ch)| c.status().connected() && ch.status().connected())
    }

    /// Whether the broker has blocked this publisher's connection (a memory
    /// or disk alarm, `connection.blocked`): a publish would wait until the
    /// alarm clears.
    pub async fn is_blocked(&self) -> bool {
        let guard = self.channel.lock().await;
        guard.as_ref().is_some_and(|(c, _)| c.status().blocked())
    }

    /// Connects now if not connected (readiness checks, warm-up).
    pub async fn ensure_connected(&self) -> Result<(), PublishError> {
        self.channel().await.map(drop)
    }

    /// The open channel, and whether this call opened it.
    async fn channel(&self) -> Result<(Channel, bool), PublishError> {
        let mut guard = self.channel.lock().await;
        if let Some((connection, channel)) = guard.as_ref()
            && connection.status().connected()
            && channel.status().connected()
        {
            return Ok((channel.clone(), false));
        }
        *guard = None;
        let unavailable = |e: lapin::Error| PublishError::Unavailable(e.to_string());
        let connection = connect_with_frame_max(&self.url, &self.name, self.frame_max)
            .await
            .map_err(unavailable)?;
        let open = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        let channel = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| PublishError::Timeout(CONNECT_TIMEOUT))?
            .map_err(unavailable)?;
        info!(connection = %self.name, "Publisher connected");
        *guard = Some((connection, channel.clone()));
        Ok((channel, true))
    }

    async fn forget_channel(&self) {
        *self.channel.lock().await = None;
    }

    /// Publishes one message and waits for its confirm.
    pub async fn publish(&self, message: &Outgoing) -> Result<(), PublishError> {
        self.publish_all(std::slice::from_ref(message)).await
    }

    /// Publishes every message with one confirm each; the first failure.
    pub async fn publish_all(&self, messages: &[Outgoing]) -> Result<(), PublishError> {
        self.publish_each(messages).await?.into_iter().collect()
    }

    /// Publishes every message and returns each one's own outcome: a
    /// message the broker cannot route or refuses does not fail the others.
    /// `Err` when the channel itself failed (the broker away, no confirm in
    /// time): then nothing is known of any of them.
    pub async fn publish_each(
        &self,
        messages: &[Outgoing],
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        self.send(|| {
            messages
                .iter()
                .map(|m| {
                    (
                        m.exchange.as_str(),
                        m.routing_key.as_str(),
                        m.body.as_slice(),
                        m.properties(),
                    )
                })
                .collect()
        })
        .await
    }

    /// Publishes a body with explicit properties (retry tiers, dead queues, replays).
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(|| vec![(exchange, routing_key, body, properties.clone())])
            .await?
            .into_iter()
            .collect()
    }

    /// The one send path: publish all, then await all confirms. A broken or
    /// silent channel is forgotten, so the next publish reconnects.
    ///
    /// A connection that died since its last use (a broker restart, a
    /// cluster node gone) is found out only when it is written to; then the
    /// batch goes once more on a new connection, to the next node that
    /// answers, rather than failing a caller who could not have known. A
    /// message of the batch that reached the broker before is then there
    /// twice, with one `message_id`, which consumers' inboxes absorb.
    async fn send<'a>(
        &self,
        batch: impl Fn() -> Vec<Publication<'a>>,
    ) -> Result<Vec<Result<(), PublishError>>, PublishError> {
        let first = batch();
        if first.is_empty() {
            return Ok(Vec::new());
        }
        // Refused at once: a publish on a blocked connection would hang
        // until the alarm clears, and go out long after its caller gave up.
        if self.is_blocked().await {
            return Err(PublishError::Blocked);
        }
        let result = async {
            let (channel, opened) = self.channel().await?;
            match publish_on(&channel, first).await {
                Err(PublishError::Unavailable(e)) if !opened => {
                    warn!(connection = %self.name, error = %e, "The connection broke since its last use; publishing again on a new one");
                    self.forget_channel().await;
                    let (channel, _) = self.channel().await?;
                    publish_on(&channel, batch()).await
                }
                other => other,
            }
        }
        .await;
        // A broker that blocks publishers (a resource alarm) stops reading
        // a connection when it publishes and tells it so: the confirm then
        // times out on a connection that is fine. It is kept, blocked, so
        // that the next publishes are refused at once until the alarm
        // clears, instead of each waiting for its confirm on a new one.
        if matches!(result, Err(PublishError::Timeout(_))) && self.is_blocked().await {
            return Err(PublishError::Blocked);
        }
        if matches!(
            result,
            Err(PublishError::Unavailable(_) | PublishError::Timeout(_))
        ) {
            self.forget_channel().await;
        }
        result
    }

    pub async fn close(&self) {
        if let Some((connection, _)) = self.channel.lock().await.take() {
            let _ = connection.close(200, "shutting down".into()).await;
        }
    }
}

/// Exchange, routing key, body and properties of one message to send.
type Publication<'a> = (&'a str, &'a str, &'a [u8], BasicProperties);

/// Publishes all on `channel`, then awaits all confirms: each message's
/// outcome, or `Err` when the channel failed.
async fn publish_on(
    channel: &Channel,
    batch: Vec<Publication<'_>>,
) -> Result<Vec<Result<(), PublishError>>, PublishError> {
    // Started together: each publish hands its frames to lapin's I/O loop
    // and waits until they are written, so one after the other would cost
    // a wake-up and a socket write each. Polled in order, they queue their
    // frames in order and go out together.
    let pending = futures::future::try_join_all(batch.into_iter().map(
        |(exchange, routing_key, body, properties)| async move {
            let confirm = start_publish(channel, exchange, routing_key, body, properties).await?;
            Ok::<_, PublishError>((exchange, routing_key, confirm))
        },
    ))
    .await?;
    let mut outcomes = Vec::with_capacity(pending.len());
    for (exchange, routing_key, confirm) in pending {
        match await_confirm(confirm, exchange, routing_key).await {
            Err(e @ (PublishError::Unavailable(_) | PublishError::Timeout(_))) => return Err(e),
            outcome => outcomes.push(outcome),
        }
    }
    Ok(outcomes)
}

async fn start_publish(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, PublishError> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            options,
            body,
            properties,
        )
        .await
        .map_err(|e| PublishError::Unavailable(e.to_string()))
}

async fn await_confirm(
    confirm: lapin::PublisherConfirm,
    exchange: &str,
    routing_key: &str,
) -> Result<(), PublishError> {
    let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
        .await
        .map_err(|_| PublishError::Timeout(CONFIRM_TIMEOUT))?
        .map_err(|e| PublishError::Unavailable(e.to_string()))?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        }),
        Confirmation::Nack(_) => Err(PublishError::Nacked),
        // confirm_select is always on, so the broker always confirms.
        Confirmation::NotRequested => Err(PublishError::Nacked),
    }
}
