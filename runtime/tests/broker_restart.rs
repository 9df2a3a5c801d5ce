//! The broker restarted under a running worker. This stops the shared
//! broker, so `scripts/test.sh` runs this binary alone, after the others.
#![allow(clippy::unwrap_used)]

mod support;

use runtime::{Outgoing, PublishError, Publisher};
use std::time::{Duration, Instant};
use support::probe::Probe;
use support::*;
use testkit::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(90);

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .status()
        .unwrap();
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restart_mid_stream_loses_nothing_and_publishing_fails_loudly_while_it_is_down() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms,200ms").await;
    let pool = env.pool().await;
    let publisher = Publisher::connect(&env.amqp_url, "test publisher")
        .await
        .unwrap();
    let batch = |from: usize, to: usize| {
        (from..to)
            .map(|i| {
                Outgoing::of(&Probe {
                    id: format!("m{i}"),
                    sleep_ms: 10,
                    emit: true,
                    ..Probe::default()
                })
            })
            .collect::<Vec<_>>()
    };
    publisher.publish_all(&batch(0, 100)).await.unwrap();
    eventually(WAIT, "some progress", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await >= 10
    })
    .await;

    rabbitmqctl(&["stop_app"]);
    let started = Instant::now();
    let refused = publisher
        .publish(&Outgoing::of(&Probe {
            id: "while-down".into(),
            ..Probe::default()
        }))
        .await;
    assert!(
        matches!(
            refused,
            Err(PublishError::Unavailable(_) | PublishError::Timeout(_))
        ),
        "publishing to a stopped broker must fail, got {refused:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "publishing hung for {:?}",
        started.elapsed()
    );
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    // Once the broker is back the same publisher works again.
    let rest = batch(100, 150);
    let deadline = Instant::now() + WAIT;
    while let Err(e) = publisher.publish_all(&rest).await {
        assert!(Instant::now() < deadline, "publisher never recovered: {e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    eventually(WAIT, "every message applied", || async {
        count(&pool, "SELECT count(DISTINCT id) FROM probe_effects").await == 150
    })
    .await;
    eventually(WAIT, "the outbox is drained", || async {
        count(&pool, "SELECT count(*) FROM inventory.outbox").await == 0
    })
    .await;
    worker.stop().await;
    publisher.close().await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_effects").await,
        150,
        "an effect was applied twice"
    );
    let mut events: Vec<Vec<u8>> = env
        .drain("order")
        .await
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    events.sort();
    events.dedup();
    assert_eq!(events.len(), 150, "an event was lost");
    env.cleanup().await;
}
