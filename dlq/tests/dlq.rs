//! `dlq` against the real broker and database: dead messages from every
//! path, replay after the cause is fixed, dry runs, edited bodies, purge and
//! restore, and a replay killed half-way.
#![allow(clippy::unwrap_used)]

use e2e::{Options, System};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use payment_gateway_sim::Trouble;
use runtime::Outgoing;
use serde_json::{Value, json};
use std::time::Duration;
use testkit::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(60);

/// The `dlq` binary, pointed at the test's broker and database.
fn dlq_command(env: &TestEnv) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_dlq"));
    command
        .env("AMQP_URL", &env.amqp_url)
        .env("DATABASE_URL", &env.database_url)
        .env("USER", "on-call");
    command
}

fn dlq(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out = dlq_command(env).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dlq_json(env: &TestEnv, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let (code, stdout, stderr) = dlq(env, &all);
    assert_eq!(code, 0, "dlq {args:?}: {stderr}");
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("dlq {args:?} printed no JSON ({e}): {stdout}"))
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|m| m["message_id"].as_str().unwrap().to_owned())
        .collect()
}

/// Publishes `message` straight into a dead queue as the runtime would have
/// dead-lettered it.
async fn bury(env: &TestEnv, queue: &str, message: &Outgoing, kind: &str) {
    bury_since(env, queue, message, kind, chrono::Utc::now()).await;
}

