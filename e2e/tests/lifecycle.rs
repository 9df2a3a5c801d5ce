//! Orders through the whole system: HTTP in, every worker, the gateway
//! simulator, and email out through a real SMTP server.
#![allow(clippy::unwrap_used)]

use e2e::{Options, System};
use payment_gateway_sim::Trouble;
use reqwest::StatusCode;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_orders_are_all_confirmed_with_full_history_and_one_email_each() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-1", 100).await;

    let mut ids = Vec::new();
    for _ in 0..25 {
        ids.push(system.place("SKU-1", 2, "pm_card_visa").await);
    }
    for id in &ids {
        let order = system.wait_final(id).await;
        assert_eq!(order["status"], "CONFIRMED", "{order}");
        let history = e2e::history(&order);
        assert_eq!(
            history,
            vec!["PENDING", "STOCK_RESERVED", "PAID", "CONFIRMED"]
        );
        assert_eq!(order["total_cents"], 3998);
        assert_eq!(system.standing_charges(id).await, 1);
    }
    for id in &ids {
        system.wait_mails(id, 1).await;
        let mail = &system.mails_about(id)[0];
        assert_eq!(mail["subject"], format!("Order {id} confirmed"));
        assert_eq!(mail["to"][0], "ada@example.com");
        assert_eq!(mail["multipart"], true);
    }
    system.wait_stock_exactly("SKU-1", 50, 0, 50).await;
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_of_several_lines_keeps_them_and_sells_then_gives_back_each_sku() {
    let system = System::start(Options::default()).await;
    system.stock("LINE-A", 10).await;
    system.stock("LINE-B", 10).await;
    system.price("LINE-A", 250).await;
    system.price("LINE-B", 500).await;
    // Two lines of the same SKU are reserved, sold and released together.
    let body = json!({
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "items": [
            { "sku": "LINE-B", "quantity": 1, "unit_price_cents": 500 },
            { "sku": "LINE-A", "quantity": 2, "unit_price_cents": 250 },
            { "sku": "LINE-B", "quantity": 3, "unit_price_cents": 500 },
        ],
        "payment_method": "pm_card_visa",
    });
    let (status, placed) = system.post("/orders", &body, None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let order = system.wait_final(&id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["total_cents"], 2500);
    let lines: Vec<(String, u64)> = order["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["sku"].as_str().unwrap().to_owned(),
                l["quantity"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        lines,
        vec![
            ("LINE-B".into(), 1),
            ("LINE-A".into(), 2),
            ("LINE-B".into(), 3)
        ],
        "the lines in the order they were placed"
    );
    // The confirmation lists the lines as placed.
    let mail = system.wait_mails(&id, 1).await.remove(0);
    let text = mail["text"].as_str().unwrap();
    let at: Vec<usize> = ["1 x LINE-B at", "2 x LINE-A at", "3 x LINE-B at"]
        .iter()
        .map(|line| {
            text.find(line)
                .unwrap_or_else(|| panic!("{line:?} not in {text}"))
        })
        .collect();
    assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
    system.wait_stock_exactly("LINE-A", 8, 0, 2).await;
    system.wait_stock_exactly("LINE-B", 6, 0, 4).await;

    system.cancel(&id).await;
    system.wait_stock_exactly("LINE-A", 10, 0, 0).await;
    system.wait_stock_exactly("LINE-B", 10, 0, 0).await;
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_unit_and_three_orders_confirm_one_and_cancel_two_out_of_stock() {
    let system = System::start(Options::default()).await;
    system.stock("LAST-1", 1).await;

    let ids = vec![
        system.place("LAST-1", 1, "pm_card_visa").await,
        system.place("LAST-1", 1, "pm_card_visa").await,
        system.place("LAST-1", 1, "pm_card_visa").await,
    ];
    let mut confirmed = 0;
    let mut out_of_stock = 0;
    for id in &ids {
        let order = system.wait_final(id).await;
        match (order["status"].as_str(), order["reason"].as_str()) {
            (Some("CONFIRMED"), _) => confirmed += 1,
            (Some("CANCELLED"), Some("out_of_stock")) => {
                out_of_stock += 1;
                assert_eq!(
                    system.charges(id).await.len(),
                    0,
                    "an out-of-stock order was charged"
                );
            }
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((confirmed, out_of_stock), (1, 2));
    system.wait_stock_exactly("LAST-1", 0, 0, 1).await;
    for id in &ids {
        system.wait_mails(id, 1).await;
    }
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_declined_card_cancels_the_order_releases_the_stock_and_charges_nothing() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-D", 5).await;

    let id = system.place("SKU-D", 2, "pm_card_chargeDeclined").await;
    let order = system.wait_final(&id).await;

    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["reason"], "payment_declined");
    assert_eq!(system.charges(&id).await.len(), 0);
    system.wait_stock("SKU-D", 5).await;
    system.wait_mails(&id, 1).await;
    assert!(
        system.mails_about(&id)[0]["text"]
            .as_str()
            .unwrap()
            .contains("declined")
    );
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

/// The amount charged is the catalog's: an order without prices is priced
/// from it, one with a price that is not the catalog's (or a product it
/// does not sell) is refused at the edge with `422` and, when the edge
/// could not know (a command sent past it, a price changed meanwhile),
/// cancelled by the saga with the reason, nothing reserved or charged. A
/// new price applies to the orders placed after it; only admins set it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prices_come_from_the_catalog_and_a_wrong_one_cancels_the_order() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-P", 10).await;
    let body = |price: Option<u64>, sku: &str| {
        let mut line = json!({ "sku": sku, "quantity": 2 });
        if let Some(price) = price {
            line["unit_price_cents"] = json!(price);
        }
        json!({ "customer_email": "ada@example.com", "currency": "EUR", "items": [line] })
    };

    // No price given: the catalog's is charged.
    let (status, placed) = system.post("/orders", &body(None, "SKU-P"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let id = placed["order_id"].as_str().unwrap().to_owned();
    let order = system.wait_final(&id).await;
    assert_eq!(order["status"], "CONFIRMED", "{order}");
    assert_eq!(order["total_cents"], 2 * e2e::PRICE);
    assert_eq!(order["items"][0]["unit_price_cents"], e2e::PRICE);
    let charges = system.charges(&id).await;
    assert_eq!(charges[0]["amount_cents"], 2 * e2e::PRICE, "{charges:?}");

    // The edge knows: 422 naming the line, nothing published.
    let (status, error) = system.post("/orders", &body(Some(1), "SKU-P"), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["details"][0]["field"], "items[0].unit_price_cents");
    assert!(
        error["details"][0]["message"]
            .as_str()
            .unwrap()
            .contains("1999"),
        "{error}"
    );
    let (status, error) = system.post("/orders", &body(None, "SKU-NONE"), None).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["details"][0]["field"], "items[0].sku");

    // Past the edge (a command another client published): the saga
    // cancels it, with the reason, before anything is reserved or charged.
    let mut refused = Vec::new();
    for (sku, price, reason) in [
        ("SKU-P", Some(5), "price_changed"),
        ("SKU-NONE", None, "unknown_product"),
    ] {
        let order_id = uuid::Uuid::new_v4();
        let command = runtime::Outgoing::of(&contract::PlaceOrder {
            order_id,
            customer_email: "eve@example.com".into(),
            currency: "EUR".into(),
            items: vec![contract::OrderedLine {
                sku: sku.into(),
                quantity: 1,
                unit_price_cents: price,
            }],
            payment_method: "pm_card_visa".into(),
            placed_by: None,
        });
        system
            .env
            .publish(
                &command.exchange,
                &command.routing_key,
                command.properties(),
                &command.body,
            )
            .await;
        let order = system.wait_final(&order_id.to_string()).await;
        assert_eq!(order["status"], "CANCELLED", "{order}");
        assert_eq!(order["reason"], reason, "{order}");
        assert_eq!(order["total_cents"], 0);
        let history = e2e::history(&order);
        assert_eq!(history, ["PENDING", "CANCELLED"]);
        refused.push(order_id.to_string());
    }
    for id in &refused {
        assert!(system.charges(id).await.is_empty());
        let mails = system.wait_mails(id, 1).await;
        assert!(
            mails[0]["subject"].as_str().unwrap().contains("cancelled"),
            "{mails:?}"
        );
    }
    system.wait_stock_exactly("SKU-P", 8, 0, 2).await;

    // A new price applies from then on; an order keeps the price it was charged.
    let shop = e2e::client_with_token(e2e::ORDERS_TOKEN);
    let refused_to_shop = shop
        .put(format!("{}/products/SKU-P", system.api))
        .json(&json!({ "unit_price_cents": 1, "currency": "EUR" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused_to_shop.status(), StatusCode::FORBIDDEN);
    system.price("SKU-P", 2500).await;
    let (status, placed) = system
        .post("/orders", &body(Some(2500), "SKU-P"), None)
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{placed}");
    let later = system
        .wait_final(placed["order_id"].as_str().unwrap())
        .await;
    assert_eq!(later["total_cents"], 5000);
    let (_, first) = system.get(&format!("/orders/{id}")).await;
    assert_eq!(first["total_cents"], 2 * e2e::PRICE);
    let product = shop
        .get(format!("{}/products/SKU-P", system.api))
        .send()
        .await
        .unwrap();
    assert_eq!(product.status(), StatusCode::OK);
    let product: serde_json::Value = product.json().await.unwrap();
    assert_eq!(product["unit_price_cents"], 2500);
    assert_eq!(product["currency"], "EUR");
    let (status, _) = system.get("/products/SKU-NONE").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

/// Every binary on its own least-privilege broker user and database role,
/// and over TLS to the broker, as a deployment runs it: the saga's every
/// path (confirmed, declined, out of stock, cancelled after confirmation
/// and refunded, payments retried through their tiers) needs nothing its
/// users and roles may not do, and every connection to the broker is
/// encrypted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_binary_as_deployed_drives_every_path_of_the_saga() {
    let system = System::start(Options {
        identities: true,
        tls: true,
        trouble: Trouble {
            error_rate: 0.3,
            latency_ms: 0,
            ..Trouble::default()
        },
        retry_delays: "100ms,100ms,100ms,100ms,100ms,100ms",
        ..Options::default()
    })
    .await;
    // Enough for every order but the short one, in whatever order the
    // workers take them (three at a time, in chunks).
    system.stock("SKU-U", 7).await;
    let confirmed = system.place("SKU-U", 1, "pm_card_visa").await;
    let declined = system.place("SKU-U", 1, "pm_card_chargeDeclined").await;
    let short = system.place("SKU-U", 8, "pm_card_visa").await;
    let mut confirmed_ids = Vec::new();
    for _ in 0..5 {
        confirmed_ids.push(system.place("SKU-U", 1, "pm_card_visa").await);
    }
    assert_eq!(system.wait_final(&confirmed).await["status"], "CONFIRMED");
    let order = system.wait_final(&declined).await;
    assert_eq!(
        (order["status"].as_str(), order["reason"].as_str()),
        (Some("CANCELLED"), Some("payment_declined"))
    );
    let order = system.wait_final(&short).await;
    assert_eq!(order["reason"], "out_of_stock");
    for id in &confirmed_ids {
        system.wait_final(id).await;
    }
    let order = system.cancel(&confirmed).await;
    assert_eq!(order["reason"], "customer_cancelled");
    testkit::eventually(Duration::from_secs(30), "the refund", || async {
        system.get(&format!("/orders/{confirmed}")).await.1["refunded"] == true
    })
    .await;
    system.wait_mails(&confirmed, 2).await;
    system.wait_mails(&declined, 1).await;
    system.assert_quiet_and_consistent().await;
    // The management API lists a connection once its first statistics are
    // in (every 5 s by default).
    testkit::eventually(
        Duration::from_secs(15),
        "the system's connections listed",
        || async { system.broker_connections().await.len() >= 5 },
    )
    .await;
    let connections = system.broker_connections().await;
    for connection in &connections {
        assert_eq!(connection["ssl"], true, "a plain connection: {connection}");
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancelling_a_confirmed_order_refunds_it_releases_the_stock_and_emails_again() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-C", 3).await;
    let id = system.place("SKU-C", 2, "pm_card_visa").await;
    assert_eq!(system.wait_final(&id).await["status"], "CONFIRMED");

    let order = system.cancel(&id).await;
    assert_eq!(order["reason"], "customer_cancelled");
    testkit::eventually(Duration::from_secs(30), "the refund", || async {
        system.standing_charges(&id).await == 0
    })
    .await;
    assert_eq!(system.charges(&id).await.len(), 1, "charged exactly once");
    system.wait_stock("SKU-C", 3).await;
    system.wait_mails(&id, 2).await;
    let subjects: Vec<String> = system
        .mails_about(&id)
        .iter()
        .map(|m| m["subject"].as_str().unwrap().to_owned())
        .collect();
    assert!(subjects.contains(&format!("Order {id} confirmed")));
    assert!(subjects.contains(&format!("Order {id} cancelled")));
    let history = e2e::history(&order);
    assert_eq!(
        history,
        vec![
            "PENDING",
            "STOCK_RESERVED",
            "PAID",
            "CONFIRMED",
            "CANCELLED"
        ]
    );
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flaky_gateway_still_gets_every_order_final_and_charges_each_at_most_once() {
    let system = System::start(Options {
        trouble: Trouble {
            error_rate: 0.3,
            latency_ms: 0,
            ..Trouble::default()
        },
        payment_timeout: Duration::from_secs(5),
        ..Options::default()
    })
    .await;
    system.stock("SKU-F", 1000).await;

    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(system.place("SKU-F", 1, "pm_card_visa").await);
    }
    let mut timed_out = Vec::new();
    for id in &ids {
        let order = system.wait_final(id).await;
        let charges = system.charges(id).await;
        assert!(
            charges.len() <= 1,
            "order {id} charged {} times",
            charges.len()
        );
        match (order["status"].as_str(), order["reason"].as_str()) {
            (Some("CONFIRMED"), _) => assert_eq!(system.standing_charges(id).await, 1),
            // A charge that failed on every tier (0.3^4 per order) dies as
            // exhausted and the saga gives up at its payment timeout.
            (Some("CANCELLED"), Some("payment_timeout")) => {
                testkit::eventually(Duration::from_secs(30), "no charge standing", || async {
                    system.standing_charges(id).await == 0
                })
                .await;
                timed_out.push(id.clone());
            }
            other => panic!("order {id} ended {other:?}"),
        }
    }
    system.set_trouble(Trouble::default()).await;
    // The only dead messages are those charges, each explained.
    for (props, _) in system.env.drain("payment.dead").await {
        let order = props.correlation_id().as_ref().unwrap().to_string();
        assert!(
            timed_out.contains(&order),
            "unexplained dead charge for {order}"
        );
        let kind = props
            .headers()
            .as_ref()
            .and_then(|h| runtime::envelope::header_str(h, "x-error-kind"));
        assert_eq!(kind.as_deref(), Some("exhausted"));
    }
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_smtp_outage_delays_emails_but_every_one_is_sent_once() {
    // Tiers that outlast the outage however slowly the SMTP server process
    // starts again (seconds on a loaded machine): the emails must wait for
    // it in the retry tiers, not run out of attempts.
    let mut system = System::start(Options {
        retry_delays: "200ms,500ms,1500ms,5s,10s,20s",
        ..Options::default()
    })
    .await;
    system.stock("SKU-M", 10).await;
    system.stop_smtp().await;

    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(system.place("SKU-M", 1, "pm_card_visa").await);
    }
    for id in &ids {
        assert_eq!(system.wait_final(id).await["status"], "CONFIRMED");
    }
    // Give the notification worker time to fail a few times.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(system.mails().is_empty());
    system.start_smtp().await;

    for id in &ids {
        system.wait_mails(id, 1).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(system.mails().len(), 5, "an email was sent twice");
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

/// A gateway outage longer than every retry tier together: the payment
/// worker's circuit breaker opens, the charges wait in their queue instead
/// of spending their tiers, and nothing is dead-lettered; once the gateway
/// answers again a probe closes the breaker and every order completes,
/// charged once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_outage_longer_than_every_retry_tier_dead_letters_nothing() {
    let system = System::start(Options {
        trouble: Trouble {
            error_rate: 1.0,
            latency_ms: 0,
            ..Trouble::default()
        },
        // 0.7 s all together; the outage lasts seven times that.
        retry_delays: "100ms,200ms,400ms",
        breaker: runtime::BreakerSettings {
            threshold: 3,
            cooldown: Duration::from_millis(500),
        },
        payment_timeout: Duration::from_secs(120),
        payment_metrics: true,
        ..Options::default()
    })
    .await;
    let observed = system.payment_metrics.clone().unwrap();
    system.stock("SKU-O", 100).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(system.place("SKU-O", 1, "pm_card_visa").await);
    }
    testkit::eventually(
        Duration::from_secs(30),
        "the gateway's breaker open",
        || async {
            let (status, body) = get_json(&system, &format!("{observed}/readyz")).await;
            status == StatusCode::SERVICE_UNAVAILABLE
                && body["breakers"]["payment-gateway"] != "closed"
                && body["breakers"]["payment-gateway"].is_string()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        system.env.depth("payment.dead").await,
        0,
        "a charge died in the outage"
    );
    for id in &ids {
        let (_, order) = system.get(&format!("/orders/{id}")).await;
        assert_eq!(order["status"], "STOCK_RESERVED", "{order}");
    }

    system.set_trouble(Trouble::default()).await;
    for id in &ids {
        assert_eq!(system.wait_final(id).await["status"], "CONFIRMED");
        assert_eq!(system.standing_charges(id).await, 1);
    }
    let (status, ready) = get_json(&system, &format!("{observed}/readyz")).await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["breakers"]["payment-gateway"], "closed");
    let metrics = system.text(&format!("{observed}/metrics")).await;
    assert!(
        metrics.contains(r#"orderflow_worker_breaker_open{worker="payment-worker",dependency="payment-gateway"} 0"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="held_back""#),
        "no charge was held back: {metrics}"
    );
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

/// The status and JSON body of a GET to `url`.
async fn get_json(system: &System, url: &str) -> (StatusCode, serde_json::Value) {
    let response = system.http.get(url).send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_of_every_worker_on_a_hot_sku_keep_the_invariants() {
    let system = System::start(Options {
        replicas: 2,
        ..Options::default()
    })
    .await;
    system.stock("HOT-1", 20).await;

    let placing: Vec<_> = (0..40)
        .map(|i| {
            let method = if i % 5 == 0 {
                "pm_card_chargeDeclined"
            } else {
                "pm_card_visa"
            };
            system.place("HOT-1", 1, method)
        })
        .collect();
    let ids = futures_join(placing).await;

    let mut confirmed = 0i64;
    for id in &ids {
        let order = system.wait_final(id).await;
        let standing = system.standing_charges(id).await;
        if order["status"] == "CONFIRMED" {
            confirmed += 1;
            assert_eq!(standing, 1, "a confirmed order has one charge");
        } else {
            assert_eq!(standing, 0, "a cancelled order has no standing charge");
        }
        assert!(system.charges(id).await.len() <= 1, "charged twice");
    }
    // Declined orders hold stock for a moment, so an order placed then may
    // find none: at most the stock is sold, and what is sold is what was confirmed.
    assert!((1..=20).contains(&confirmed), "{confirmed} confirmed");
    system
        .wait_stock_exactly("HOT-1", 20 - confirmed, 0, confirmed)
        .await;
    for id in &ids {
        system.wait_mails(id, 1).await;
    }
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

async fn futures_join(placing: Vec<impl std::future::Future<Output = String>>) -> Vec<String> {
    let mut handles = Vec::new();
    for p in placing {
        handles.push(p);
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_payment_that_never_answers_times_out_and_leaves_no_charge_standing() {
    let system = System::start(Options {
        trouble: Trouble {
            error_rate: 0.0,
            latency_ms: 1500,
            ..Trouble::default()
        },
        payment_timeout: Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    system.stock("SKU-T", 2).await;

    let id = system.place("SKU-T", 1, "pm_card_visa").await;
    let order = system.wait_final(&id).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["reason"], "payment_timeout");

    // The slow charge lands after the timeout: it must be refunded.
    testkit::eventually(Duration::from_secs(30), "no charge standing", || async {
        system.standing_charges(&id).await == 0 && !system.charges(&id).await.is_empty()
    })
    .await;
    system.wait_stock("SKU-T", 2).await;
    system.wait_mails(&id, 1).await;
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

/// A charge whose answer is lost (the gateway times out) lands after the
/// order was cancelled and its payment voided; its retry finds the payment
/// voided. The charge that landed must not stand.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_that_lands_after_the_void_is_refunded_when_its_retry_comes() {
    let system = System::start(Options {
        trouble: Trouble {
            late_charge_ms: 1500,
            ..Trouble::default()
        },
        gateway_timeout: Duration::from_millis(300),
        // The retry comes after the charge has landed.
        retry_delays: "3s,3s",
        ..Options::default()
    })
    .await;
    system.stock("SKU-L", 2).await;

    let id = system.place("SKU-L", 1, "pm_card_visa").await;
    system.wait_status(&id, "STOCK_RESERVED").await;
    // The charge is on its way, its answer lost; the customer gives up.
    let (status, _) = system
        .post(
            &format!("/orders/{id}/cancel"),
            &serde_json::json!({}),
            None,
        )
        .await;
    assert_eq!(status, 202);
    let order = system.wait_final(&id).await;
    assert_eq!(order["status"], "CANCELLED");
    testkit::eventually(
        Duration::from_secs(30),
        "the late charge landed and was refunded",
        || async {
            !system.charges(&id).await.is_empty() && system.standing_charges(&id).await == 0
        },
    )
    .await;
    system.wait_stock("SKU-L", 2).await;
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

/// An order whose cancellation fails for good (here a trigger refuses it)
/// must not hold back the payment deadlines of the orders after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_order_that_cannot_be_timed_out_does_not_hold_back_the_other_deadlines() {
    let system = System::start(Options {
        trouble: Trouble {
            error_rate: 0.0,
            latency_ms: 3000,
            ..Trouble::default()
        },
        payment_timeout: Duration::from_millis(500),
        ..Options::default()
    })
    .await;
    system.stock("SKU-D", 2).await;
    sqlx::raw_sql(
        "CREATE FUNCTION orders.refuse_cancelling_poison() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
           IF NEW.status = 'CANCELLED' AND NEW.customer_email = 'poison@example.com' THEN \
             RAISE EXCEPTION 'order % refuses to be cancelled', NEW.id; \
           END IF; \
           RETURN NEW; \
         END $$; \
         CREATE TRIGGER refuse_cancelling_poison BEFORE UPDATE ON orders.orders \
           FOR EACH ROW EXECUTE FUNCTION orders.refuse_cancelling_poison();",
    )
    .execute(&system.pool)
    .await
    .unwrap();

    // The poisoned order's deadline comes first.
    let (status, body) = system
        .post(
            "/orders",
            &json!({
                "customer_email": "poison@example.com",
                "currency": "EUR",
                "items": [{ "sku": "SKU-D", "quantity": 1, "unit_price_cents": 1999 }],
            }),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let poisoned = body["order_id"].as_str().unwrap().to_owned();
    system.wait_status(&poisoned, "STOCK_RESERVED").await;
    let id = system.place("SKU-D", 1, "pm_card_visa").await;

    // Cancelled at its deadline, long before its slow charge lands.
    let order = system.wait_final(&id).await;
    assert_eq!(order["status"], "CANCELLED");
    assert_eq!(order["reason"], "payment_timeout");
    let (_, poisoned_now) = system.get(&format!("/orders/{poisoned}")).await;
    assert_eq!(poisoned_now["status"], "STOCK_RESERVED", "{poisoned_now}");

    // The poisoned order's charge lands later and confirms it; the other's
    // is refunded.
    let poisoned_order = system.wait_final(&poisoned).await;
    assert_eq!(poisoned_order["status"], "CONFIRMED", "{poisoned_order}");
    testkit::eventually(
        Duration::from_secs(30),
        "the late charge refunded",
        || async {
            system.standing_charges(&id).await == 0 && !system.charges(&id).await.is_empty()
        },
    )
    .await;
    assert_eq!(system.standing_charges(&poisoned).await, 1);
    system.wait_mails(&id, 1).await;
    system.wait_mails(&poisoned, 1).await;
    system.wait_stock_exactly("SKU-D", 1, 0, 1).await;
    system.assert_quiet_and_consistent().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_node_that_goes_down_mid_run_loses_no_order() {
    let mut system = System::start(Options {
        broker_nodes: 2,
        ..Options::default()
    })
    .await;
    system.stock("SKU-1", 100).await;
    let mut ids = Vec::new();
    for _ in 0..15 {
        ids.push(system.place("SKU-1", 1, "pm_card_visa").await);
    }

    // The node every process reached goes down with its connections, while
    // the first orders are still on their way.
    system.take_down_busiest_node();
    let through_the_other = system.connections_through_nodes_up();

    // The publisher finds its connection broken when it next publishes and
    // publishes again through the other node: the client sees no 503.
    for _ in 0..15 {
        ids.push(system.place("SKU-1", 1, "pm_card_visa").await);
    }
    for id in &ids {
        let order = system.wait_final(id).await;
        assert_eq!(order["status"], "CONFIRMED", "{order}");
        assert_eq!(system.standing_charges(id).await, 1);
        system.wait_mails(id, 1).await;
    }
    assert!(
        system.connections_through_nodes_up() > through_the_other,
        "nothing reconnected through the node still up"
    );
    system.wait_stock_exactly("SKU-1", 70, 0, 30).await;
    system.assert_quiet_and_consistent().await;
    // Exactly one email per order, none sent twice across the reconnects.
    for id in &ids {
        assert_eq!(system.mails_about(id).len(), 1, "{id}");
    }
    system.stop().await;
}
