//! The inventory worker deciding a chunk of messages that wait together,
//! against the real broker and database: orders competing for the last
//! units are decided one after the other, each all or nothing; a commit,
//! a replayed reservation and an unknown SKU in the same chunk each get
//! their own answer; stock never goes negative. An invalid reservation in a
//! chunk is dead-lettered (the chunk rolls back and runs alone) and the
//! others still reserve once.
#![allow(clippy::unwrap_used)]

use contract::keys;
use contract::{CommitStock, Item, OutOfStock, ReserveStock, StockReserved};
use inventory_worker::{Inventory, SPEC};
use runtime::testing::{one_chunk_settings, run_until};
use runtime::{Message, Outgoing, Worker};
use std::collections::BTreeMap;
use std::time::Duration;
use testkit::{TestEnv, eventually};
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

/// The contract topology and a migrated database of the test's own.
async fn setup() -> (TestEnv, sqlx::PgPool) {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    env.declare_topology("100ms").await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    (env, pool)
}

/// Sends `chunk`, then runs an inventory worker that takes it as one chunk
/// (gathered before its transaction starts) until `answers` events reach
/// the saga's queue and `dead` messages the dead queue.
async fn run_chunk(env: &TestEnv, chunk: &[Outgoing], answers: u32, dead: u32) {
    for out in chunk {
        send(env, out).await;
    }
    let settings = one_chunk_settings(&env.amqp_url, &env.database_url);
    // A pool of its own: the worker closes it when it stops.
    let worker = Worker::with_pool(SPEC, settings, env.pool().await, Inventory);
    run_until(
        worker,
        eventually(WAIT, "every answer and dead message", || async {
            env.depth("order").await == answers && env.depth("inventory.dead").await == dead
        }),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_of_reservations_and_commits_is_decided_order_by_order_all_or_nothing() {
    let (env, pool) = setup().await;
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
    let chunk = [
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
    ];
    // Seven answers reach the saga's queue.
    run_chunk(&env, &chunk, 7, 0).await;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_invalid_reservation_in_a_chunk_is_dead_lettered_and_the_others_still_reserve_once() {
    let (env, pool) = setup().await;
    sqlx::query("INSERT INTO inventory.stock (sku, available) VALUES ('A', 5)")
        .execute(&pool)
        .await
        .unwrap();
    let [first, empty, zero, second] = std::array::from_fn::<Uuid, 4, _>(|_| Uuid::new_v4());
    let chunk = [
        reserve(first, &[("A", 1)]),
        // No items, and a line of zero: refused as permanent failures.
        reserve(empty, &[]),
        reserve(zero, &[("A", 0)]),
        reserve(second, &[("A", 2)]),
    ];
    run_chunk(&env, &chunk, 2, 2).await;

    let reserved: Vec<Uuid> =
        sqlx::query_scalar("SELECT order_id FROM inventory.reservations ORDER BY quantity")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(reserved, [first, second], "each valid order reserved once");
    let (available, held): (i64, i64) =
        sqlx::query_as("SELECT available, reserved FROM inventory.stock WHERE sku = 'A'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((available, held), (2, 3));
    for (props, _) in env.drain("inventory.dead").await {
        let headers = props.headers().as_ref().unwrap();
        let kind = headers.inner().get(contract::headers::ERROR_KIND).unwrap();
        assert_eq!(kind.as_long_string().unwrap().to_string(), "permanent");
    }
    assert_eq!(env.depth("inventory").await, 0);
    env.cleanup().await;
}
