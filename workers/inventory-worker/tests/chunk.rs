//! The inventory worker deciding a chunk of messages that wait together,
//! against the real broker and database: orders competing for the last
//! units are decided one after the other, each all or nothing; a commit,
//! a replayed reservation and an unknown SKU in the same
//! chunk each get their own answer; stock never goes negative.
//! (An invalid message in a chunk rolls the chunk back to run alone:
//! `runtime/tests/together.rs`.)
#![allow(clippy::unwrap_used)]

use inventory_worker::{Inventory, SPEC};
use messages::{CommitStock, Item, OutOfStock, ReserveStock, StockReserved};
use runtime::{Message, Outgoing, Worker, WorkerSettings};
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::{TestEnv, eventually};
use topology::keys;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn reserve(order_id: Uuid, items: &[(&str, u32)]) -> Outgoing {
    let items = items
        .iter()
        .map(|(sku, quantity)| Item {
            sku: (*sku).to_owned(),
            quantity: *quantity,
        })
        .collect();
    Outgoing::of(&ReserveStock { order_id, items }).correlated(order_id)
}

async fn send(env: &TestEnv, out: &Outgoing) {
    env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_of_reservations_and_commits_is_decided_order_by_order_all_or_nothing() {
    runtime::telemetry::init();
    let env = TestEnv::new().await;
    let t = topology::Topology::contract(&"100ms".parse().unwrap());
    let conn = env.connection().await;
    assert!(topology::declare(&conn, &t).await.unwrap().is_empty());
    let _ = conn.close(200, "done".into()).await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    // A: 3 units, B: 1, D: 1; C has 2 reserved by order `held`.
    let held = Uuid::new_v4();
    sqlx::query(
        "WITH stock AS (INSERT INTO inventory.stock (sku, available, reserved) \
         VALUES ('A', 3, 0), ('B', 1, 0), ('C', 5, 2), ('D', 1, 0)) \
         INSERT INTO inventory.reservations (order_id, sku, quantity) VALUES ($1, 'C', 2)",
    )
    .bind(held)
    .execute(&pool)
    .await
    .unwrap();

    let [first, second, third, fourth, replayed, unknown] =
        std::array::from_fn::<Uuid, 6, _>(|_| Uuid::new_v4());
    for out in [
        reserve(first, &[("A", 2)]),
        // One unit of A left: refused, nothing taken.
        reserve(second, &[("A", 2)]),
        // Takes the last A and the only B.
        reserve(third, &[("A", 1), ("B", 1)]),
        reserve(fourth, &[("B", 1)]),
        Outgoing::of(&CommitStock {
            order_id: held,
            skus: vec!["C".into()],
        })
        .correlated(held),
        // The same reservation twice, under two message ids.
        reserve(replayed, &[("D", 1)]),
        reserve(replayed, &[("D", 1)]),
        reserve(unknown, &[("Z", 1)]),
    ] {
        send(&env, &out).await;
    }

    // All of them in one chunk, gathered before its transaction starts.
    let settings = WorkerSettings {
        amqp_url: runtime::SecretUrl::new(env.amqp_url.clone()),
        database_url: runtime::SecretUrl::new(env.database_url.clone()),
        retry_delays: "100ms".parse().unwrap(),
        prefetch: 16,
        concurrency: 1,
        batch_size: 16,
        batch_linger: Duration::from_millis(500),
        database_pool_size: 4,
        outbox_sweep_after: Duration::from_secs(5),
        inbox_retention: Duration::from_secs(86_400),
    };
    // A pool of its own: the worker closes it when it stops.
    let worker = Worker::with_pool(SPEC, settings, env.pool().await, Inventory);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));

    // Seven answers reach the saga's queue.
    eventually(WAIT, "seven answers", || async {
        env.depth("order").await == 7
    })
    .await;
    let _ = stop.send(());
    task.await.unwrap().unwrap();

    let mut answers: BTreeMap<Uuid, Vec<String>> = BTreeMap::new();
    for (props, body) in env.drain("order").await {
        let kind = props.kind().as_ref().unwrap().to_string();
        let (order_id, answer) = if kind == StockReserved::KIND {
            let ev: StockReserved = serde_json::from_slice(&body).unwrap();
            (ev.order_id, "reserved".to_owned())
        } else {
            assert_eq!(kind, keys::INVENTORY_OUT_OF_STOCK);
            let ev: OutOfStock = serde_json::from_slice(&body).unwrap();
            (ev.order_id, format!("short {}", ev.skus.join(",")))
        };
        answers.entry(order_id).or_default().push(answer);
    }
    let expected: BTreeMap<Uuid, Vec<String>> = [
        (first, vec!["reserved"]),
        (second, vec!["short A"]),
        (third, vec!["reserved"]),
        (fourth, vec!["short B"]),
        (replayed, vec!["reserved", "reserved"]),
        (unknown, vec!["short Z"]),
    ]
    .into_iter()
    .map(|(id, a)| (id, a.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(answers, expected);

    let stock: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT sku, available, reserved, sold FROM inventory.stock ORDER BY sku")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        stock,
        [
            ("A".to_owned(), 0, 3, 0),
            ("B".to_owned(), 0, 1, 0),
            ("C".to_owned(), 5, 0, 2),
            ("D".to_owned(), 0, 1, 0),
        ]
    );
    let refused: i64 =
        sqlx::query_scalar("SELECT count(*) FROM inventory.reservations WHERE order_id = ANY($1)")
            .bind([second, fourth, unknown])
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(refused, 0, "a refused order holds nothing");
    let committed: bool =
        sqlx::query_scalar("SELECT committed FROM inventory.reservations WHERE order_id = $1")
            .bind(held)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(committed);
    assert_eq!(env.depth("inventory").await, 0);
    assert_eq!(env.depth("inventory.dead").await, 0);
    env.cleanup().await;
}
