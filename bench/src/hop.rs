//! The raw broker hop: `n` persistent 300-byte messages through a quorum
//! queue, publisher confirms (a window of 256 outstanding), one consumer
//! (prefetch 256) with manual acks, each covering `ack_every` deliveries
//! (`multiple`); publisher and consumer on one connection of this process.
//! The same hop with lapin (the runtime's client), with amqprs (a client
//! whose I/O runs on tokio tasks, not a thread of its own), and with lapin
//! publishing and amqprs consuming on two connections, so that the
//! clients' own CPU per message can be compared, flat out or with the
//! messages offered at a fixed rate (`pace`), one at a time, as a worker
//! sees them at a moderate load.

use crate::{cpu_of_all, cpu_seconds};
use std::time::Instant;

const QUEUE: &str = "bench.hop";
const WINDOW: usize = 256;
const BODY: usize = 300;

/// One hop run: messages per second, and the CPU microseconds per message
/// the broker and this process (the client) spent.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub rate: f64,
    pub broker_us: f64,
    pub client_us: f64,
}

/// Measures `run`, which moves `n` messages.
async fn measure(
    n: usize,
    run: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Hop> {
    let (broker, client) = (cpu_of_all("beam.smp"), cpu_seconds(std::process::id()));
    let started = Instant::now();
    run.await?;
    let elapsed = started.elapsed().as_secs_f64();
    let per_message = |cpu: f64| cpu * 1e6 / n as f64;
    Ok(Hop {
        rate: n as f64 / elapsed,
        broker_us: per_message(cpu_of_all("beam.smp") - broker),
        client_us: per_message(cpu_seconds(std::process::id()) - client),
    })
}

/// How the publisher hands lapin a window's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LapinPublishes {
    /// Each publish awaited before the next (the ceiling's hop since its
    /// first measurement).
    OneByOne,
    /// A window's publishes started together, as the runtime's relay does
    /// (`runtime::broker::Publisher::publish_all`).
    Together,
}

/// With a pace, waits until the time of message `i` (counted from
/// `started`); flat out, returns at once.
async fn wait_turn(started: tokio::time::Instant, i: usize, pace: Option<f64>) {
    if let Some(rate) = pace {
        tokio::time::sleep_until(started + std::time::Duration::from_secs_f64(i as f64 / rate))
            .await;
    }
}

/// The hop with lapin.
pub async fn with_lapin(
    amqp: &str,
    n: usize,
    ack_every: usize,
    publishes: LapinPublishes,
    pace: Option<f64>,
) -> anyhow::Result<Hop> {
    use futures::StreamExt;
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    use lapin::types::FieldTable;

    let (conn, publish) = lapin_publisher(amqp).await?;
    let consume = conn.create_channel().await?;
    consume
        .basic_qos(WINDOW as u16, BasicQosOptions::default())
        .await?;
    let mut consumer = consume
        .basic_consume(
            QUEUE.into(),
            "bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let hop = measure(n, async {
        let consuming = tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                match consumer.next().await {
                    Some(Ok(d)) => {
                        got += 1;
                        if got % ack_every == 0 || got == n {
                            d.acker
                                .ack(BasicAckOptions {
                                    multiple: ack_every > 1,
                                })
                                .await?;
                        }
                    }
                    _ => break,
                }
            }
            Ok::<_, lapin::Error>(())
        });
        publish_with_lapin(&publish, n, publishes, pace).await?;
        consuming.await??;
        Ok(())
    })
    .await?;
    // The consuming channel goes first: deleting the queue under a live
    // consumer races its cancellation.
    let _ = consume.close(200, "done".into()).await;
    publish
        .queue_delete(QUEUE.into(), Default::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(hop)
}

/// A lapin connection and a channel on it in confirm mode, the hop's
/// durable quorum queue declared.
async fn lapin_publisher(amqp: &str) -> Result<(lapin::Connection, lapin::Channel), lapin::Error> {
    use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable, LongString};
    let conn = lapin::Connection::connect(amqp, Default::default()).await?;
    let channel = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok((conn, channel))
}

