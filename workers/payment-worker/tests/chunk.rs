//! The payment worker preparing a chunk of charges that wait together,
//! against the real broker, database and the gateway simulator: one look
//! finds the payments already settled, and only the others are asked of
//! the gateway; each charge is answered once.
#![allow(clippy::unwrap_used)]

use contract::{ChargePayment, PaymentCharged, PaymentDeclined};
use payment_worker::gateway::GatewayClient;
use payment_worker::{Payments, SPEC};
use runtime::testing::{one_chunk_settings, run_until};
use runtime::{Message, Outgoing, Worker};
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::{TestEnv, eventually};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn charge(order_id: Uuid) -> Outgoing {
    Outgoing::of(&ChargePayment {
        order_id,
        amount_cents: 2500,
        currency: "EUR".into(),
        payment_method: "pm_card_visa".into(),
    })
    .correlated(order_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_of_charges_asks_the_gateway_only_for_payments_not_yet_settled() {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    env.declare_topology("100ms").await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_url = format!("http://{}", listener.local_addr().unwrap());
    let router = payment_gateway_sim::Gateway::new(Default::default()).router();
    let gateway = tokio::spawn(async move { axum::serve(listener, router).await });

    let [first, second, voided, declined, charged] =
        std::array::from_fn::<Uuid, 5, _>(|_| Uuid::new_v4());
    // Settled before the chunk: voided (the order gave up), declined, and
    // charged (a replayed command).
    sqlx::query(
        "INSERT INTO payments.payments (order_id, status, charge_id, decline) VALUES \
         ($1, 'voided', NULL, NULL), ($2, 'declined', NULL, 'card_declined'), \
         ($3, 'charged', 'ch_earlier', NULL)",
    )
    .bind(voided)
    .bind(declined)
    .bind(charged)
    .execute(&pool)
    .await
    .unwrap();
    for order_id in [first, voided, second, declined, charged] {
        let out = charge(order_id);
        env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
            .await;
    }

    let settings = one_chunk_settings(&env.amqp_url, &env.database_url);
    let gateway_settings = payment_worker::GatewaySettings {
        url: gateway_url.clone(),
        timeout: Duration::from_secs(5),
        max_in_flight: 8,
        ca_file: None,
    };
    let client = || GatewayClient::new(&gateway_settings).unwrap();
    let handler = Payments { gateway: client() };
    // A pool of its own: the worker closes it when it stops.
    let worker = Worker::with_pool(SPEC, settings, env.pool().await, handler);
    // Four answers: the voided payment has none to give.
    run_until(
        worker,
        eventually(WAIT, "four answers", || async {
            env.depth("order").await == 4 && env.depth("payment").await == 0
        }),
    )
    .await;

    let mut answers = BTreeMap::new();
    for (props, body) in env.drain("order").await {
        let kind = props.kind().as_ref().unwrap().to_string();
        if kind == PaymentCharged::KIND {
            let ev: PaymentCharged = serde_json::from_slice(&body).unwrap();
            answers.insert(ev.order_id, "charged".to_owned());
        } else {
            assert_eq!(kind, PaymentDeclined::KIND);
            let ev: PaymentDeclined = serde_json::from_slice(&body).unwrap();
            answers.insert(ev.order_id, format!("declined {}", ev.reason));
        }
    }
    let expected: BTreeMap<Uuid, String> = [
        (first, "charged".to_owned()),
        (second, "charged".to_owned()),
        (declined, "declined card_declined".to_owned()),
        (charged, "charged".to_owned()),
    ]
    .into_iter()
    .collect();
    assert_eq!(answers, expected);

    let asked = client();
    for (order_id, charges) in [
        (first, 1),
        (second, 1),
        (voided, 0),
        (declined, 0),
        (charged, 0),
    ] {
        assert_eq!(
            asked.charges_of(order_id).await.unwrap().len(),
            charges,
            "gateway charges of {order_id}"
        );
    }
    let statuses: Vec<String> = sqlx::query_scalar(
        "SELECT status FROM payments.payments WHERE order_id = ANY($1) ORDER BY status",
    )
    .bind([first, second, voided])
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(statuses, ["charged", "charged", "voided"]);
    gateway.abort();
    pool.close().await;
    env.cleanup().await;
}
