//! Acks against the real broker: chunks that finish out of order (some
//! acked with one `multiple` ack, some one by one) settle every delivery
//! exactly once. An ack naming a tag settled already would make the broker
//! close the channel, and the messages it held would come back redelivered.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::probe::Probe;
use support::{count, send, settings, start_worker_with};
use testkit::{TestEnv, eventually};
use topology::management::encode_vhost;

const MESSAGES: usize = 160;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunks_finishing_out_of_order_settle_each_delivery_once_without_redeliveries() {
    let env = TestEnv::new().await;
    let mut settings = settings(&env, "100ms");
    settings.prefetch = 64;
    settings.concurrency = 4;
    settings.batch_size = 8;
    settings.batch_linger = Duration::from_millis(2);
    let worker = start_worker_with(&env, settings).await;
    for i in 0..MESSAGES {
        // Uneven handling times, so that later chunks often finish first.
        let sleep_ms = [0, 25, 3, 12, 0, 40, 7][i % 7];
        send(
            &env,
            &Probe {
                id: format!("p{i}"),
                sleep_ms,
                ..Probe::default()
            },
        )
        .await;
    }
    let pool = env.pool().await;
    let expected = i64::try_from(MESSAGES).unwrap();
    eventually(Duration::from_secs(30), "every probe applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == expected
    })
    .await;
    // The broker's own count of acks and redeliveries (refreshed every few
    // seconds by the management plugin).
    let path = format!("queues/{}/inventory", encode_vhost(&env.vhost));
    eventually(
        Duration::from_secs(30),
        "the broker counted every ack",
        || async {
            let queue = env.management.get(&path).await.unwrap();
            queue["message_stats"]["ack"].as_u64() == Some(MESSAGES as u64)
        },
    )
    .await;
    let queue = env.management.get(&path).await.unwrap();
    assert_eq!(
        queue["message_stats"]["redeliver"].as_u64().unwrap_or(0),
        0,
        "nothing came back: the consumer channel never closed"
    );
    worker.stop().await;
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT id) FROM probe_effects").await,
        expected
    );
    assert_eq!(env.depth("inventory").await, 0);
    env.cleanup().await;
}
