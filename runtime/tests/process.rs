//! Fault tests on a real worker process (`probe-worker`): SIGKILL mid-message
//! and while chunks are applied together, a message that crashes its worker
//! every time, SIGTERM under load, and
//! settings it must refuse at start.
#![allow(clippy::unwrap_used)]

mod support;

use contract::headers;
use std::process::Stdio;
use std::time::Duration;
use support::probe::Probe;
use support::*;
use testkit::{TestEnv, eventually};
use tokio::process::{Child, Command};

const WAIT: Duration = Duration::from_secs(60);

fn spawn_worker(env: &TestEnv) -> Child {
    Command::new(env!("CARGO_BIN_EXE_probe-worker"))
        .env("AMQP_URL", &env.amqp_url)
        .env("DATABASE_URL", &env.database_url)
        .env("RETRY_DELAYS", "100ms,200ms")
        .env("PREFETCH", "8")
        .env(
            "RUST_LOG",
            std::env::var("PROBE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("PROBE_STDERR").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args([sig, &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_handler_gets_the_message_redelivered_and_applies_it_once() {
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms,200ms").await;
    let pool = prepare(&env).await;
    let mut first = spawn_worker(&env);

    send(
        &env,
        &Probe {
            sleep_ms: 1500,
            ..probe("slow")
        },
    )
    .await;
    eventually(WAIT, "the handler started", || async {
        count(&pool, "SELECT count(*) FROM probe_invocations").await == 1
    })
    .await;
    signal(&first, "-KILL");
    first.wait().await.unwrap();

    let mut second = spawn_worker(&env);
    eventually(WAIT, "the redelivered message is applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == 1
    })
    .await;
    signal(&second, "-TERM");
    assert!(second.wait().await.unwrap().success());
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_invocations").await,
        2
    );
    assert_eq!(count(&pool, "SELECT count(*) FROM probe_effects").await, 1);
    assert_eq!(env.depth("inventory").await, 0);
    assert_eq!(env.depth("inventory.dead").await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_while_applying_chunks_together_loses_nothing_and_applies_each_once() {
    const PROBES: i64 = 3000;
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms,200ms").await;
    let pool = prepare(&env).await;
    // Plain probes: the handler applies each chunk of them with one statement.
    send_many(
        &env,
        (0..PROBES).map(|i| Probe {
            emit: true,
            ..probe(&format!("m{i}"))
        }),
    )
    .await;
    let mut first = spawn_worker(&env);
    eventually(WAIT, "the worker is busy", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await >= 100
    })
    .await;
    signal(&first, "-KILL");
    first.wait().await.unwrap();
    let at_kill = count(&pool, "SELECT count(*) FROM probe_effects").await;
    assert!(
        at_kill < PROBES,
        "killed after the last chunk: nothing tested"
    );

    let mut second = spawn_worker(&env);
    eventually(WAIT, "every probe applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await >= PROBES
    })
    .await;
    // Its emissions relayed (the sweeper sends what the killed one left).
    eventually(WAIT, "every emission relayed", || async {
        count(&pool, "SELECT count(*) FROM inventory.outbox").await == 0
    })
    .await;
    signal(&second, "-TERM");
    assert!(second.wait().await.unwrap().success());

    // Applied once each: what the killed worker committed stands, what it
    // did not was rolled back and applied by the second.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_effects").await,
        PROBES
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT id) FROM probe_effects").await,
        PROBES
    );
    assert_eq!(env.depth("inventory").await, 0);
    assert_eq!(env.depth("inventory.dead").await, 0);
    // Every effect's event reached the saga's queue, at least once.
    let events = env.drain("order").await;
    let distinct: std::collections::HashSet<String> = events
        .iter()
        .filter_map(|(props, _)| props.correlation_id().as_ref().map(|c| c.to_string()))
        .collect();
    assert_eq!(i64::try_from(distinct.len()).unwrap(), PROBES);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_that_crashes_its_worker_every_time_ends_dead_and_the_rest_flow() {
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms,200ms").await;
    let pool = prepare(&env).await;
    send(
        &env,
        &Probe {
            fail: Some("crash".into()),
            ..probe("poison")
        },
    )
    .await;
    for i in 0..5 {
        send(&env, &probe(&format!("ok{i}"))).await;
    }

    // What an orchestrator does: restart the worker whenever it dies.
    let mut restarts = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut worker = spawn_worker(&env);
        let done = async {
            loop {
                if env.depth("inventory.dead").await == 1
                    && count(&pool, "SELECT count(*) FROM probe_effects").await == 5
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let done = tokio::time::timeout_at(deadline, done);
        tokio::select! {
            status = worker.wait() => {
                assert!(!status.unwrap().success(), "the worker died of the poison message");
                restarts += 1;
            }
            finished = done => {
                assert!(finished.is_ok(), "poison message never dead-lettered");
                signal(&worker, "-TERM");
                assert!(worker.wait().await.unwrap().success());
                break;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "poison message never dead-lettered"
        );
    }

    assert!(restarts >= 1);
    let dead = env.drain("inventory.dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        header_text(&dead[0].0, headers::ERROR_KIND),
        "delivery-limit"
    );
    assert!(String::from_utf8_lossy(&dead[0].1).contains("poison"));
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT id) FROM probe_effects").await,
        5
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_with_large_headers_from_another_client_are_handled_and_dead_lettered_whole() {
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms,200ms").await;
    let pool = prepare(&env).await;
    // Published by a client that agreed the broker's default frame (128
    // KiB), with properties larger than a publisher of its own messages
    // proposes (`broker::FRAME_MAX`): a worker's connections must carry
    // them, or lapin drops the consumer's connection and the broker
    // redelivers the message to it for ever.
    let big = "h".repeat(2 * runtime::broker::FRAME_MAX as usize);
    for probe in [
        probe("large-ok"),
        Probe {
            fail: Some("permanent".into()),
            ..probe("large-permanent")
        },
    ] {
        let out = runtime::Outgoing::of(&probe).correlated(&probe.id);
        let mut headers = out.properties().headers().clone().unwrap_or_default();
        headers.insert(
            "x-big".into(),
            lapin::types::AMQPValue::LongString(big.as_str().into()),
        );
        env.publish(
            &out.exchange,
            &out.routing_key,
            out.properties().with_headers(headers),
            &out.body,
        )
        .await;
    }
    send(&env, &probe("small")).await;

    let mut worker = spawn_worker(&env);
    eventually(WAIT, "the probes applied and dead-lettered", || async {
        env.depth("inventory.dead").await == 1
            && count(&pool, "SELECT count(*) FROM probe_effects").await == 2
    })
    .await;
    signal(&worker, "-TERM");
    assert!(worker.wait().await.unwrap().success());
    let dead = env.drain("inventory.dead").await;
    assert_eq!(dead.len(), 1);
    assert!(String::from_utf8_lossy(&dead[0].1).contains("large-permanent"));
    assert_eq!(header_text(&dead[0].0, "x-big"), big);
    assert_eq!(header_text(&dead[0].0, headers::ERROR_KIND), "permanent");
    assert_eq!(env.depth("inventory").await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_in_flight_messages_and_exits_zero() {
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms,200ms").await;
    let pool = prepare(&env).await;
    for i in 0..200 {
        send(
            &env,
            &Probe {
                sleep_ms: 30,
                emit: true,
                ..probe(&format!("m{i}"))
            },
        )
        .await;
    }
    let mut worker = spawn_worker(&env);
    eventually(WAIT, "the worker is busy", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await >= 20
    })
    .await;

    signal(&worker, "-TERM");
    let status = tokio::time::timeout(WAIT, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status:?}");

    // Everything begun was finished and relayed: each invocation has its
    // effect, and nothing is left in the outbox.
    let invocations = count(&pool, "SELECT count(*) FROM probe_invocations").await;
    let effects = count(&pool, "SELECT count(*) FROM probe_effects").await;
    assert_eq!(invocations, effects, "a started message was abandoned");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM inventory.outbox").await,
        0
    );
    let done = u32::try_from(effects).unwrap();
    assert_eq!(env.depth("inventory").await, 200 - done);
    assert_eq!(env.depth("order").await, done);

    // A restart finishes the rest without redoing any of the first part.
    let mut again = spawn_worker(&env);
    eventually(WAIT, "all messages applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == 200
    })
    .await;
    signal(&again, "-TERM");
    assert!(again.wait().await.unwrap().success());
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_invocations").await,
        200
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT id) FROM probe_effects").await,
        200
    );
    env.cleanup().await;
}

#[tokio::test]
async fn a_garbage_setting_stops_the_worker_at_start_with_the_variable_named() {
    for (name, value) in [
        ("BATCH_LINGER_MS", "soon"),
        ("BATCH_LINGER_MS", "-3"),
        ("BATCH_SIZE", "many"),
        ("PREFETCH", "70000"),
        ("RETRY_DELAYS", "1s,fast"),
        ("LOG_FORMAT", "yaml"),
        ("DATABASE_URL", "mysql://db/orders"),
        // Not a broker to wait for: a URL the client cannot read.
        ("AMQP_URL", "garbage"),
        ("AMQP_URL", "amqp://127.0.0.1:99999/%2f"),
        (
            "AMQP_URL",
            "amqp://127.0.0.1:5672/%2f,amqp://127.0.0.1:5673/%2f",
        ),
    ] {
        testkit::assert_setting_refused(env!("CARGO_BIN_EXE_probe-worker"), name, value).await;
    }
}