/// Publishes `n` messages on a lapin channel in confirm mode and waits for
/// every confirm: paced one at a time, or flat out a window at a time.
async fn publish_with_lapin(
    publish: &lapin::Channel,
    n: usize,
    publishes: LapinPublishes,
    pace: Option<f64>,
) -> anyhow::Result<()> {
    use lapin::options::BasicPublishOptions;
    let body = vec![b'x'; BODY];
    let props = lapin::BasicProperties::default().with_delivery_mode(2);
    let publish_one = || {
        publish.basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            &body,
            props.clone(),
        )
    };
    if pace.is_some() {
        let started = tokio::time::Instant::now();
        let mut confirms = Vec::with_capacity(n);
        for i in 0..n {
            wait_turn(started, i, pace).await;
            confirms.push(publish_one().await?);
        }
        for confirm in confirms {
            confirm.await?;
        }
    } else {
        let mut left = n;
        while left > 0 {
            let size = left.min(WINDOW);
            left -= size;
            let window = match publishes {
                LapinPublishes::OneByOne => {
                    let mut window = Vec::with_capacity(size);
                    for _ in 0..size {
                        window.push(publish_one().await?);
                    }
                    window
                }
                LapinPublishes::Together => {
                    futures::future::try_join_all((0..size).map(|_| publish_one())).await?
                }
            };
            for confirm in window {
                confirm.await?;
            }
        }
    }
    Ok(())
}

/// The hop with amqprs. Its confirms arrive through a channel callback;
/// the publisher waits for each window to be confirmed, as lapin's does.
pub async fn with_amqprs(
    amqp: &str,
    n: usize,
    ack_every: usize,
    pace: Option<f64>,
) -> anyhow::Result<Hop> {
    use amqprs::channel::{
        BasicPublishArguments, ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments,
    };
    use amqprs::connection::{Connection, OpenConnectionArguments};
    use amqprs::{BasicProperties, DELIVERY_MODE_PERSISTENT, FieldTable, FieldValue};

    let conn = Connection::open(&OpenConnectionArguments::try_from(amqp)?).await?;
    let publish = conn.open_channel(None).await?;
    let consume = conn.open_channel(None).await?;
    let confirms = Confirms::default();
    publish.register_callback(confirms.clone()).await?;
    let mut args = FieldTable::new();
    args.insert(
        "x-queue-type".try_into()?,
        FieldValue::S("quorum".try_into()?),
    );
    publish
        .queue_declare(
            QueueDeclareArguments::durable_client_named(QUEUE)
                .arguments(args)
                .finish(),
        )
        .await?;
    publish
        .confirm_select(ConfirmSelectArguments::default())
        .await?;
    let deliveries = subscribe_with_amqprs(&consume).await?;
    let hop = measure(n, async {
        let consuming = consume_with_amqprs(consume.clone(), deliveries, n, ack_every);
        let props = BasicProperties::default()
            .with_delivery_mode(DELIVERY_MODE_PERSISTENT)
            .finish();
        let args = BasicPublishArguments::new("", QUEUE);
        let started = tokio::time::Instant::now();
        for i in 0..n {
            wait_turn(started, i, pace).await;
            publish
                .basic_publish(props.clone(), vec![b'x'; BODY], args.clone())
                .await?;
            let published = i as u64 + 1;
            if pace.is_none() && published.is_multiple_of(WINDOW as u64) {
                confirms.wait_for(published).await?;
            }
        }
        confirms.wait_for(n as u64).await?;
        consuming.await??;
        Ok(())
    })
    .await?;
    let _ = consume.close().await;
    publish
        .queue_delete(QueueDeleteArguments::new(QUEUE))
        .await?;
    let _ = publish.close().await;
    let _ = conn.close().await;
    Ok(hop)
}

/// The hop with lapin publishing, as the runtime's relay does (a window's
/// publishes started together), and amqprs consuming, each on a
/// connection of its own: what moving only the consumers to amqprs would
/// change (decision 0014).
pub async fn lapin_publishing_amqprs_consuming(
    amqp: &str,
    n: usize,
    ack_every: usize,
    pace: Option<f64>,
) -> anyhow::Result<Hop> {
    let (conn, publish) = lapin_publisher(amqp).await?;
    let consuming_conn = amqprs::connection::Connection::open(
        &amqprs::connection::OpenConnectionArguments::try_from(amqp)?,
    )
    .await?;
    let consume = consuming_conn.open_channel(None).await?;
    let deliveries = subscribe_with_amqprs(&consume).await?;
    let hop = measure(n, async {
        let consuming = consume_with_amqprs(consume.clone(), deliveries, n, ack_every);
        publish_with_lapin(&publish, n, LapinPublishes::Together, pace).await?;
        consuming.await??;
        Ok(())
    })
    .await?;
    let _ = consume.close().await;
    let _ = consuming_conn.close().await;
    publish
        .queue_delete(QUEUE.into(), Default::default())
        .await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(hop)
}