async fn bury_since(
    env: &TestEnv,
    queue: &str,
    message: &Outgoing,
    kind: &str,
    first_failed_at: chrono::DateTime<chrono::Utc>,
) {
    let first_failed_at = first_failed_at.to_rfc3339();
    let mut props = message.properties();
    let mut headers = props.headers().clone().unwrap_or_default();
    for (k, v) in [
        ("x-error-kind", kind),
        ("x-error", "buried by the test"),
        ("x-original-exchange", message.exchange.as_str()),
        ("x-original-routing-key", message.routing_key.as_str()),
        ("x-first-failed-at", first_failed_at.as_str()),
    ] {
        headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    headers.insert("x-attempts".into(), AMQPValue::LongLongInt(1));
    props = props.with_headers(headers);
    env.publish("", queue, props, &message.body).await;
}

async fn apply(env: &TestEnv) {
    env.declare_topology("100ms").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_messages_of_every_path_are_listed_with_their_reason_grouped_and_left_in_place() {
    let system = System::start(Options::default()).await;
    let env = &system.env;
    // malformed: not JSON.
    let good = Outgoing::of(&contract::ReserveStock {
        order_id: uuid::Uuid::new_v4(),
        items: vec![],
    });
    env.publish(
        "commands",
        "inventory.reserve",
        good.properties()
            .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into()),
        b"{oops",
    )
    .await;
    // permanent: an order without items cannot be reserved.
    env.publish(
        "commands",
        "inventory.reserve",
        good.properties(),
        &good.body,
    )
    .await;
    eventually(WAIT, "two dead messages", || async {
        env.depth("inventory.dead").await == 2
    })
    .await;

    // delivery-limit, by the broker: a message returned more often than its
    // queue's limit. A queue of its own keeps the worker from taking it.
    let conn = env.connection().await;
    let channel = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    for (k, v) in [
        ("x-queue-type", "quorum"),
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", "inventory.dead"),
    ] {
        args.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    }
    args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(1));
    channel
        .queue_declare(
            "inventory.stuck".into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
    let stuck = Outgoing::of(&contract::Restock {
        sku: "S".into(),
        quantity: 1,
    });
    env.publish("", "inventory.stuck", stuck.properties(), &stuck.body)
        .await;
    for _ in 0..3 {
        if let Some(m) = channel
            .basic_get("inventory.stuck".into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            m.delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .unwrap();
        }
    }
    eventually(WAIT, "the broker dead-letters it", || async {
        env.depth("inventory.dead").await == 3
    })
    .await;

    let before = dlq_json(env, &["list", "inventory.dead"]);
    let by_kind = |kind: &str| {
        before
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["error_kind"] == kind)
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        by_kind("malformed")["error"]
            .as_str()
            .unwrap()
            .contains("not valid"),
        "{before}"
    );
    assert!(
        by_kind("permanent")["error"]
            .as_str()
            .unwrap()
            .contains("without items"),
        "{before}"
    );
    let limited = by_kind("delivery-limit");
    assert_eq!(
        limited["original_routing_key"], "inventory.stuck",
        "{before}"
    );
    assert_eq!(limited["message_id"], stuck.message_id.to_string());

    let groups = dlq_json(env, &["list", "inventory.dead", "--group-by", "kind"]);
    assert_eq!(groups.as_array().unwrap().len(), 3);
    let (code, table, _) = dlq(env, &["list", "inventory.dead"]);
    assert_eq!(code, 0);
    assert!(
        table.contains("malformed") && table.contains("3 message(s) in inventory.dead"),
        "{table}"
    );

    // Listing again sees the same messages in the same order.
    let after = dlq_json(env, &["list", "inventory.dead"]);
    assert_eq!(ids(&before), ids(&after));
    assert_eq!(env.depth("inventory.dead").await, 3);

    let shown = dlq_json(
        env,
        &[
            "show",
            "inventory.dead",
            limited["message_id"].as_str().unwrap(),
        ],
    );
    assert!(
        shown["properties"]["headers"]["x-death"].is_array(),
        "{shown}"
    );
    assert_eq!(shown["body"]["sku"], "S");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_whose_payment_died_while_the_gateway_was_down_completes_after_replay_charged_once()
 {
    let (system, id) = System::with_a_dead_charge().await;
    let listed = dlq_json(&system.env, &["list", "payment.dead"]);
    assert_eq!(listed[0]["error_kind"], "exhausted");
    assert_eq!(listed[0]["order_id"], id.as_str());

    system.set_trouble(Trouble::default()).await;
    let replayed = dlq_json(&system.env, &["replay", "payment.dead", "--all"]);
    assert_eq!(replayed[0]["action"], "replayed", "{replayed}");

    let order = system.wait_final(&id).await;
    assert_eq!(order["status"], "CONFIRMED");
    assert_eq!(system.charges(&id).await.len(), 1);
    assert_eq!(system.env.depth("payment.dead").await, 0);
    let audit: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dlq.audit WHERE action = 'replay' AND operator = 'on-call'",
    )
    .fetch_one(&system.pool)
    .await
    .unwrap();
    assert_eq!(audit, 1);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_a_message_already_applied_is_reported_and_has_no_second_effect() {
    let system = System::start(Options::default()).await;
    let restock = Outgoing::of(&contract::Restock {
        sku: "SKU-A".into(),
        quantity: 5,
    });
    system
        .env
        .publish(
            &restock.exchange,
            &restock.routing_key,
            restock.properties(),
            &restock.body,
        )
        .await;
    system.wait_stock("SKU-A", 5).await;
    // The same message ends in the dead queue anyway (say, a duplicate that
    // failed elsewhere).
    bury(&system.env, "inventory.dead", &restock, "exhausted").await;

    let report = dlq_json(&system.env, &["replay", "inventory.dead", "--all"]);
    assert_eq!(report[0]["action"], "skipped");
    assert!(
        report[0]["detail"]
            .as_str()
            .unwrap()
            .contains("already applied"),
        "{report}"
    );
    assert_eq!(system.env.depth("inventory.dead").await, 1);

    let forced = dlq_json(
        &system.env,
        &["replay", "inventory.dead", "--all", "--force"],
    );
    assert_eq!(forced[0]["action"], "replayed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    system.wait_stock("SKU-A", 5).await;
    let (_, stock) = system.get("/inventory/SKU-A").await;
    assert_eq!(stock["available"], 5, "the replay had a second effect");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_dead_for_longer_than_the_inbox_retention_is_replayed_only_with_force() {
    let env = TestEnv::new().await;
    apply(&env).await;
    let old = Outgoing::of(&contract::Restock {
        sku: "SKU-OLD".into(),
        quantity: 1,
    });
    let recent = Outgoing::of(&contract::Restock {
        sku: "SKU-NEW".into(),
        quantity: 1,
    });
    let forty_days_ago = chrono::Utc::now() - chrono::Duration::days(40);
    bury_since(&env, "inventory.dead", &old, "exhausted", forty_days_ago).await;
    bury(&env, "inventory.dead", &recent, "exhausted").await;

    let report = dlq_json(&env, &["replay", "inventory.dead", "--all"]);
    let outcome = |id: &str| {
        report
            .as_array()
            .unwrap()
            .iter()
            .find(|o| o["message_id"] == id)
            .cloned()
            .unwrap()
    };
    let skipped = outcome(&old.message_id.to_string());
    assert_eq!(skipped["action"], "skipped", "{report}");
    let why = skipped["detail"].as_str().unwrap();
    assert!(
        why.contains("dead for 40 days") && why.contains("inbox retention (30 days)"),
        "{why}"
    );
    assert_eq!(
        outcome(&recent.message_id.to_string())["action"],
        "replayed"
    );
    assert_eq!(env.depth("inventory.dead").await, 1);

    let forced = dlq_json(&env, &["replay", "inventory.dead", "--all", "--force"]);
    assert_eq!(forced[0]["action"], "replayed", "{forced}");
    assert_eq!(env.depth("inventory.dead").await, 0);
    assert_eq!(env.depth("inventory").await, 2);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_changes_nothing_and_a_corrected_body_is_replayed() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-E", 3).await;
    let order_id = uuid::Uuid::new_v4();
    let broken = Outgoing::of(&contract::ReserveStock {
        order_id,
        items: vec![],
    });
    system
        .env
        .publish(
            &broken.exchange,
            &broken.routing_key,
            broken.properties(),
            &broken.body,
        )
        .await;
    eventually(WAIT, "the broken command is dead", || async {
        system.env.depth("inventory.dead").await == 1
    })
    .await;

    let dry = dlq_json(
        &system.env,
        &[
            "replay",
            "inventory.dead",
            "--kind",
            "permanent",
            "--dry-run",
        ],
    );
    assert_eq!(dry[0]["action"], "would replay");
    assert_eq!(dry[0]["detail"], "to commands/inventory.reserve");
    assert_eq!(system.env.depth("inventory.dead").await, 1);

    let fixed = std::env::temp_dir().join(format!("{order_id}.json"));
    std::fs::write(
        &fixed,
        json!({"order_id": order_id, "items": [{"sku": "SKU-E", "quantity": 2}]}).to_string(),
    )
    .unwrap();
    let id = broken.message_id.to_string();
    let replayed = dlq_json(
        &system.env,
        &[
            "replay",
            "inventory.dead",
            "--id",
            &id,
            "--set-body",
            fixed.to_str().unwrap(),
        ],
    );
    assert_eq!(replayed[0]["action"], "replayed", "{replayed}");
    system.wait_stock("SKU-E", 1).await;
    let held: i64 =
        sqlx::query_scalar("SELECT quantity FROM inventory.reservations WHERE order_id = $1")
            .bind(order_id)
            .fetch_one(&system.pool)
            .await
            .unwrap();
    assert_eq!(held, 2);
    let _ = std::fs::remove_file(fixed);

    let (code, _, stderr) = dlq(&system.env, &["replay", "inventory.dead"]);
    assert_eq!(code, 2, "replay without selectors must refuse");
    assert!(stderr.contains("choose messages"));
    let (code, _, stderr) = dlq(&system.env, &["list", "inventory"]);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a dead queue"), "{stderr}");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_archives_and_restore_gives_the_message_back() {
    let env = TestEnv::new().await;
    apply(&env).await;
    let m = Outgoing::of(&contract::ReleaseStock {
        order_id: uuid::Uuid::new_v4(),
    });
    bury(&env, "inventory.dead", &m, "permanent").await;
    let before = dlq_json(&env, &["show", "inventory.dead", &m.message_id.to_string()]);

    let (code, stdout, stderr) = dlq(
        &env,
        &[
            "purge",
            "inventory.dead",
            "--all",
            "--yes",
            "--reason",
            "known bad",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("purged"), "{stdout}");
    assert_eq!(env.depth("inventory.dead").await, 0);

    let restored = dlq_json(
        &env,
        &[
            "restore",
            "inventory.dead",
            "--id",
            &m.message_id.to_string(),
        ],
    );
    assert_eq!(restored[0]["action"], "restored");
    assert_eq!(env.depth("inventory.dead").await, 1);
    let after = dlq_json(&env, &["show", "inventory.dead", &m.message_id.to_string()]);
    assert_eq!(before["body"], after["body"]);
    assert_eq!(
        before["properties"]["headers"]["x-error-kind"],
        after["properties"]["headers"]["x-error-kind"]
    );

    let pool = env.pool().await;
    let actions: Vec<String> = sqlx::query_scalar("SELECT action FROM dlq.audit ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(actions, vec!["purge", "restore"]);
    let reason: Option<String> = sqlx::query_scalar("SELECT reason FROM dlq.archive")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(reason.as_deref(), Some("known bad"));
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_gives_back_every_property_and_header_exactly() {
    let env = TestEnv::new().await;
    apply(&env).await;
    // What JSON would lose: properties the runtime does not set, a
    // timestamp in a broker's `x-death`, bytes that are not UTF-8, a byte
    // array, integers of every width.
    let mut death = FieldTable::default();
    death.insert("time".into(), AMQPValue::Timestamp(1_764_720_000));
    death.insert("count".into(), AMQPValue::LongLongInt(3));
    death.insert(
        "reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(death)].into()),
    );
    headers.insert(
        "x-binary".into(),
        AMQPValue::LongString(LongString::from(vec![0xff_u8, 0x00, 0xfe])),
    );
    headers.insert(
        "x-bytes".into(),
        AMQPValue::ByteArray(vec![1_u8, 2, 3].into()),
    );
    headers.insert("x-small".into(), AMQPValue::ShortShortInt(-3));
    headers.insert("x-float".into(), AMQPValue::Float(1.5));
    let exact = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("identity".into())
        .with_headers(headers)
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id(uuid::Uuid::new_v4().to_string().as_str().into())
        .with_reply_to("replies".into())
        .with_message_id("exact-1".into())
        .with_timestamp(1_764_720_001)
        .with_type("inventory.release".into())
        .with_app_id("shop".into());
    env.publish("", "inventory.dead", exact.clone(), b"\xff not json")
        .await;
    let m = Outgoing::of(&contract::ReleaseStock {
        order_id: uuid::Uuid::new_v4(),
    });
    bury(&env, "inventory.dead", &m, "permanent").await;
    // `show` prints what is not text as hex, and every property.
    let shown = dlq_json(&env, &["show", "inventory.dead", "exact-1"]);
    assert_eq!(
        shown["properties"]["headers"]["x-binary"],
        json!({"hex": "ff00fe"})
    );
    assert_eq!(shown["properties"]["priority"], json!(7));
    assert_eq!(shown["properties"]["reply_to"], json!("replies"));
    let (code, _, stderr) = dlq(&env, &["purge", "inventory.dead", "--all", "--yes"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(env.depth("inventory.dead").await, 0);

    // A row archived before the exact encoding existed has only the JSON,
    // and is restored from it.
    let pool = env.pool().await;
    sqlx::query("UPDATE dlq.archive SET properties_encoded = NULL WHERE message_id = $1")
        .bind(m.message_id.to_string())
        .execute(&pool)
        .await
        .unwrap();
    let (code, _, stderr) = dlq(&env, &["restore", "inventory.dead", "--all"]);
    assert_eq!(code, 0, "{stderr}");
    let back = env.drain("inventory.dead").await;
    assert_eq!(back.len(), 2);
    let restored = back
        .iter()
        .find(|(p, _)| p.message_id().as_ref().map(|i| i.as_str()) == Some("exact-1"))
        .unwrap();
    assert_eq!(restored.0, exact);
    assert_eq!(restored.1, b"\xff not json".to_vec());
    let older = back
        .iter()
        .find(|(p, _)| {
            p.message_id().as_ref().map(|i| i.to_string()) == Some(m.message_id.to_string())
        })
        .unwrap();
    assert_eq!(older.1, m.body);
    let older_headers = older.0.headers().clone().unwrap_or_default();
    assert_eq!(
        runtime::envelope::header_str(&older_headers, "x-error-kind").as_deref(),
        Some("permanent")
    );
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_killed_half_way_loses_no_message() {
    let env = TestEnv::new().await;
    apply(&env).await;
    let mut all = Vec::new();
    let conn = env.connection().await;
    let channel = conn.create_channel().await.unwrap();
    channel.confirm_select(Default::default()).await.unwrap();
    for _ in 0..1000 {
        let m = Outgoing::of(&contract::ReleaseStock {
            order_id: uuid::Uuid::new_v4(),
        });
        let mut props: BasicProperties = m.properties();
        let mut h: FieldTable = props.headers().clone().unwrap_or_default();
        h.insert(
            "x-error-kind".into(),
            AMQPValue::LongString("permanent".into()),
        );
        props = props.with_headers(h);
        channel
            .basic_publish(
                "".into(),
                "inventory.dead".into(),
                Default::default(),
                &m.body,
                props,
            )
            .await
            .unwrap();
        all.push(m.message_id.to_string());
    }
    channel.wait_for_confirms().await.unwrap();
    // Migrate the database before timing the kill.
    dlq_json(&env, &["list", "inventory.dead", "--type", "none"]);

    let mut child = tokio::process::Command::from(dlq_command(&env))
        .args([
            "replay",
            "inventory.dead",
            "--all",
            "--to-queue",
            "inventory",
            "--rate",
            "1000",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(WAIT, "the replay is under way", || async {
        env.depth("inventory").await >= 100
    })
    .await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();

    eventually(WAIT, "unacked messages returned", || async {
        env.depth("inventory.dead").await + env.depth("inventory").await >= 1000
    })
    .await;
    let mut seen: Vec<String> = Vec::new();
    for queue in ["inventory.dead", "inventory"] {
        for (p, _) in env.drain(queue).await {
            seen.push(p.message_id().as_ref().unwrap().to_string());
        }
    }
    let replayed_twice = seen.len() - {
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        unique.len()
    };
    seen.sort();
    seen.dedup();
    all.sort();
    assert_eq!(seen, all, "a message was lost");
    assert!(
        replayed_twice <= 1,
        "{replayed_twice} duplicates: at most the one in flight"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_operators_replaying_at_once_never_replay_a_message_twice() {
    let env = TestEnv::new().await;
    apply(&env).await;
    for _ in 0..300 {
        let m = Outgoing::of(&contract::ReleaseStock {
            order_id: uuid::Uuid::new_v4(),
        });
        bury(&env, "inventory.dead", &m, "permanent").await;
    }
    dlq_json(&env, &["list", "inventory.dead", "--type", "none"]);

    let replay = || {
        tokio::process::Command::from(dlq_command(&env))
            .args([
                "replay",
                "inventory.dead",
                "--all",
                "--to-queue",
                "inventory",
                "--json",
            ])
            .output()
    };
    let (a, b) = tokio::join!(replay(), replay());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.status.success() && b.status.success());
    let count = |out: &std::process::Output| {
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .iter()
            .filter(|o| o["action"] == "replayed")
            .count()
    };
    assert_eq!(count(&a) + count(&b), 300, "replayed twice or not at all");
    assert_eq!(env.depth("inventory").await, 300);
    assert_eq!(env.depth("inventory.dead").await, 0);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn edit_opens_the_body_in_the_editor_and_replays_the_result() {
    let env = TestEnv::new().await;
    apply(&env).await;
    let order_id = uuid::Uuid::new_v4();
    let m = Outgoing::of(&contract::ReserveStock {
        order_id,
        items: vec![],
    });
    bury(&env, "inventory.dead", &m, "permanent").await;
    let out = dlq_command(&env)
        .args([
            "replay",
            "inventory.dead",
            "--all",
            "--edit",
            "--to-queue",
            "inventory",
            "--json",
        ])
        // An "editor" that fixes the empty item list in place.
        .env(
            "EDITOR",
            r#"sed -i -e 's/"items": \[\]/"items": [{"sku": "SKU-1", "quantity": 1}]/'"#,
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (props, body) = env.drain("inventory").await.remove(0);
    let body: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(body["items"][0]["sku"], "SKU-1");
    assert_eq!(
        props.message_id().as_ref().unwrap().to_string(),
        m.message_id.to_string(),
        "the id is kept"
    );
    let headers = props.headers().clone().unwrap();
    assert_eq!(
        runtime::envelope::header_int(&headers, "x-replays"),
        Some(1)
    );
    assert_eq!(
        runtime::envelope::header_int(&headers, "x-attempt"),
        Some(1)
    );
    assert!(runtime::envelope::header_str(&headers, "x-error-kind").is_none());
    env.cleanup().await;
}

/// Two operators: while one edits a message, the other purges it and
/// restores another that the first one's selectors also match. The edited
/// body must not go out under the other message's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_is_bound_to_the_message_read_and_refused_once_it_is_gone() {
    let env = TestEnv::new().await;
    apply(&env).await;
    let edited = Outgoing::of(&contract::ReleaseStock {
        order_id: uuid::Uuid::new_v4(),
    });
    let other = Outgoing::of(&contract::ReleaseStock {
        order_id: uuid::Uuid::new_v4(),
    });
    bury(&env, "inventory.dead", &other, "permanent").await;
    let other_id = other.message_id.to_string();
    let (code, _, stderr) = dlq(
        &env,
        &["purge", "inventory.dead", "--id", &other_id, "--yes"],
    );
    assert_eq!(code, 0, "{stderr}");
    bury(&env, "inventory.dead", &edited, "permanent").await;
    let edited_id = edited.message_id.to_string();
    // The second operator acts while the first one's editor is open.
    let editor = format!(
        r#""$DLQ" purge inventory.dead --id {edited_id} --yes >/dev/null; "$DLQ" restore inventory.dead --id {other_id} >/dev/null; sed -i -e 's/order_id/order_id/'"#
    );
    let out = dlq_command(&env)
        .args([
            "replay",
            "inventory.dead",
            "--type",
            "inventory.release",
            "--edit",
            "--to-queue",
            "inventory",
        ])
        .env("DLQ", env!("CARGO_BIN_EXE_dlq"))
        .env("EDITOR", editor)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the edit was replayed: {stderr}");
    assert!(stderr.contains(&edited_id), "{stderr}");
    assert_eq!(env.depth("inventory").await, 0, "something was replayed");
    let left = env.drain("inventory.dead").await;
    assert_eq!(left.len(), 1);
    assert_eq!(
        left[0].0.message_id().as_ref().unwrap().to_string(),
        other_id,
        "the other message is left as it was"
    );
    env.cleanup().await;
}

#[test]
fn the_inbox_dlq_checks_is_the_one_each_worker_writes() {
    for spec in [
        order_worker::SPEC,
        inventory_worker::SPEC,
        payment_worker::SPEC,
        notification_worker::SPEC,
    ] {
        assert_eq!(
            (spec.domain.schema(), spec.domain.worker()),
            (spec.schema, spec.name)
        );
    }
}

/// A listing in pages: each page holds at most `--limit` messages in queue
/// order with the cursor of the next, `--since`/`--until` keep to a window
/// of death times, a cursor whose message is gone is refused, and the queue
/// is left exactly as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_queue_is_listed_in_pages_with_a_cursor_and_left_in_place() {
    let env = TestEnv::new().await;
    apply(&env).await;
    let hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut buried = Vec::new();
    for n in 0..25 {
        let message = Outgoing::of(&contract::Restock {
            sku: format!("SKU-{n}"),
            quantity: 1,
        });
        // The first ten died an hour ago, the others just now.
        let died = if n < 10 { hour_ago } else { chrono::Utc::now() };
        bury_since(&env, "inventory.dead", &message, "permanent", died).await;
        buried.push(message.message_id.to_string());
    }
    let page_of = |args: &[&str]| {
        let mut all = vec!["list", "inventory.dead"];
        all.extend_from_slice(args);
        dlq_json(&env, &all)
    };
    let first = page_of(&["--limit", "10"]);
    assert_eq!(ids(&first["messages"]), buried[..10]);
    assert_eq!(first["depth"], 25);
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    assert_eq!(cursor, buried[9]);
    let second = page_of(&["--limit", "10", "--after", &cursor]);
    assert_eq!(ids(&second["messages"]), buried[10..20]);
    let cursor = second["next_cursor"].as_str().unwrap().to_owned();
    let last = page_of(&["--limit", "10", "--after", &cursor]);
    assert_eq!(ids(&last["messages"]), buried[20..]);
    assert_eq!(last["next_cursor"], Value::Null);

    // Died in the last half hour: the fifteen recent ones, in pages.
    let recent = page_of(&["--limit", "20", "--since", "30m"]);
    assert_eq!(ids(&recent["messages"]), buried[10..]);
    let old = page_of(&["--limit", "20", "--until", "30m"]);
    assert_eq!(ids(&old["messages"]), buried[..10]);

    // Human output names the next page's command.
    let (code, stdout, _) = dlq(&env, &["list", "inventory.dead", "--limit", "5"]);
    assert_eq!(code, 0);
    assert!(
        stdout.contains(&format!("--limit 5 --after {}", buried[4])),
        "{stdout}"
    );

    // Garbage: a cursor that names no message, a time that is no time.
    let (code, _, stderr) = dlq(
        &env,
        &[
            "list",
            "inventory.dead",
            "--limit",
            "5",
            "--after",
            "gone-message",
        ],
    );
    assert_ne!(code, 0);
    assert!(stderr.contains("no longer in inventory.dead"), "{stderr}");
    let (code, _, stderr) = dlq(
        &env,
        &[
            "list",
            "inventory.dead",
            "--limit",
            "5",
            "--since",
            "yesterday-ish",
        ],
    );
    assert_ne!(code, 0);
    assert!(
        stderr.contains("neither an RFC 3339 time nor an age"),
        "{stderr}"
    );

    // Every message is still there, in its order.
    let everything = dlq_json(&env, &["list", "inventory.dead"]);
    assert_eq!(ids(&everything), buried);
    env.cleanup().await;
}
