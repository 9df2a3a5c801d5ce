//! A worker whose publishes the broker blocks (a resource alarm) takes no
//! further deliveries until the block is lifted. The alarm blocks every
//! publisher of the shared broker, so this binary runs in the serial group
//! (`scripts/test.sh`).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;
use support::probe::Probe;
use support::*;
use testkit::{MemoryAlarm, TestEnv, eventually, free_port};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_publishes_are_blocked_takes_no_deliveries_until_the_block_lifts() {
    let env = TestEnv::new().await;
    let pool = prepare(&env).await;
    apply_topology(&env, "100ms").await;
    // Every one fails once: its retry is a publish, which the alarm blocks.
    send_many(
        &env,
        (0..10).map(|i| Probe {
            fail: Some("transient".into()),
            succeed_at_attempt: Some(2),
            ..probe(&format!("blocked-{i}"))
        }),
    )
    .await;
    let alarm = MemoryAlarm::raise();

    let port = free_port();
    let mut settings = settings(&env, "100ms");
    settings.metrics_addr = Some(([127, 0, 0, 1], port).into());
    settings.prefetch = 4;
    settings.batch_size = 2;
    settings.concurrency = 1;
    let worker = start_worker_with(&env, settings).await;
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let http = topology::https::client();
    eventually(WAIT, "readyz says blocked", || async {
        match http.get(&readyz).send().await {
            Ok(r) => r.status() == 503 && r.text().await.unwrap().contains(r#""broker":"blocked""#),
            Err(_) => false,
        }
    })
    .await;
    // Held at the gate: no message is handed to the handler again and
    // again, to fail, be refused its retry and go back to the queue.
    let tried = count(&pool, "SELECT count(*) FROM probe_invocations").await;
    assert!(
        tried < 10,
        "{tried} invocations: the worker kept taking deliveries"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_invocations").await,
        tried,
        "the worker kept taking deliveries while blocked"
    );

    drop(alarm);
    eventually(
        WAIT,
        "every message applied once the block lifts",
        || async { count(&pool, "SELECT count(DISTINCT id) FROM probe_effects").await == 10 },
    )
    .await;
    assert_eq!(count(&pool, "SELECT count(*) FROM probe_effects").await, 10);
    eventually(WAIT, "ready again", || async {
        http.get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    worker.stop().await;
    assert_eq!(env.depth("inventory.dead").await, 0);
    env.cleanup().await;
}