/// Subscribes an amqprs channel to the hop's queue, prefetch one window.
async fn subscribe_with_amqprs(
    channel: &amqprs::channel::Channel,
) -> Result<
    tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
    amqprs::error::Error,
> {
    use amqprs::channel::{BasicConsumeArguments, BasicQosArguments};
    channel
        .basic_qos(BasicQosArguments::new(0, WINDOW as u16, false))
        .await?;
    let (_, deliveries) = channel
        .basic_consume_rx(
            BasicConsumeArguments::new(QUEUE, "bench")
                .manual_ack(true)
                .finish(),
        )
        .await?;
    Ok(deliveries)
}

/// Takes `n` deliveries on an amqprs channel, acking every `ack_every`th.
fn consume_with_amqprs(
    channel: amqprs::channel::Channel,
    mut deliveries: tokio::sync::mpsc::UnboundedReceiver<amqprs::channel::ConsumerMessage>,
    n: usize,
    ack_every: usize,
) -> tokio::task::JoinHandle<Result<(), amqprs::error::Error>> {
    use amqprs::channel::BasicAckArguments;
    tokio::spawn(async move {
        let mut got = 0;
        while got < n {
            let Some(message) = deliveries.recv().await else {
                break;
            };
            let Some(deliver) = message.deliver else {
                continue;
            };
            got += 1;
            if got % ack_every == 0 || got == n {
                channel
                    .basic_ack(BasicAckArguments::new(
                        deliver.delivery_tag(),
                        ack_every > 1,
                    ))
                    .await?;
            }
        }
        Ok(())
    })
}

/// Publisher confirms as amqprs reports them: the highest tag below which
/// every message is confirmed, and whether the broker refused any.
#[derive(Clone, Default)]
struct Confirms {
    state: std::sync::Arc<(std::sync::Mutex<ConfirmState>, tokio::sync::Notify)>,
}

#[derive(Default)]
struct ConfirmState {
    confirmed: u64,
    singles: std::collections::BTreeSet<u64>,
    refused: bool,
}

impl Confirms {
    fn settle(&self, tag: u64, multiple: bool, refused: bool) {
        let (state, notify) = &*self.state;
        if let Ok(mut s) = state.lock() {
            s.refused |= refused;
            if multiple {
                s.confirmed = s.confirmed.max(tag);
            } else {
                s.singles.insert(tag);
            }
            loop {
                let next = s.confirmed + 1;
                if !s.singles.remove(&next) {
                    break;
                }
                s.confirmed = next;
            }
            let below = s.confirmed;
            s.singles.retain(|t| *t > below);
        }
        notify.notify_waiters();
    }

    async fn wait_for(&self, tag: u64) -> anyhow::Result<()> {
        let (state, notify) = &*self.state;
        loop {
            let notified = notify.notified();
            {
                let s = state
                    .lock()
                    .map_err(|_| anyhow::anyhow!("confirm state poisoned"))?;
                if s.refused {
                    anyhow::bail!("the broker refused a message");
                }
                if s.confirmed >= tag {
                    return Ok(());
                }
            }
            notified.await;
        }
    }
}

#[async_trait::async_trait]
impl amqprs::callbacks::ChannelCallback for Confirms {
    async fn close(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::CloseChannel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn cancel(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Cancel,
    ) -> Result<(), amqprs::error::Error> {
        Ok(())
    }

    async fn flow(
        &mut self,
        _: &amqprs::channel::Channel,
        active: bool,
    ) -> Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _: &amqprs::channel::Channel, ack: amqprs::Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple(), false);
    }

    async fn publish_nack(&mut self, _: &amqprs::channel::Channel, nack: amqprs::Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), true);
    }

    async fn publish_return(
        &mut self,
        _: &amqprs::channel::Channel,
        _: amqprs::Return,
        _: amqprs::BasicProperties,
        _: Vec<u8>,
    ) {
    }
}
