//! A broker memory alarm blocks every publisher of the broker: this test
//! lowers the broker's memory watermark, so it runs in the serial group
//! (`scripts/test.sh`), never beside the others, and puts it back however
//! it ends.
#![allow(clippy::unwrap_used)]

use e2e::{Options, System};
use reqwest::StatusCode;
use serde_json::json;
use std::time::{Duration, Instant};
use testkit::MemoryAlarm;

fn order() -> serde_json::Value {
    json!({
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "items": [{ "sku": "SKU-B", "quantity": 1, "unit_price_cents": e2e::PRICE }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_broker_blocks_publishers_orders_get_503_and_keyed_retries_place_each_once() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-B", 5).await;
    let first = system.place("SKU-B", 1, "pm_card_visa").await;
    system.wait_final(&first).await;

    let alarm = MemoryAlarm::raise();
    // The broker blocks a connection when it next publishes: the first
    // command waits for its confirm until the publisher gives up (a 503 for
    // a command that may still arrive once the alarm clears: the client
    // retries it with its key).
    let (status, body) = system.post("/orders", &order(), Some("alarm-1")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    testkit::eventually(Duration::from_secs(30), "readyz says blocked", || async {
        let (status, body) = system.get("/readyz").await;
        status == StatusCode::SERVICE_UNAVAILABLE && body["broker"] == "blocked"
    })
    .await;
    // Blocked now: every further command is refused at once, none started.
    let asked = Instant::now();
    let (status, body) = system.post("/orders", &order(), Some("alarm-2")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(
        asked.elapsed() < Duration::from_secs(1),
        "took {:?}",
        asked.elapsed()
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("blocking publishers"),
        "{body}"
    );
    drop(alarm);

    testkit::eventually(Duration::from_secs(30), "readyz ok again", || async {
        system.get("/readyz").await.0 == StatusCode::OK
    })
    .await;
    // The client retries each with its key, as README says: one order each.
    for key in ["alarm-1", "alarm-2"] {
        let (status, placed) = system.post("/orders", &order(), Some(key)).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
        let id = placed["order_id"].as_str().unwrap();
        assert_eq!(system.wait_final(id).await["status"], "CONFIRMED");
    }
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(orders, 3, "an order was placed twice, or lost");
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}
