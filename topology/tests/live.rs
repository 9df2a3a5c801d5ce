//! `topology apply`, `diff` and `export` against a real broker, each test in
//! its own vhost.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::process::Command;
use testkit::TestEnv;
use topology::management::encode_vhost;
use topology::{Drift, RetryDelays, Topology};

async fn live_queue_names(env: &TestEnv) -> BTreeSet<String> {
    let queues = env
        .management
        .get(&format!("queues/{}", encode_vhost(&env.vhost)))
        .await
        .unwrap();
    queues
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap().to_owned())
        .collect()
}

fn cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_topology"))
        .args(args)
        .env("AMQP_URL", &env.amqp_url)
        .env("RETRY_DELAYS", "1s,5s,30s,2m,10m")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_twice_on_a_fresh_vhost_gives_exactly_the_contract_topology() {
    let env = TestEnv::new().await;

    for _ in 0..2 {
        let out = cli(&env, &["apply"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let declared = Topology::contract(&RetryDelays::contract_default());
    let expected: BTreeSet<String> = declared.queues.iter().map(|q| q.name.clone()).collect();
    assert_eq!(live_queue_names(&env).await, expected);
    for domain in ["order", "inventory", "payment", "notification"] {
        assert!(expected.contains(domain));
        assert!(expected.contains(&format!("{domain}.dead")));
        for tier in 1..=5 {
            assert!(expected.contains(&format!("{domain}.retry.{tier}")));
        }
    }
    let queue = env
        .management
        .get(&format!("queues/{}/inventory", encode_vhost(&env.vhost)))
        .await
        .unwrap();
    assert_eq!(queue["type"], "quorum");
    assert_eq!(
        queue["arguments"]["x-dead-letter-strategy"],
        "at-least-once"
    );

    let out = cli(&env, &["diff"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("no drift"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn diff_names_a_changed_argument_and_apply_explains_it_without_crashing() {
    let env = TestEnv::new().await;
    assert!(cli(&env, &["apply"]).status.success());
    // An operator recreated a retry tier with another TTL.
    let v = encode_vhost(&env.vhost);
    env.management
        .delete(&format!("queues/{v}/payment.retry.2"))
        .await
        .unwrap();
    let mut changed = Topology::contract(&RetryDelays::contract_default());
    changed.queues.retain(|q| q.name == "payment.retry.2");
    changed.queues[0]
        .arguments
        .insert("x-message-ttl".into(), serde_json::json!(1234));
    changed.exchanges.clear();
    changed.bindings.clear();
    let conn = env.connection().await;
    assert!(topology::declare(&conn, &changed).await.unwrap().is_empty());

    let (api, vhost) = topology::Management::for_amqp_url(&env.amqp_url, None).unwrap();
    let declared = Topology::contract(&RetryDelays::contract_default());
    let drift = topology::diff(&api, &vhost, &declared).await.unwrap();
    assert_eq!(
        drift,
        vec![Drift::QueueArgument {
            queue: "payment.retry.2".into(),
            argument: "x-message-ttl".into(),
            declared: Some(serde_json::json!(5000)),
            live: Some(serde_json::json!(1234)),
        }]
    );

    let out = cli(&env, &["diff"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("queue payment.retry.2: argument x-message-ttl is 1234, declared 5000"),
        "{stdout}"
    );

    let out = cli(&env, &["apply"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("queue payment.retry.2 exists with other arguments"),
        "{stderr}"
    );
    assert!(stderr.contains("x-message-ttl"), "{stderr}");
    // Everything else was still declared.
    assert_eq!(live_queue_names(&env).await.len(), declared.queues.len());
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_writes_a_definitions_document_the_broker_accepts() {
    let env = TestEnv::new().await;
    let out = cli(&env, &["export"]);
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["vhosts"][0]["name"], env.vhost.as_str());

    // Importing it through the management API creates the whole topology.
    env.management
        .post(&format!("definitions/{}", encode_vhost(&env.vhost)), &doc)
        .await
        .unwrap();
    let (api, vhost) = topology::Management::for_amqp_url(&env.amqp_url, None).unwrap();
    let declared = Topology::contract(&RetryDelays::contract_default());
    assert_eq!(
        topology::diff(&api, &vhost, &declared).await.unwrap(),
        vec![]
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_retry_delays_are_refused_with_the_variable_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_topology"))
        .arg("export")
        .env("RETRY_DELAYS", "1s,soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"RETRY_DELAYS="1s,soon" is not valid: "#),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_and_diff_take_a_clusters_nodes_and_pass_over_one_that_is_down() {
    let env = TestEnv::new().await;
    let down = testkit::free_port();
    let nodes = env.amqp_url_with_nodes(&[format!("127.0.0.1:{down}"), testkit::BROKER.into()]);
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_topology"))
            .args(args)
            .env("AMQP_URL", &nodes)
            .env("RETRY_DELAYS", "1s,5s,30s,2m,10m")
            .output()
            .unwrap()
    };
    let applied = run(&["apply"]);
    assert!(
        applied.status.success(),
        "{}",
        String::from_utf8_lossy(&applied.stderr)
    );
    let expected: BTreeSet<String> = Topology::contract(&RetryDelays::contract_default())
        .queues
        .iter()
        .map(|q| q.name.clone())
        .collect();
    assert_eq!(live_queue_names(&env).await, expected);
    let diffed = run(&["diff", "--management-url", testkit::MANAGEMENT]);
    assert!(
        diffed.status.success(),
        "{}",
        String::from_utf8_lossy(&diffed.stdout)
    );
    let garbage = Command::new(env!("CARGO_BIN_EXE_topology"))
        .arg("apply")
        .env(
            "AMQP_URL",
            "amqp://guest:s3cret@127.0.0.1:5672,,127.0.0.1:5673/%2f",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&garbage.stderr);
    assert!(!garbage.status.success());
    assert!(stderr.contains("node 2 of the list is empty"), "{stderr}");
    assert!(!stderr.contains("s3cret"), "{stderr}");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn diff_finds_the_management_api_of_a_node_that_answers() {
    let env = TestEnv::new().await;
    env.declare_topology("1s,5s,30s,2m,10m").await;
    // The first node is IPv6 loopback, where neither the broker nor its
    // management API listens (both are on IPv4 here): passed over for the next.
    let nodes = env.amqp_url_with_nodes(&["[::1]:5672".into(), testkit::BROKER.into()]);
    let out = Command::new(env!("CARGO_BIN_EXE_topology"))
        .arg("diff")
        .env("AMQP_URL", &nodes)
        .env("RETRY_DELAYS", "1s,5s,30s,2m,10m")
        .env_remove("RABBITMQ_MANAGEMENT_URL")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("no drift"), "{stdout}");
    env.cleanup().await;
}
