//! One consuming session on one connection: the topology declared, the
//! inbox subscribed, deliveries taken in chunks and handed to `chunk`.

use super::{Inner, chunk};
use crate::broker::CALL_TIMEOUT;
use crate::chunks::{InFlight, chunks};
use crate::handler::Handler;
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ChannelStatus, Connection, ConnectionStatus, Consumer};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Consumes until shutdown (Ok) or until the connection or channel is lost
/// (Err, with the reason).
pub(super) async fn consume<H: Handler>(
    inner: &Arc<Inner<H>>,
    connection: &Connection,
    token: &CancellationToken,
) -> anyhow::Result<()> {
    let (channel, consumer) = subscribe(inner, connection).await?;
    // The previous channel's deliveries are all finished: `for_each_concurrent`
    // below returns only then.
    inner.acks.reset();
    inner.metrics.set_consuming(true);
    info!(
        worker = inner.spec.name,
        queue = inner.spec.domain.queue(),
        prefetch = inner.settings.prefetch,
        concurrency = inner.settings.concurrency,
        "Consuming"
    );
    // Cancelled by shutdown or by the connection's loss: either way the
    // deliveries in hand that have not started are left to the broker.
    let session = token.child_token();
    let stream_error = Arc::new(Mutex::new(None::<String>));
    let seen_error = stream_error.clone();
    // The delivery stream does not always end when the connection dies, so
    // the connection is watched too, by a task of its own (chunks held at
    // the gate do not poll the stream): either way, stop taking deliveries
    // and let the ones in flight finish (their acks fail; the broker
    // redelivers).
    let watcher = {
        let session = session.clone();
        let (connection, channel) = (connection.status().clone(), channel.status().clone());
        tokio::spawn(async move {
            lost(&connection, &channel).await;
            session.cancel();
        })
    };
    let stop = session.clone().cancelled_owned();
    // Chunks take the deliveries already waiting, and wait for company
    // only when more are likely (`chunks.rs`).
    let in_flight = InFlight::default();
    let chunks = chunks(
        consumer.take_until(Box::pin(stop)),
        inner.settings.batch_size,
        inner.settings.batch_linger,
        in_flight.clone(),
    );
    chunks
        .for_each_concurrent(inner.settings.concurrency, |chunk| {
            let inner = inner.clone();
            let token = session.clone();
            let mut deliveries = Vec::with_capacity(chunk.len());
            for delivery in chunk {
                match delivery {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(e) => {
                        if let Ok(mut slot) = seen_error.lock() {
                            *slot = Some(e.to_string());
                        }
                    }
                }
            }
            // In channel order: chunks are taken one after the other.
            inner.acks.received(&deliveries);
            let in_flight = in_flight.enter();
            async move {
                // Spawned so handlers use every core; awaited so the
                // concurrency bound holds.
                let _ =
                    tokio::spawn(
                        async move { chunk::process_all(&inner, deliveries, &token).await },
                    )
                    .await;
                drop(in_flight);
            }
        })
        .await;
    watcher.abort();
    if token.is_cancelled() {
        let _ = channel.close(200, "shutting down".into()).await;
        return Ok(());
    }
    let reason = stream_error
        .lock()
        .ok()
        .and_then(|mut s| s.take())
        .unwrap_or_else(|| "the connection or channel closed".to_owned());
    anyhow::bail!(reason)
}

/// Declares the domain's topology and subscribes to its inbox. Every broker
/// round trip is bounded: a broker that accepted the connection but does
/// not answer must not hang the worker.
async fn subscribe<H>(
    inner: &Inner<H>,
    connection: &Connection,
) -> anyhow::Result<(Channel, Consumer)> {
    let mismatches = tokio::time::timeout(
        CALL_TIMEOUT * 6,
        topology::declare(connection, &inner.topology),
    )
    .await
    .map_err(|_| anyhow::anyhow!("declaring the topology timed out"))??;
    for m in &mismatches {
        // The existing queue keeps being used; an operator must reconcile it.
        error!(worker = inner.spec.name, mismatch = %m, "Topology differs from the broker");
    }
    let queue = inner.spec.domain.queue();
    let subscribe = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(inner.settings.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                format!("{}-{}", inner.spec.name, uuid::Uuid::new_v4())
                    .as_str()
                    .into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    Ok(tokio::time::timeout(CALL_TIMEOUT, subscribe)
        .await
        .map_err(|_| anyhow::anyhow!("subscribing to {queue} timed out"))??)
}

/// Resolves once the connection or the channel is no longer open.
async fn lost(connection: &ConnectionStatus, channel: &ChannelStatus) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if !connection.connected() || !channel.connected() {
            return;
        }
    }
}
