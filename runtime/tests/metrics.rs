//! What a worker shows on `METRICS_ADDR`, against the real broker and
//! database: every outcome counted once, readiness, and the port closed
//! when the worker stops.
#![allow(clippy::unwrap_used)]

mod support;

use runtime::Outgoing;
use std::time::Duration;
use support::probe::Probe;
use support::*;
use testkit::{TestEnv, eventually, free_port};

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_outcome_is_counted_once_and_readiness_follows_the_consumer() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut settings = settings(&env, "100ms");
    settings.metrics_addr = Some(([127, 0, 0, 1], port).into());
    let worker = start_worker_with(&env, settings).await;
    let base = format!("http://127.0.0.1:{port}");
    let http = topology::https::client();
    let get = |path: &str| {
        let request = http.get(format!("{base}{path}"));
        async move {
            // Refused until the worker's task has bound the port: status 0.
            match request.send().await {
                Ok(response) => (response.status().as_u16(), response.text().await.unwrap()),
                Err(_) => (0, String::new()),
            }
        }
    };
    eventually(WAIT, "ready once consuming", || async {
        get("/readyz").await.0 == 200
    })
    .await;
    assert_eq!(
        get("/readyz").await.1.trim(),
        r#"{"broker":"ok","database":"ok","consumer":"ok","breakers":{}}"#
    );
    assert_eq!(
        get("/healthz").await,
        (200, "{\"status\":\"ok\"}\n".to_owned())
    );

    // Applied: two (one after a retry). Duplicate: one. Dead: a refused
    // one and a malformed one.
    let twice = send(&env, &probe("m-once")).await;
    env.publish(
        &twice.exchange,
        &twice.routing_key,
        twice.properties(),
        &twice.body,
    )
    .await;
    send(
        &env,
        &Probe {
            fail: Some("transient".into()),
            succeed_at_attempt: Some(2),
            ..probe("m-retried")
        },
    )
    .await;
    send(
        &env,
        &Probe {
            fail: Some("permanent".into()),
            ..probe("m-refused")
        },
    )
    .await;
    let template = Outgoing::of(&probe("template")).properties();
    env.publish(
        "commands",
        "inventory.probe",
        template.with_message_id(uuid::Uuid::new_v4().to_string().as_str().into()),
        b"{not json",
    )
    .await;

    let metric = |name: &str| format!("orderflow_worker_{name}");
    eventually(WAIT, "every message settled", || async {
        let text = get("/metrics").await.1;
        sample(&text, &metric("messages_total"), r#"outcome="applied""#) == 2.0
            && sample(
                &text,
                &metric("messages_total"),
                r#"outcome="dead_lettered""#,
            ) == 2.0
            && sample(&text, &metric("messages_total"), r#"outcome="duplicate""#) == 1.0
    })
    .await;
    let text = get("/metrics").await.1;
    let messages = metric("messages_total");
    assert_eq!(
        sample(&text, &messages, r#"outcome="retried""#),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(&text, &messages, r#"outcome="requeued""#),
        0.0,
        "{text}"
    );
    let dead = metric("dead_letters_total");
    assert_eq!(sample(&text, &dead, r#"kind="permanent""#), 1.0, "{text}");
    assert_eq!(sample(&text, &dead, r#"kind="malformed""#), 1.0, "{text}");
    assert_eq!(
        sample(&text, &metric("consuming"), r#"worker="probe-worker""#),
        1.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            &metric("transaction_seconds_count"),
            r#"worker="probe-worker""#
        ) >= 2.0,
        "{text}"
    );
    assert_eq!(env.depth("inventory.dead").await, 2);

    worker.stop().await;
    assert!(
        http.get(format!("{base}/healthz")).send().await.is_err(),
        "still serving after the worker stopped"
    );
    env.cleanup().await;
}

/// A handler that blocks its thread is out of reach of its deadline: the
/// consumer makes no progress with a delivery in hand, and `/readyz` says
/// so until it moves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_stuck_with_a_delivery_in_hand_is_reported_stalled() {
    let env = TestEnv::new().await;
    let port = free_port();
    let mut settings = settings(&env, "100ms");
    settings.metrics_addr = Some(([127, 0, 0, 1], port).into());
    // Stalled after four deadlines: 1.2 s.
    settings.handler_timeout = Duration::from_millis(300);
    let worker = start_worker_with(&env, settings).await;
    let readyz = format!("http://127.0.0.1:{port}/readyz");
    let http = topology::https::client();
    let ready = || async {
        match http.get(&readyz).send().await {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap()),
            Err(_) => (0, String::new()),
        }
    };
    eventually(WAIT, "ready once consuming", || async {
        ready().await.0 == 200
    })
    .await;
    send(
        &env,
        &Probe {
            block_ms: 6_000,
            ..probe("blocking")
        },
    )
    .await;
    eventually(WAIT, "reported stalled", || async {
        let (status, body) = ready().await;
        status == 503 && body.contains(r#""consumer":"stalled""#)
    })
    .await;
    let pool = env.pool().await;
    eventually(WAIT, "applied once it moves again", || async {
        count(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE id = 'blocking'",
        )
        .await
            == 1
    })
    .await;
    eventually(WAIT, "ready again", || async { ready().await.0 == 200 }).await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_garbage_metrics_address_stops_the_worker_at_start() {
    testkit::assert_setting_refused(env!("CARGO_BIN_EXE_probe-worker"), "METRICS_ADDR", "9100")
        .await;
}
