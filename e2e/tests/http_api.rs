//! The HTTP contract from a client's side: idempotency keys, every kind of
//! bad input, health endpoints, and a broker that is away.
#![allow(clippy::unwrap_used)]

use e2e::{Options, System};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;

/// The publisher alone, without workers, in this process.
struct LonePublisher {
    api: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LonePublisher {
    async fn start(amqp_url: &str, database_url: &str) -> Self {
        Self::start_shedding(amqp_url, database_url, &[]).await
    }

    /// With `RATE_LIMIT_*` / `MAX_BACKLOG` set as given.
    async fn start_shedding(amqp_url: &str, database_url: &str, shedding: &[(&str, &str)]) -> Self {
        let shedding = runtime::config::Source::from_pairs(shedding.iter().copied());
        let settings = publisher::PublisherSettings {
            http_addr: "127.0.0.1:0".into(),
            amqp_url: runtime::SecretUrl::new(amqp_url),
            database_url: runtime::SecretUrl::new(database_url),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 65536,
            database_pool_size: 1,
            shedding: publisher::shedding::SheddingSettings::read(&shedding).unwrap(),
            auth: e2e::test_keys(),
            metrics_addr: None,
        };
        let app = publisher::Application::build(settings).await.unwrap();
        let api = format!("http://127.0.0.1:{}", app.port());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Self { api, stop, server }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

fn order_body() -> Value {
    json!({
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "items": [{ "sku": "SKU-I", "quantity": 1, "unit_price_cents": e2e::PRICE }],
    })
}

/// A key names one order: reused with another body it is refused with a
/// `409` naming the problem, not answered with the first order; the same
/// body again is still the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_reused_with_another_body_is_a_conflict() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-I", 10).await;
    let (status, first) = system
        .post("/orders", &order_body(), Some("checkout-77"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = first["order_id"].as_str().unwrap();
    system.wait_final(id).await;

    let mut other = order_body();
    other["items"][0]["quantity"] = json!(3);
    let (status, body) = system.post("/orders", &other, Some("checkout-77")).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("Idempotency-Key"),
        "{body}"
    );
    let mut other_email = order_body();
    other_email["customer_email"] = json!("eve@example.com");
    let (status, _) = system
        .post("/orders", &other_email, Some("checkout-77"))
        .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let (status, again) = system
        .post("/orders", &order_body(), Some("checkout-77"))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(again["order_id"], first["order_id"]);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_idempotency_key_places_one_order_and_answers_the_same_id() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-I", 10).await;

    let (s1, first) = system
        .post("/orders", &order_body(), Some("checkout-42"))
        .await;
    let (s2, second) = system
        .post("/orders", &order_body(), Some("checkout-42"))
        .await;
    let (s3, other) = system
        .post("/orders", &order_body(), Some("checkout-43"))
        .await;

    assert_eq!(
        (s1, s2, s3),
        (
            StatusCode::ACCEPTED,
            StatusCode::ACCEPTED,
            StatusCode::ACCEPTED
        )
    );
    assert_eq!(first["order_id"], second["order_id"]);
    assert_ne!(first["order_id"], other["order_id"]);
    let id = first["order_id"].as_str().unwrap();
    assert_eq!(system.wait_final(id).await["status"], "CONFIRMED");
    assert_eq!(
        system.wait_final(other["order_id"].as_str().unwrap()).await["status"],
        "CONFIRMED"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(rows, 2);
    assert_eq!(system.charges(id).await.len(), 1);
    system.wait_mails(id, 1).await;

    // Without a key each request is an order of its own, whose id is
    // time-ordered (decision 0015).
    let (status, unkeyed) = system.post("/orders", &order_body(), None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let unkeyed_id = unkeyed["order_id"].as_str().unwrap();
    let parsed: uuid::Uuid = unkeyed_id.parse().unwrap();
    assert_eq!(parsed.get_version(), Some(uuid::Version::SortRand));
    assert_eq!(system.wait_final(unkeyed_id).await["status"], "CONFIRMED");
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retried_restock_with_the_same_key_adds_once() {
    let system = System::start(Options::default()).await;
    for _ in 0..3 {
        let (status, _) = system
            .post(
                "/inventory/SKU-R/restock",
                &json!({"quantity": 7}),
                Some("delivery-1"),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED);
    }
    let (status, _) = system
        .post(
            "/inventory/SKU-R/restock",
            &json!({"quantity": 1}),
            Some("delivery-2"),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    system.wait_stock("SKU-R", 8).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, stock) = system.get("/inventory/SKU-R").await;
    assert_eq!(stock["available"], 8);
    let (status, body) = system.get("/inventory/NEVER-STOCKED").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_of_every_kind_gets_a_clear_json_error_and_publishes_nothing() {
    let system = System::start(Options::default()).await;
    let url = |path: &str| format!("{}{path}", system.api);
    let with_items = |items: Value| {
        let mut b = order_body();
        b["items"] = items;
        b
    };
    let with = |field: &str, value: Value| {
        let mut b = order_body();
        b[field] = value;
        b
    };
    let json_cases: Vec<(&str, Value, StatusCode, Option<&str>)> = vec![
        (
            "empty items",
            with_items(json!([])),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("items"),
        ),
        (
            "negative quantity",
            with_items(json!([{"sku": "A", "quantity": -1, "unit_price_cents": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("items[0].quantity"),
        ),
        (
            "zero quantity",
            with_items(json!([{"sku": "A", "quantity": 0, "unit_price_cents": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("items[0].quantity"),
        ),
        (
            "huge quantity",
            with_items(
                json!([{"sku": "A", "quantity": 1_000_000_000_000i64, "unit_price_cents": 1}]),
            ),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("items[0].quantity"),
        ),
        (
            "quantity beyond i64",
            json!({"customer_email": "a@b.co", "currency": "EUR", "items": [{"sku": "A", "quantity": 1e30, "unit_price_cents": 1}]}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            "negative price",
            with_items(json!([{"sku": "A", "quantity": 1, "unit_price_cents": -5}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("items[0].unit_price_cents"),
        ),
        (
            "bad sku",
            with_items(json!([{"sku": "no spaces allowed", "quantity": 1, "unit_price_cents": 1}])),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("items[0].sku"),
        ),
        (
            "bad email",
            with("customer_email", json!("not-an-email")),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("customer_email"),
        ),
        (
            "unknown currency",
            with("currency", json!("XYZ")),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("currency"),
        ),
        (
            "bad payment method",
            with("payment_method", json!("cash")),
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("payment_method"),
        ),
        (
            "missing field",
            json!({"currency": "EUR", "items": []}),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            "unknown field",
            with("coupon", json!("FREE")),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            "wrong type",
            with("items", json!("lots")),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
        (
            "array body",
            json!([1, 2, 3]),
            StatusCode::UNPROCESSABLE_ENTITY,
            None,
        ),
    ];
    for (what, body, expected, field) in json_cases {
        let response = system
            .http
            .post(url("/orders"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{what}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"].is_string(), "{what}: {error}");
        assert!(error["details"].is_array(), "{what}: {error}");
        if let Some(field) = field {
            let fields: Vec<&str> = error["details"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|d| d["field"].as_str())
                .collect();
            assert!(fields.contains(&field), "{what}: {error}");
        }
    }

    let raw_cases: Vec<(&str, Vec<u8>, &str, StatusCode)> = vec![
        (
            "broken JSON",
            br#"{"customer_email": "#.to_vec(),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "binary garbage",
            vec![0xff, 0xfe, 0x00, 0x01],
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "empty body",
            Vec::new(),
            "application/json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "not JSON content type",
            serde_json::to_vec(&order_body()).unwrap(),
            "text/plain",
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
        ),
    ];
    for (what, body, content_type, expected) in raw_cases {
        let response = system
            .http
            .post(url("/orders"))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "{what}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"].is_string(), "{what}: {error}");
    }

    // 5 MiB: the server answers 413 as soon as it sees the length and closes
    // the connection, so the body is written over a raw socket, ignoring the
    // broken pipe a client may get, and the answer read afterwards.
    let (status, error) = post_huge_body(&system.api, 5 * 1024 * 1024).await;
    assert_eq!(status, 413);
    assert!(
        error["error"].as_str().unwrap().contains("larger than"),
        "{error}"
    );

    let long_key = "k".repeat(300);
    let response = system
        .http
        .post(url("/orders"))
        .header("Idempotency-Key", long_key)
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let (status, _) = system.get("/orders/not-a-uuid").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = system
        .get(&format!("/orders/{}", uuid::Uuid::new_v4()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());
    let (status, _) = system
        .post(
            &format!("/orders/{}/cancel", uuid::Uuid::new_v4()),
            &json!({}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = system
        .post("/inventory/SKU-1/restock", &json!({"quantity": 0}), None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = system
        .post("/inventory/SKU-1/restock", &json!({"quantity": -3}), None)
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = system
        .post(
            "/inventory/bad%20sku/restock",
            &json!({"quantity": 3}),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, body) = system.get("/no/such/route").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    // Nothing reached the broker.
    let metrics = system.text(&url("/metrics")).await;
    assert!(!metrics.contains("commands_published_total{"), "{metrics}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert_eq!(rows, 0);
    system.stop().await;
}

async fn post_huge_body(api: &str, len: usize) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = api.trim_start_matches("http://");
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n",
        e2e::ORDERS_TOKEN
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b' '; 64 * 1024];
    for _ in 0..len / chunk.len() {
        if socket.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut answer = Vec::new();
    let _ = socket.read_to_end(&mut answer).await;
    let text = String::from_utf8_lossy(&answer);
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        status,
        serde_json::from_str(body.trim()).unwrap_or(Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_readiness_and_metrics_answer() {
    let system = System::start(Options::default()).await;
    let (status, body) = system.get("/healthz").await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, body) = system.get("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, json!({"broker": "ok", "database": "ok"}));
    system.price("SKU-X", e2e::PRICE).await;
    system.place("SKU-X", 1, "pm_card_visa").await;
    let metrics = system.text(&format!("{}/metrics", system.api)).await;
    assert!(
        metrics.contains("orderflow_publisher_commands_published_total{command=\"order.place\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "orderflow_publisher_http_requests_total{route=\"/orders\",status=\"202\"} 1"
        ),
        "{metrics}"
    );
    system.stop().await;
}

/// Every endpoint but the probes needs a known token, and one whose role
/// covers it: `401` with `WWW-Authenticate: Bearer` without, `403` with the
/// wrong role, and nothing published either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_token_a_wrong_token_or_a_wrong_role_is_refused_and_publishes_nothing() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-A", 5).await;
    system.price("SKU-I", e2e::PRICE).await;
    let order = system.place("SKU-A", 1, "pm_card_visa").await;
    system.wait_final(&order).await;
    let anonymous = topology::https::client();
    let forged = e2e::client_with_token("e2e-admin-0123456789abcdeX");
    let shop = e2e::client_with_token(e2e::ORDERS_TOKEN);
    let api = &system.api;
    let requests: Vec<(&str, String, Option<Value>)> = vec![
        ("POST", format!("{api}/orders"), Some(order_body())),
        ("GET", format!("{api}/orders/{order}"), None),
        ("POST", format!("{api}/orders/{order}/cancel"), None),
        ("GET", format!("{api}/inventory/SKU-A"), None),
        (
            "POST",
            format!("{api}/inventory/SKU-A/restock"),
            Some(json!({"quantity": 5})),
        ),
        ("GET", format!("{api}/metrics"), None),
    ];
    let send = |client: &reqwest::Client, method: &str, url: &str, body: &Option<Value>| {
        let request = match method {
            "POST" => client.post(url),
            _ => client.get(url),
        };
        let request = match body {
            Some(body) => request.json(body),
            None => request,
        };
        async move { request.send().await.unwrap() }
    };
    for (method, url, body) in &requests {
        for (who, client) in [("no token", &anonymous), ("a forged token", &forged)] {
            let response = send(client, method, url, body).await;
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {url} with {who}"
            );
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let error: Value = response.json().await.unwrap();
            assert!(error["error"].is_string(), "{error}");
        }
    }
    for (method, url, body) in &requests {
        let response = send(&shop, method, url, body).await;
        let admin_only = url.ends_with("/restock") || url.ends_with("/metrics");
        if admin_only {
            assert_eq!(response.status(), StatusCode::FORBIDDEN, "{method} {url}");
            let error: Value = response.json().await.unwrap();
            assert!(
                error["error"].as_str().unwrap().contains("admin"),
                "{error}"
            );
        } else {
            assert!(
                response.status().is_success(),
                "{method} {url}: {}",
                response.status()
            );
        }
    }
    // The probes stay open.
    for probe in ["healthz", "readyz"] {
        let response = anonymous
            .get(format!("{api}/{probe}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{probe}");
    }
    // A wrong scheme is no token.
    let response = anonymous
        .get(format!("{api}/orders/{order}"))
        .header("Authorization", format!("Basic {}", e2e::ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Of all those requests only the shop's order and cancellation went
    // out; the refused restock added nothing.
    system.wait_final(&order).await;
    let (_, stock) = system.get("/inventory/SKU-A").await;
    assert_eq!(
        stock["available"].as_i64().unwrap()
            + stock["reserved"].as_i64().unwrap()
            + stock["sold"].as_i64().unwrap(),
        5,
        "{stock}"
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders.orders")
        .fetch_one(&system.pool)
        .await
        .unwrap();
    assert!(orders <= 2, "{orders} orders: a refused request placed one");
    system.stop().await;
}

/// JWTs: a customer (`scope` `orders`) places, reads and cancels its own
/// orders and gets `404` for another's; an admin sees every order; a
/// token with a bad signature, `alg: none`, expired, for another audience
/// or issuer is `401`, one without a scope `403`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_token_sees_only_its_own_orders_and_forged_tokens_are_refused() {
    let system = System::start(Options::default()).await;
    system.stock("SKU-J", 10).await;
    let as_jwt = |sub: &str, scope: &str| {
        e2e::client_with_token(&e2e::jwt(sub, scope, e2e::JWT_SECRET, json!({})))
    };
    let ada = as_jwt("customer-ada", "orders");
    let eve = as_jwt("customer-eve", "orders");
    let back_office = as_jwt("ops-1", "admin");
    let api = &system.api;
    let body = json!({
        "customer_email": "ada@example.com",
        "currency": "EUR",
        "items": [{ "sku": "SKU-J", "quantity": 1 }],
    });
    let id = place_as(&ada, api, "shared-key-1", &body).await;
    system.wait_final(&id).await;
    let order = format!("{api}/orders/{id}");
    assert_eq!(
        ada.get(&order).send().await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        back_office.get(&order).send().await.unwrap().status(),
        StatusCode::OK
    );
    // Another customer: not found, whether reading or cancelling.
    assert_eq!(
        eve.get(&order).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let cancel = format!("{order}/cancel");
    assert_eq!(
        eve.post(&cancel).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    // The same key from another customer is another order.
    let theirs = place_as(&eve, api, "shared-key-1", &body).await;
    assert_ne!(theirs, id);
    // A customer is no admin.
    let restock = ada
        .post(format!("{api}/inventory/SKU-J/restock"))
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(restock.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        ada.post(&cancel).send().await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        system.wait_status(&id, "CANCELLED").await["reason"],
        "customer_cancelled"
    );

    // Forged, expired, for someone else, or in the clear.
    let now = chrono::Utc::now().timestamp();
    let forged = [
        (
            "another key",
            e2e::jwt(
                "customer-ada",
                "orders",
                "not-the-secret-0123456789abcdef0123",
                json!({}),
            ),
        ),
        (
            "expired",
            e2e::jwt(
                "customer-ada",
                "orders",
                e2e::JWT_SECRET,
                json!({"exp": now - 3600}),
            ),
        ),
        (
            "another audience",
            e2e::jwt(
                "customer-ada",
                "orders",
                e2e::JWT_SECRET,
                json!({"aud": "elsewhere"}),
            ),
        ),
        (
            "another issuer",
            e2e::jwt(
                "customer-ada",
                "orders",
                e2e::JWT_SECRET,
                json!({"iss": "https://evil.test"}),
            ),
        ),
        (
            "exp as text",
            e2e::jwt(
                "customer-ada",
                "orders",
                e2e::JWT_SECRET,
                json!({"exp": "9999999999"}),
            ),
        ),
        ("alg none", unsigned("customer-ada", "admin")),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, token) in forged {
        let response = e2e::client_with_token(&token)
            .get(&order)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(response.headers()["www-authenticate"], "Bearer", "{what}");
    }
    let no_scope = as_jwt("customer-ada", "profile");
    assert_eq!(
        no_scope.get(&order).send().await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    system.stop().await;
}

/// Places `body` with `key` as `client`'s caller; the order id of the 202.
async fn place_as(client: &reqwest::Client, api: &str, key: &str, body: &Value) -> String {
    let placed = client
        .post(format!("{api}/orders"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), StatusCode::ACCEPTED);
    placed.json::<Value>().await.unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A token that claims `alg: none`, unsigned.
fn unsigned(sub: &str, scope: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let exp = chrono::Utc::now().timestamp() + 3600;
    let claims = b64.encode(
        json!({"sub": sub, "scope": scope, "exp": exp, "iss": e2e::JWT_ISSUER, "aud": e2e::JWT_AUDIENCE})
            .to_string(),
    );
    format!("{header}.{claims}.")
}

/// 10,000 requests in a burst from one key: the bucket lets its burst and
/// its rate through and answers the rest `429` with `Retry-After`, at
/// once; another key is not held back by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_from_one_key_is_held_to_its_rate_and_other_keys_are_not() {
    use futures::StreamExt;
    let env = testkit::TestEnv::new().await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    pool.close().await;
    let publisher = LonePublisher::start_shedding(
        &env.amqp_url,
        &env.database_url,
        &[("RATE_LIMIT_PER_KEY", "100/s"), ("RATE_LIMIT_BURST", "50")],
    )
    .await;
    let url = format!("{}/inventory/SKU-RATE", publisher.api);
    let shop = e2e::client_with_token(e2e::ORDERS_TOKEN);
    let started = std::time::Instant::now();
    let answers: Vec<(u16, Option<u64>)> = futures::stream::iter(0..10_000)
        .map(|_| {
            let request = shop.get(&url);
            async move {
                let response = request.send().await.unwrap();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                (response.status().as_u16(), retry_after)
            }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let took = started.elapsed();
    let limited = answers.iter().filter(|(s, _)| *s == 429).count();
    let served = answers.len() - limited;
    // The burst, plus the rate over the time the burst took.
    let allowed = 50 + (100.0 * took.as_secs_f64()).ceil() as usize + 1;
    assert!(
        served <= allowed,
        "{served} served in {took:?}, at most {allowed} allowed"
    );
    assert!(served >= 50, "{served} served: not even the burst");
    assert!(
        answers
            .iter()
            .filter(|(s, _)| *s == 429)
            .all(|(_, retry)| retry.is_some_and(|r| r >= 1)),
        "a 429 without Retry-After"
    );
    // The others are the endpoint's own answer (the SKU is unknown).
    let other: Vec<_> = answers
        .iter()
        .filter(|(s, _)| *s != 429 && *s != 404)
        .collect();
    assert!(other.is_empty(), "{other:?}");
    let admin = e2e::client_with_token(e2e::ADMIN_TOKEN);
    let response = admin.get(&url).send().await.unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "another key was held back"
    );
    let response = shop.get(&url).send().await.unwrap();
    if response.status() == StatusCode::TOO_MANY_REQUESTS {
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("too many requests"),
            "{body}"
        );
    }
    publisher.stop().await;
    env.cleanup().await;
}

/// While the `order` queue holds more than `MAX_BACKLOG` messages (no
/// worker drains it here), new orders get `503` with `Retry-After` and are
/// not published; reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_order_backlog_new_orders_get_503_and_are_not_published() {
    let env = testkit::TestEnv::new().await;
    env.declare_topology("1s").await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO orders.products (sku, unit_price_cents, currency) VALUES ('SKU-I', $1, 'EUR')",
    )
    .bind(i64::try_from(e2e::PRICE).unwrap())
    .execute(&pool)
    .await
    .unwrap();
    let publisher =
        LonePublisher::start_shedding(&env.amqp_url, &env.database_url, &[("MAX_BACKLOG", "3")])
            .await;
    let shop = e2e::client_with_token(e2e::ORDERS_TOKEN);
    let orders = format!("{}/orders", publisher.api);
    for _ in 0..4 {
        let response = shop.post(&orders).json(&order_body()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    testkit::eventually(Duration::from_secs(30), "orders shed", || async {
        let response = shop.post(&orders).json(&order_body()).send().await.unwrap();
        if response.status() == StatusCode::ACCEPTED {
            return false;
        }
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "5");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("waiting"),
            "{body}"
        );
        true
    })
    .await;
    let published = env.depth("order").await;
    for _ in 0..5 {
        let response = shop.post(&orders).json(&order_body()).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
    assert_eq!(
        env.depth("order").await,
        published,
        "a shed order was published"
    );
    let response = shop
        .get(format!("{}/inventory/SKU-I", publisher.api))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "reads are not shed"
    );
    publisher.stop().await;
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_the_broker_unreachable_orders_get_503_and_never_202() {
    // Nothing listens on port 1.
    let publisher = LonePublisher::start(
        "amqp://guest:guest@127.0.0.1:1/%2f",
        "postgres://postgres@127.0.0.1:1/none",
    )
    .await;
    let api = publisher.api.clone();
    let http = e2e::client_with_token(e2e::ORDERS_TOKEN);

    let response = http
        .post(format!("{api}/orders"))
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("broker"), "{body}");
    let response = http.get(format!("{api}/readyz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.json::<Value>().await.unwrap(),
        json!({"broker": "unavailable", "database": "unavailable"})
    );
    let response = http.get(format!("{api}/healthz")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    publisher.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publishers_agree_a_small_frame_and_consumers_the_brokers() {
    let system = System::start(Options::default()).await;
    // A final order has been through every worker.
    system.price("SKU-F", e2e::PRICE).await;
    let order = system.place("SKU-F", 1, "pm_card_visa").await;
    system.wait_final(&order).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let seen = loop {
        let seen = system.env.frame_max_by_connection().await;
        // The HTTP publisher and the four workers' consumers (a worker's
        // publisher connects when it first has something to send).
        let consumers = seen
            .iter()
            .filter(|(n, _)| n.ends_with(" consumer"))
            .count();
        if consumers == 4 && seen.iter().any(|(n, _)| n == "publisher") {
            break seen;
        }
        assert!(std::time::Instant::now() < deadline, "{seen:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    for (name, frame_max) in &seen {
        // Publishers send only messages built in their process; consumers
        // receive, and republishers move on, what other clients may have
        // sent.
        let expected = if name.ends_with("publisher") && !name.ends_with("republisher") {
            u64::from(runtime::broker::FRAME_MAX)
        } else {
            131_072
        };
        assert_eq!(*frame_max, expected, "{name}: {seen:?}");
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_process_names_itself_to_the_database() {
    let system = System::start(Options::default()).await;
    // A final order has been through every worker, and `GET` has read it
    // through the publisher's pool.
    system.price("SKU-N", e2e::PRICE).await;
    let order = system.place("SKU-N", 1, "pm_card_visa").await;
    system.wait_final(&order).await;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT application_name FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid() ORDER BY 1",
    )
    .bind(&system.env.database)
    .fetch_all(&system.pool)
    .await
    .unwrap();
    for process in [
        "inventory-worker",
        "notification-worker",
        "order-worker",
        "payment-worker",
        "publisher",
    ] {
        assert!(names.iter().any(|n| n == process), "{process}: {names:?}");
    }
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_continues_the_trace_of_the_request_that_sent_it() {
    // The publisher alone: its commands stay in their queues to be read.
    let env = testkit::TestEnv::new().await;
    env.declare_topology("1s").await;
    let publisher = LonePublisher::start(&env.amqp_url, &env.database_url).await;
    let api = publisher.api.clone();
    let http = e2e::client_with_token(e2e::ORDERS_TOKEN);
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    for traceparent in [
        format!("00-{trace}-00f067aa0ba902b7-01"),
        // Not a traceparent: the command starts a trace of its own.
        "00-garbage-00f067aa0ba902b7-01".to_owned(),
    ] {
        let response = http
            .post(format!("{api}/orders"))
            .header("traceparent", traceparent)
            .json(&order_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
    }
    let placed = env.drain("order").await;
    assert_eq!(placed.len(), 2);
    let traceparents: Vec<String> = placed
        .iter()
        .map(|(p, _)| {
            let headers = p.headers().clone().unwrap_or_default();
            runtime::envelope::header_str(&headers, "traceparent").unwrap()
        })
        .collect();
    assert!(
        traceparents[0].starts_with(&format!("00-{trace}-")),
        "{traceparents:?}"
    );
    assert!(
        !traceparents[0].contains("00f067aa0ba902b7"),
        "the command is a span of its own: {traceparents:?}"
    );
    assert!(
        runtime::envelope::is_traceparent(&traceparents[1]) && !traceparents[1].contains(trace),
        "{traceparents:?}"
    );
    publisher.stop().await;
    env.cleanup().await;
}
