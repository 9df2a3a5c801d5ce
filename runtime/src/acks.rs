//! Settling the deliveries of one consumer channel.
//!
//! A chunk whose acks leave nothing unsettled below its highest delivery
//! tag is acked with one `multiple` ack: one frame, and one settle command
//! in a quorum queue's log, instead of one per message (`docs/BENCHMARKS.md`:
//! the broker spends less per message). Otherwise its deliveries are acked
//! one by one, at once: nothing waits for a slower neighbour.
//!
//! Invariant: a `multiple` ack covers only deliveries that are settled
//! already or acked by it, never one still being handled. Every
//! settlement of the channel goes through [`Acks`], under one lock from
//! decision to frame, so no ack can overtake another and name a tag that
//! is settled already (which the broker answers by closing the channel).

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::BTreeSet;
use std::sync::Mutex;
use tracing::warn;

use crate::broker::CALL_TIMEOUT;

#[derive(Default)]
pub struct Acks {
    /// Tags handed to handlers and not settled yet.
    unsettled: Mutex<BTreeSet<u64>>,
    /// Held from the decision until the frame is sent.
    sending: tokio::sync::Mutex<()>,
}

impl Acks {
    /// Forgets the tags of a closed channel; a new channel numbers from 1.
    pub fn reset(&self) {
        if let Ok(mut unsettled) = self.unsettled.lock() {
            unsettled.clear();
        }
    }

    /// Registers deliveries as they are taken off the channel, in order.
    pub fn received<'a>(&self, deliveries: impl IntoIterator<Item = &'a Delivery>) {
        if let Ok(mut unsettled) = self.unsettled.lock() {
            unsettled.extend(deliveries.into_iter().map(|d| d.delivery_tag));
        }
    }

    /// Acks deliveries whose effects are committed: with one `multiple`
    /// ack when nothing below them is still unsettled, else one by one.
    pub async fn ack(&self, deliveries: &[&Delivery]) {
        let Some(highest) = deliveries.iter().max_by_key(|d| d.delivery_tag) else {
            return;
        };
        let _sending = self.sending.lock().await;
        let alone_below = match self.unsettled.lock() {
            Ok(mut unsettled) => {
                for d in deliveries {
                    unsettled.remove(&d.delivery_tag);
                }
                unsettled.range(..highest.delivery_tag).next().is_none()
            }
            Err(_) => false,
        };
        if deliveries.len() > 1 && alone_below {
            settle(highest.acker.ack(BasicAckOptions { multiple: true }), "Ack").await;
        } else {
            futures::future::join_all(
                deliveries
                    .iter()
                    .map(|d| settle(d.acker.ack(BasicAckOptions::default()), "Ack")),
            )
            .await;
        }
    }

    /// Returns a delivery to its queue.
    pub async fn requeue(&self, delivery: &Delivery) {
        let _sending = self.sending.lock().await;
        if let Ok(mut unsettled) = self.unsettled.lock() {
            unsettled.remove(&delivery.delivery_tag);
        }
        let nack = delivery.acker.nack(BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        });
        settle(nack, "Nack").await;
    }
}

/// Sends one ack or nack; `Ok(false)` is a channel closed meanwhile.
async fn settle(
    frame: impl std::future::Future<Output = Result<bool, lapin::Error>>,
    what: &'static str,
) {
    match tokio::time::timeout(CALL_TIMEOUT, frame).await {
        Ok(Ok(_)) => {}
        // The channel is gone; the broker redelivers and the inbox dedupes.
        Ok(Err(e)) => warn!(error = %e, "{what} failed"),
        Err(_) => warn!("{what} timed out"),
    }
}

#[cfg(test)]
mod tests {
    //! Against the real broker: what a channel holds unacked comes back to
    //! the queue when the channel closes, which shows which acks were sent.
    #![allow(clippy::unwrap_used)]

    use super::*;
    use futures::StreamExt;
    use lapin::options::{BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
    use lapin::types::FieldTable;
    use lapin::{BasicProperties, Channel};
    use testkit::TestEnv;

    const QUEUE: &str = "acks";

    /// `n` deliveries of one channel, tags 1 to `n`.
    async fn deliveries(env: &TestEnv, n: u16) -> (lapin::Connection, Channel, Vec<Delivery>) {
        let conn = env.connection().await;
        let channel = conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                QUEUE.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        for i in 0..n {
            env.publish("", QUEUE, BasicProperties::default(), &i.to_be_bytes())
                .await;
        }
        channel
            .basic_qos(n, BasicQosOptions::default())
            .await
            .unwrap();
        let consumer = channel
            .basic_consume(
                QUEUE.into(),
                "acks-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let deliveries: Vec<Delivery> = consumer.take(n.into()).map(|d| d.unwrap()).collect().await;
        (conn, channel, deliveries)
    }

    async fn close(conn: lapin::Connection, channel: Channel) {
        // A round trip first: a channel the broker closed fails it.
        assert!(
            channel
                .basic_qos(10, BasicQosOptions::default())
                .await
                .is_ok(),
            "the broker closed the channel"
        );
        channel.close(200, "done".into()).await.unwrap();
        let _ = conn.close(200, "done".into()).await;
    }

    #[tokio::test]
    async fn a_chunk_above_unsettled_deliveries_is_acked_one_by_one() {
        let env = TestEnv::new().await;
        let (conn, channel, d) = deliveries(&env, 10).await;
        let acks = Acks::default();
        acks.received(&d);
        // Tags 6 to 10 are done while 1 to 5 are still being handled.
        acks.ack(&d[5..].iter().collect::<Vec<_>>()).await;
        close(conn, channel).await;
        assert_eq!(env.depth(QUEUE).await, 5, "the unfinished five were kept");
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_chunk_with_nothing_unsettled_below_it_is_settled_by_one_multiple_ack() {
        let env = TestEnv::new().await;
        let (conn, channel, d) = deliveries(&env, 6).await;
        let acks = Acks::default();
        // Tag 3 counts as settled here without an ack of its own: only a
        // `multiple` ack at tag 6 can take it from the broker.
        acks.received(d.iter().filter(|d| d.delivery_tag != 3));
        acks.ack(&[&d[0], &d[1]]).await;
        acks.ack(&[&d[3], &d[4], &d[5]]).await;
        close(conn, channel).await;
        assert_eq!(env.depth(QUEUE).await, 0);
        env.cleanup().await;
    }

    #[tokio::test]
    async fn acks_below_a_requeued_delivery_and_above_it_keep_the_channel_open() {
        let env = TestEnv::new().await;
        let (conn, channel, d) = deliveries(&env, 4).await;
        let acks = Acks::default();
        acks.received(&d);
        acks.ack(&[&d[2], &d[3]]).await;
        acks.requeue(&d[1]).await;
        acks.ack(&[&d[0]]).await;
        close(conn, channel).await;
        // The requeued one is back (redelivered to the channel meanwhile or
        // not, it was never acked); the others are gone.
        assert_eq!(env.depth(QUEUE).await, 1);
        env.cleanup().await;
    }
}
