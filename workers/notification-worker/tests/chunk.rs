//! The notification worker emailing a chunk of outcomes that wait
//! together, against the real broker, database and an SMTP server process:
//! each outcome is emailed once, an outcome already emailed is not emailed
//! again, one published twice is emailed once, and a recipient the server
//! refuses (offered to it once) or an address that is not one is
//! dead-lettered without a `sent` row, while the others of the chunk go out;
//! the same against a server that takes pipelined commands and one that
//! does not.
#![allow(clippy::unwrap_used)]

use contract::{Line, OrderCancelled, OrderConfirmed};
use notification_worker::{MailSettings, Notifications, SPEC};
use runtime::testing::{one_chunk_settings, run_until};
use runtime::{Outgoing, Worker};
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::{SmtpOptions, SmtpSink, TestEnv, eventually};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn confirmed(order_id: Uuid, customer_email: &str) -> Outgoing {
    Outgoing::of(&OrderConfirmed {
        order_id,
        customer_email: customer_email.to_owned(),
        currency: "EUR".into(),
        total_cents: 2500,
        items: vec![Line {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_cents: 2500,
        }],
    })
    .correlated(order_id)
}

fn cancelled(order_id: Uuid, customer_email: &str) -> Outgoing {
    Outgoing::of(&OrderCancelled {
        order_id,
        customer_email: customer_email.to_owned(),
        currency: "EUR".into(),
        total_cents: 2500,
        reason: "payment_declined".into(),
        refunded: false,
    })
    .correlated(order_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_of_outcomes_is_emailed_once_each_and_refusals_are_dead_lettered_alone() {
    a_chunk_is_emailed(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_chunk_to_a_server_without_pipelining() {
    a_chunk_is_emailed(false).await;
}

async fn a_chunk_is_emailed(pipelining: bool) {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    env.declare_topology("100ms").await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    let options = SmtpOptions {
        refuse: Some("refused".into()),
        pipelining,
        ..SmtpOptions::default()
    };
    let sink = SmtpSink::start_with(&env.database, options).await;

    let [first, declined, earlier, twice, refused, garbled, last] =
        std::array::from_fn::<Uuid, 7, _>(|_| Uuid::new_v4());
    // Emailed before (a replayed event): its row stands.
    sqlx::query(
        "INSERT INTO notifications.sent (order_id, outcome, email, subject) \
         VALUES ($1, 'confirmed', 'ann@example.com', 'earlier')",
    )
    .bind(earlier)
    .execute(&pool)
    .await
    .unwrap();
    let chunk = [
        confirmed(first, "ann@example.com"),
        cancelled(declined, "bob@example.com"),
        confirmed(earlier, "ann@example.com"),
        // The same event twice, under two message ids.
        confirmed(twice, "cy@example.com"),
        confirmed(twice, "cy@example.com"),
        confirmed(refused, "refused@example.com"),
        confirmed(garbled, "not an address"),
        confirmed(last, "dee@example.com"),
    ];
    for out in &chunk {
        env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
            .await;
    }

    let settings = one_chunk_settings(&env.amqp_url, &env.database_url);
    let mail = MailSettings {
        smtp_url: runtime::SecretUrl::new(sink.url()),
        from: "orderflow <orders@orderflow.local>".parse().unwrap(),
    };
    let handler = Notifications::new(&mail).unwrap();
    // A pool of its own: the worker closes it when it stops.
    let worker = Worker::with_pool(SPEC, settings, env.pool().await, handler);
    run_until(worker, async {
        eventually(WAIT, "four emails and two dead messages", || async {
            sink.mails().len() >= 4 && env.depth("notification.dead").await == 2
        })
        .await;
        // Time for a second email that should not come.
        tokio::time::sleep(Duration::from_millis(300)).await;
    })
    .await;

    let mut emailed: BTreeMap<String, usize> = BTreeMap::new();
    for mail in sink.mails() {
        let subject = mail["subject"].as_str().unwrap().to_owned();
        *emailed.entry(subject).or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = [
        format!("Order {first} confirmed"),
        format!("Order {declined} cancelled"),
        format!("Order {twice} confirmed"),
        format!("Order {last} confirmed"),
    ]
    .into_iter()
    .map(|subject| (subject, 1))
    .collect();
    assert_eq!(emailed, expected);
    assert_eq!(
        sink.refusals(),
        ["refused@example.com"],
        "a refused email is offered to the server once"
    );

    let mut sent: Vec<Uuid> = sqlx::query_scalar("SELECT order_id FROM notifications.sent")
        .fetch_all(&pool)
        .await
        .unwrap();
    sent.sort();
    let mut expected_rows = vec![first, declined, earlier, twice, last];
    expected_rows.sort();
    assert_eq!(sent, expected_rows, "no row for an email not sent");

    let mut dead = Vec::new();
    for (props, body) in env.drain("notification.dead").await {
        let headers = props.headers().as_ref().unwrap();
        let kind = headers.inner().get(contract::headers::ERROR_KIND).unwrap();
        assert_eq!(kind.as_long_string().unwrap().to_string(), "permanent");
        let event: OrderConfirmed = serde_json::from_slice(&body).unwrap();
        dead.push(event.order_id);
    }
    dead.sort();
    let mut expected_dead = vec![refused, garbled];
    expected_dead.sort();
    assert_eq!(dead, expected_dead);
    assert_eq!(env.depth("notification").await, 0);
    pool.close().await;
    sink.remove().await;
    env.cleanup().await;
}
