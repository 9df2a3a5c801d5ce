//! One least-privilege broker user per binary (`topology apply --users`),
//! against the real broker: each binary can do its own work as its user,
//! and is refused (`ACCESS_REFUSED`) what belongs to another.
#![allow(clippy::unwrap_used)]

use contract::{COMMANDS, Domain, EVENTS, keys};
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::process::Command;
use testkit::TestEnv;
use topology::Topology;
use topology::identities::identities;
use topology::management::encode_vhost;

async fn connect(url: &str) -> Connection {
    Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

/// Publishes with a confirm; the broker's refusal closes the channel, which
/// the next call on it reports.
async fn publish(connection: &Connection, exchange: &str, key: &str) -> Result<(), String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let sent = async {
        channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                b"{}",
                BasicProperties::default(),
            )
            .await?
            .await?;
        channel.basic_qos(1, Default::default()).await?;
        Ok::<_, lapin::Error>(())
    };
    sent.await.map_err(|e| e.to_string())
}

async fn consume(connection: &Connection, queue: &str) -> Result<(), String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .basic_consume(
            queue.into(),
            "identity-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Users are the broker's, not the vhost's: a test removes those it made.
async fn remove_users(env: &TestEnv, prefix: &str) {
    for identity in identities() {
        let user = encode_vhost(&format!("{prefix}{}", identity.binary));
        env.management
            .delete(&format!("users/{user}"))
            .await
            .unwrap();
    }
}

fn refused(result: Result<(), String>, what: &str) {
    match result {
        Err(e) => assert!(e.contains("ACCESS_REFUSED"), "{what}: {e}"),
        Ok(()) => panic!("{what} was allowed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_binary_does_its_own_work_as_its_user_and_nothing_else() {
    let env = TestEnv::new().await;
    let prefix = format!("{}-", env.vhost);
    let password = format!("pw-{}", env.vhost);
    let mut apply = Command::new(env!("CARGO_BIN_EXE_topology"));
    apply
        .args(["apply", "--users", "--user-prefix", &prefix])
        .env("AMQP_URL", &env.amqp_url)
        .env("RETRY_DELAYS", "1s");
    for identity in identities() {
        apply.env(identity.password_var, &password);
    }
    let out = apply.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = |binary: &str| {
        format!(
            "amqp://{prefix}{binary}:{password}@127.0.0.1:5672/{}",
            encode_vhost(&env.vhost)
        )
    };

    // Every worker declares its topology and consumes its queue as itself.
    let retry = "1s".parse().unwrap();
    for domain in Domain::ALL {
        let worker = connect(&url(domain.worker())).await;
        let mismatches = topology::declare(&worker, &Topology::contract(&retry).for_domain(domain))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", domain.worker()));
        assert!(mismatches.is_empty(), "{mismatches:?}");
        consume(&worker, domain.queue()).await.unwrap();
    }

    // The publisher sends its commands and reads the order backlog, and no
    // more: no event, no other command, no queue.
    let publisher = connect(&url("publisher")).await;
    publish(&publisher, COMMANDS, keys::ORDER_PLACE)
        .await
        .unwrap();
    refused(
        publish(&publisher, EVENTS, keys::PAYMENT_CHARGED).await,
        "publisher: payment.charged",
    );
    refused(
        publish(&publisher, COMMANDS, keys::PAYMENT_CHARGE).await,
        "publisher: payment.charge",
    );
    let channel = publisher.create_channel().await.unwrap();
    channel
        .queue_declare(
            Domain::Order.queue().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    refused(
        consume(&publisher, Domain::Order.queue()).await,
        "publisher: consume order",
    );

    // A worker publishes what it emits, never another domain's messages,
    // and consumes only its own queue.
    let payment = connect(&url(Domain::Payment.worker())).await;
    publish(&payment, EVENTS, keys::PAYMENT_CHARGED)
        .await
        .unwrap();
    refused(
        publish(&payment, EVENTS, keys::ORDER_CONFIRMED).await,
        "payment-worker: order.confirmed",
    );
    refused(
        publish(&payment, COMMANDS, keys::ORDER_PLACE).await,
        "payment-worker: order.place",
    );
    refused(
        consume(&payment, Domain::Order.queue()).await,
        "payment-worker: consume order",
    );
    let notification = connect(&url(Domain::Notification.worker())).await;
    refused(
        publish(&notification, EVENTS, keys::ORDER_CONFIRMED).await,
        "notification-worker: order.confirmed",
    );

    // dlq reads dead queues only.
    let dlq = connect(&url("dlq")).await;
    let channel = dlq.create_channel().await.unwrap();
    channel
        .basic_get(
            Domain::Payment.dead_queue().as_str().into(),
            BasicGetOptions::default(),
        )
        .await
        .unwrap();
    refused(
        consume(&dlq, Domain::Payment.queue()).await,
        "dlq: consume payment",
    );

    remove_users(&env, &prefix).await;
    env.cleanup().await;
}

/// `topology export --users` carries the same users, their passwords
/// hashed: a broker that loads the document lets each binary in as itself,
/// with the same limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exported_users_load_into_a_broker_with_their_passwords_and_limits() {
    let env = TestEnv::new().await;
    let prefix = format!("{}-x-", env.vhost);
    let password = format!("pw-{}", env.vhost);
    let mut export = Command::new(env!("CARGO_BIN_EXE_topology"));
    export
        .args([
            "export",
            "--vhost",
            &env.vhost,
            "--users",
            "--user-prefix",
            &prefix,
        ])
        .env("AMQP_URL", &env.amqp_url)
        .env("RETRY_DELAYS", "1s");
    for identity in identities() {
        export.env(identity.password_var, &password);
    }
    let out = export.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = doc.to_string();
    assert!(!text.contains(&password), "a password in the clear");
    env.management.post("definitions", &doc).await.unwrap();

    let url = |binary: &str| {
        format!(
            "amqp://{prefix}{binary}:{password}@127.0.0.1:5672/{}",
            encode_vhost(&env.vhost)
        )
    };
    let publisher = connect(&url("publisher")).await;
    publish(&publisher, COMMANDS, keys::ORDER_PLACE)
        .await
        .unwrap();
    refused(
        publish(&publisher, EVENTS, keys::PAYMENT_CHARGED).await,
        "publisher: payment.charged",
    );
    let worker = connect(&url(Domain::Inventory.worker())).await;
    consume(&worker, Domain::Inventory.queue()).await.unwrap();
    refused(
        consume(&worker, Domain::Payment.queue()).await,
        "inventory-worker: consume payment",
    );

    remove_users(&env, &prefix).await;
    env.cleanup().await;
}

#[test]
fn apply_users_without_a_password_names_the_variable() {
    let out = Command::new(env!("CARGO_BIN_EXE_topology"))
        .args(["apply", "--users"])
        .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
        .env_remove("AMQP_PASSWORD_PUBLISHER")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AMQP_PASSWORD_PUBLISHER"), "{stderr}");
}
