//! The whole system for tests: its own vhost and database, the publisher on
//! a free port, every worker (with as many replicas as asked), the payment
//! gateway simulator, and a real SMTP server process that records each mail.
#![allow(clippy::unwrap_used, clippy::missing_panics_doc)]

use payment_gateway_sim::{Gateway, Trouble};
use reqwest::StatusCode;
use serde_json::{Value, json};
use std::time::Duration;
use testkit::{Forwarder, SmtpSink, TestEnv, eventually};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const RETRY_DELAYS: &str = "200ms,500ms,1500ms";

pub struct Options {
    pub replicas: usize,
    pub trouble: Trouble,
    pub payment_timeout: Duration,
    pub gateway_timeout: Duration,
    /// The retry tiers of every queue (`RETRY_DELAYS`).
    pub retry_delays: &'static str,
    /// Addresses of the broker that every process is given in `AMQP_URL`,
    /// each a forwarder to the one broker: the nodes of a cluster as the
    /// system sees them, which a test can take down one by one.
    pub broker_nodes: usize,
    /// Every worker's circuit breakers.
    pub breaker: runtime::BreakerSettings,
    /// Serve the (first) payment worker's `/metrics` and `/readyz`, at
    /// [`System::payment_metrics`].
    pub payment_metrics: bool,
    /// Run every binary as its own least-privilege broker user
    /// (`topology::identities`) and database role (`runtime::db::roles`),
    /// as a deployment does, instead of `guest` and the database's owner.
    pub identities: bool,
    /// Every binary speaks TLS to the broker (`amqps://`, its listener's CA
    /// in the URL's `cacertfile`).
    pub tls: bool,
    /// How the publisher authenticates callers; [`test_keys`] when `None`.
    pub auth: Option<publisher::auth::AuthSettings>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            replicas: 1,
            trouble: Trouble::default(),
            payment_timeout: Duration::from_secs(30),
            gateway_timeout: Duration::from_secs(5),
            retry_delays: RETRY_DELAYS,
            broker_nodes: 1,
            // The default threshold, a short cooldown: an outage in a test
            // is seconds long.
            breaker: runtime::BreakerSettings {
                cooldown: Duration::from_secs(1),
                ..runtime::BreakerSettings::default()
            },
            payment_metrics: false,
            identities: false,
            tls: false,
            auth: None,
        }
    }
}

/// The statuses of an order's history, oldest first, as `GET /orders/{id}` shows them.
pub fn history(order: &Value) -> Vec<&str> {
    order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect()
}

/// The unit price, in EUR cents, of every SKU [`System::stock`] stocks.
pub const PRICE: u64 = 1999;

/// The publisher's keys in every system: an admin one, which
/// [`System::http`] sends, and one with the `orders` role.
pub const ADMIN_TOKEN: &str = "e2e-admin-0123456789abcdef";
pub const ORDERS_TOKEN: &str = "e2e-orders-0123456789abcdef";

/// What every system's publisher accepts: `API_KEYS` with [`ADMIN_TOKEN`]
/// and [`ORDERS_TOKEN`], and JWTs signed with [`JWT_SECRET`], issued by
/// [`JWT_ISSUER`] for [`JWT_AUDIENCE`] (see [`jwt`]).
pub fn test_keys() -> publisher::auth::AuthSettings {
    let keys = format!("e2e-admin:admin:{ADMIN_TOKEN},e2e-shop:orders:{ORDERS_TOKEN}");
    publisher::auth::AuthSettings::read(&runtime::config::Source::from_pairs([
        ("API_KEYS", keys.as_str()),
        ("JWT_HS256_SECRET", JWT_SECRET),
        ("JWT_ISSUER", JWT_ISSUER),
        ("JWT_AUDIENCE", JWT_AUDIENCE),
    ]))
    .unwrap()
}

pub const JWT_SECRET: &str = "e2e-jwt-secret-0123456789abcdef0123456789";
pub const JWT_ISSUER: &str = "https://id.orderflow.test";
pub const JWT_AUDIENCE: &str = "orderflow-api";

/// A JWT for `sub` with `scope`, valid for an hour, signed with `secret`
/// (the system's is [`JWT_SECRET`]) by [`JWT_ISSUER`] for [`JWT_AUDIENCE`];
/// `claims` are laid over those.
pub fn jwt(sub: &str, scope: &str, secret: &str, claims: Value) -> String {
    let now = chrono::Utc::now().timestamp();
    let mut body = json!({
        "sub": sub,
        "scope": scope,
        "iss": JWT_ISSUER,
        "aud": JWT_AUDIENCE,
        "iat": now,
        "exp": now + 3600,
    });
    if let (Some(body), Some(extra)) = (body.as_object_mut(), claims.as_object()) {
        for (k, v) in extra {
            body.insert(k.clone(), v.clone());
        }
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &body,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// An HTTP client that sends `Authorization: Bearer <token>` with every request.
pub fn client_with_token(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    topology::https::client_builder()
        .default_headers(headers)
        .build()
        .unwrap()
}

pub struct System {
    pub env: TestEnv,
    pub api: String,
    pub gateway: String,
    pub http: reqwest::Client,
    /// The first payment worker's `/metrics` and `/readyz`, with
    /// `Options::payment_metrics`.
    pub payment_metrics: Option<String>,
    /// The publisher's `METRICS_ADDR` (`/metrics` without a key).
    pub publisher_metrics: Option<String>,
    pub pool: sqlx::PgPool,
    smtp: SmtpSink,
    /// The broker users made for this system (`Options::identities`).
    users: Vec<String>,
    /// The database roles made for this system (`Options::identities`).
    database_roles: Vec<String>,
    nodes: Vec<Forwarder>,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl System {
    pub async fn start(options: Options) -> Self {
        runtime::telemetry::init().ok();
        let env = TestEnv::new().await;
        let retry: topology::RetryDelays = options.retry_delays.parse().unwrap();
        env.declare_topology(options.retry_delays).await;
        let pool = env.pool().await;
        runtime::db::migrate(&pool).await.unwrap();
        let mut nodes = Vec::new();
        let mut amqp_url = if options.tls {
            env.amqps_url()
        } else {
            env.amqp_url.clone()
        };
        if options.broker_nodes > 1 {
            assert!(
                !options.tls,
                "the forwarders that stand for nodes are plain TCP"
            );
            for _ in 0..options.broker_nodes {
                nodes.push(Forwarder::start(testkit::BROKER).await);
            }
            let list: Vec<String> = nodes
                .iter()
                .map(|n| format!("127.0.0.1:{}", n.port))
                .collect();
            amqp_url = env.amqp_url_with_nodes(&list);
        }

        // Each binary's URL: its own user, or `guest` for all.
        let mut users = Vec::new();
        if options.identities {
            let password = format!("pw-{}", env.vhost);
            for identity in topology::identities::identities() {
                identity
                    .apply(
                        &env.management,
                        &env.vhost,
                        &format!("{}-", env.vhost),
                        &password,
                    )
                    .await
                    .unwrap();
                users.push(format!("{}-{}", env.vhost, identity.binary));
            }
        }
        // Each binary's database URL: its own role, or the owner's for all.
        let mut database_roles = Vec::new();
        if options.identities {
            let prefix = format!("{}_", env.database);
            let mut admin = pool.acquire().await.unwrap();
            for role in runtime::db::roles::roles() {
                role.apply(&mut admin, &prefix, &format!("pw-{}", env.vhost))
                    .await
                    .unwrap();
                database_roles.push(role.name(&prefix));
            }
        }
        let database_url_of = |binary: &str| -> String {
            if !options.identities {
                return env.database_url.clone();
            }
            let role = runtime::db::roles::roles()
                .into_iter()
                .find(|r| r.binary == binary)
                .unwrap()
                .name(&format!("{}_", env.database));
            env.database_url
                .replacen("postgres@", &format!("{role}:pw-{}@", env.vhost), 1)
        };
        let url_of = |binary: &str| -> String {
            if !options.identities {
                return amqp_url.clone();
            }
            let user = format!("{}-{binary}", env.vhost);
            amqp_url.replacen("guest:guest@", &format!("{user}:pw-{}@", env.vhost), 1)
        };

        let mut stops = Vec::new();
        let mut tasks = Vec::new();
        let mut spawn = |fut: std::pin::Pin<
            Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>,
        >| {
            tasks.push(tokio::spawn(fut));
        };

        // Payment gateway simulator.
        let gateway_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = format!("http://{}", gateway_listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        let router = Gateway::new(options.trouble).router();
        spawn(Box::pin(async move {
            axum_serve(gateway_listener, router, stopped).await;
            Ok(())
        }));

        // SMTP server process.
        let smtp = SmtpSink::start(&env.database).await;

        // Publisher.
        let settings = publisher::PublisherSettings {
            http_addr: "127.0.0.1:0".into(),
            amqp_url: runtime::SecretUrl::new(url_of("publisher")),
            database_url: runtime::SecretUrl::new(database_url_of("publisher")),
            request_timeout: Duration::from_secs(10),
            max_body_bytes: 65536,
            database_pool_size: 4,
            shedding: publisher::shedding::SheddingSettings::read(&Default::default()).unwrap(),
            auth: options.auth.clone().unwrap_or_else(test_keys),
            metrics_addr: Some("127.0.0.1:0".into()),
        };
        let app = publisher::Application::build(settings).await.unwrap();
        let api = format!("http://127.0.0.1:{}", app.port());
        let publisher_metrics = app
            .metrics_port()
            .map(|port| format!("http://127.0.0.1:{port}"));
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        spawn(Box::pin(app.run(async move {
            let _ = stopped.await;
        })));

        let worker_settings = |domain: contract::Domain| runtime::WorkerSettings {
            amqp_url: runtime::SecretUrl::new(url_of(domain.worker())),
            database_url: runtime::SecretUrl::new(database_url_of(domain.worker())),
            retry_delays: retry.clone(),
            prefetch: 16,
            concurrency: 3,
            batch_size: 8,
            // The lifecycle runs through the lingering batcher; the runtime's
            // own tests cover handling on arrival.
            batch_linger: Duration::from_millis(5),
            database_pool_size: 4,
            outbox_sweep_after: Duration::from_millis(1000),
            inbox_retention: Duration::from_secs(30 * 86_400),
            metrics_addr: None,
            handler_timeout: Duration::from_secs(60),
            breaker: options.breaker,
        };
        let gateway_settings = payment_worker::GatewaySettings {
            url: gateway.clone(),
            timeout: options.gateway_timeout,
            max_in_flight: 8,
            ca_file: None,
        };
        let mail = notification_worker::MailSettings {
            smtp_url: runtime::SecretUrl::new(smtp.url()),
            from: "orderflow <orders@orderflow.local>".parse().unwrap(),
        };
        let payment_metrics = options
            .payment_metrics
            .then(|| format!("127.0.0.1:{}", testkit::free_port()));
        for replica in 0..options.replicas {
            let order = order_worker::build(
                worker_settings(contract::Domain::Order),
                options.payment_timeout,
            )
            .await
            .unwrap();
            let inventory = inventory_worker::build(worker_settings(contract::Domain::Inventory))
                .await
                .unwrap();
            let mut payment_settings = worker_settings(contract::Domain::Payment);
            if replica == 0 {
                payment_settings.metrics_addr =
                    payment_metrics.as_ref().map(|a| a.parse().unwrap());
            }
            let payment = payment_worker::build(payment_settings, &gateway_settings)
                .await
                .unwrap();
            let notification = notification_worker::build(
                worker_settings(contract::Domain::Notification),
                mail.clone(),
            )
            .await
            .unwrap();
            spawn(until_stopped(&mut stops, order));
            spawn(until_stopped(&mut stops, inventory));
            spawn(until_stopped(&mut stops, payment));
            spawn(until_stopped(&mut stops, notification));
        }

        Self {
            env,
            api,
            gateway,
            http: client_with_token(ADMIN_TOKEN),
            payment_metrics: payment_metrics.map(|a| format!("http://{a}")),
            publisher_metrics,
            users,
            database_roles,
            pool,
            smtp,
            nodes,
            stops,
            tasks,
        }
    }

    /// Starts the SMTP server process (again), on the same port.
    pub async fn start_smtp(&mut self) {
        self.smtp.restart().await;
    }

    /// Stops the SMTP server process, as an outage would.
    pub async fn stop_smtp(&mut self) {
        self.smtp.stop().await;
    }

    /// Waits (a minute at most) until `count` mails about the order arrived; returns them.
    pub async fn wait_mails(&self, order_id: &str, count: usize) -> Vec<Value> {
        eventually(Duration::from_secs(60), "the order's emails", || async {
            self.mails_about(order_id).len() == count
        })
        .await;
        self.mails_about(order_id)
    }

    /// Every mail the SMTP server accepted.
    pub fn mails(&self) -> Vec<Value> {
        self.smtp.mails()
    }

    pub fn mails_about(&self, order_id: &str) -> Vec<Value> {
        self.mails()
            .into_iter()
            .filter(|m| m["subject"].as_str().is_some_and(|s| s.contains(order_id)))
            .collect()
    }

    pub async fn post(&self, path: &str, body: &Value, key: Option<&str>) -> (StatusCode, Value) {
        let mut request = self.http.post(format!("{}{path}", self.api)).json(body);
        if let Some(key) = key {
            request = request.header("Idempotency-Key", key);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .unwrap();
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub async fn restock(&self, sku: &str, quantity: u32) {
        let (status, body) = self
            .post(
                &format!("/inventory/{sku}/restock"),
                &json!({ "quantity": quantity }),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }

    /// Prices a SKU at [`PRICE`] EUR (what [`System::place`] expects),
    /// restocks it and waits until both are there.
    pub async fn stock(&self, sku: &str, quantity: u32) {
        self.price(sku, PRICE).await;
        self.restock(sku, quantity).await;
        self.wait_stock(sku, i64::from(quantity)).await;
    }

    /// Sets a SKU's catalog price in EUR and waits until the catalog has it.
    pub async fn price(&self, sku: &str, unit_price_cents: u64) {
        let response = self
            .http
            .put(format!("{}/products/{sku}", self.api))
            .json(&json!({ "unit_price_cents": unit_price_cents, "currency": "EUR" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        eventually(Duration::from_secs(30), "the price is set", || async {
            let (status, body) = self.get(&format!("/products/{sku}")).await;
            status == StatusCode::OK && body["unit_price_cents"] == unit_price_cents
        })
        .await;
    }

    /// Waits until the SKU shows `available` units.
    pub async fn wait_stock(&self, sku: &str, available: i64) {
        eventually(Duration::from_secs(30), "stock arrives", || async {
            let (status, body) = self.get(&format!("/inventory/{sku}")).await;
            status == StatusCode::OK && body["available"] == available
        })
        .await;
    }

    /// Waits until the SKU's stock is exactly `available`, `reserved`,
    /// `sold`: confirming an order commits its reservation asynchronously.
    pub async fn wait_stock_exactly(&self, sku: &str, available: i64, reserved: i64, sold: i64) {
        let mut last = Value::Null;
        for _ in 0..600 {
            let (_, body) = self.get(&format!("/inventory/{sku}")).await;
            if body["available"] == available
                && body["reserved"] == reserved
                && body["sold"] == sold
            {
                return;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("stock of {sku} never became {available}/{reserved}/{sold}: {last}");
    }

    /// Places an order and returns its id.
    pub async fn place(&self, sku: &str, quantity: u32, payment_method: &str) -> String {
        let body = json!({
            "customer_email": "ada@example.com",
            "currency": "EUR",
            "items": [{ "sku": sku, "quantity": quantity, "unit_price_cents": PRICE }],
            "payment_method": payment_method,
        });
        let (status, body) = self.post("/orders", &body, None).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["order_id"].as_str().unwrap().to_owned()
    }

    /// Waits until the order is CONFIRMED or CANCELLED and returns it.
    pub async fn wait_final(&self, order_id: &str) -> Value {
        self.wait_order(order_id, "final", |s| s == "CONFIRMED" || s == "CANCELLED")
            .await
    }

    /// The text a GET of `url` answers (metrics pages), with the admin key.
    pub async fn text(&self, url: &str) -> String {
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Asks to cancel the order (`202`) and waits until it is cancelled.
    pub async fn cancel(&self, order_id: &str) -> Value {
        let (status, body) = self
            .post(&format!("/orders/{order_id}/cancel"), &json!({}), None)
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        self.wait_status(order_id, "CANCELLED").await
    }

    /// Waits until the order reaches `status`.
    pub async fn wait_status(&self, order_id: &str, status: &str) -> Value {
        self.wait_order(order_id, status, |s| s == status).await
    }

    /// Polls `GET /orders/{id}` (a minute at most) until its status passes `wanted`.
    async fn wait_order(&self, order_id: &str, what: &str, wanted: impl Fn(&str) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..1200 {
            let (code, body) = self.get(&format!("/orders/{order_id}")).await;
            if code == StatusCode::OK && body["status"].as_str().is_some_and(&wanted) {
                return body;
            }
            last = body;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("order {order_id} never became {what}: {last}");
    }

    /// The gateway's charges of an order.
    pub async fn charges(&self, order_id: &str) -> Vec<Value> {
        self.gateway_charges(&[("order_id", order_id)]).await
    }

    /// The gateway's charges, filtered by `query`.
    async fn gateway_charges(&self, query: &[(&str, &str)]) -> Vec<Value> {
        let body: Value = self
            .http
            .get(format!("{}/charges", self.gateway))
            .query(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["data"].as_array().cloned().unwrap_or_default()
    }

    /// Changes the gateway's injected trouble.
    pub async fn set_trouble(&self, trouble: Trouble) {
        let status = self
            .http
            .post(format!("{}/_sim/config", self.gateway))
            .json(&trouble)
            .send()
            .await
            .unwrap()
            .status();
        assert!(status.is_success());
    }

    /// Takes down the broker node (of `Options::broker_nodes`) that has
    /// carried the most connections, closing each of them.
    pub fn take_down_busiest_node(&mut self) {
        let busiest = (0..self.nodes.len())
            .max_by_key(|&i| self.nodes[i].carried())
            .expect("the system was started with broker_nodes > 1");
        assert!(
            self.nodes[busiest].carried() > 0,
            "no node carries a connection"
        );
        self.nodes.swap_remove(busiest).cut();
    }

    /// Connections made through the nodes still up.
    pub fn connections_through_nodes_up(&self) -> usize {
        self.nodes.iter().map(Forwarder::carried).sum()
    }

    /// Charges that stand: succeeded and not refunded.
    pub async fn standing_charges(&self, order_id: &str) -> usize {
        self.charges(order_id)
            .await
            .iter()
            .filter(|c| c["status"] == "succeeded" && c["refunded"] == false)
            .count()
    }

    /// Asserts the system-wide invariants: no stock reserved by a cancelled
    /// order, no negative stock, no charge standing on a cancelled order and
    /// exactly one on each confirmed one, empty dead queues.
    /// A system whose payment gateway is down, run without circuit breakers
    /// (as an operator may run the workers), with one order whose charge
    /// spent every retry tier on the outage and died in `payment.dead`;
    /// its payment deadline is far. Returns the order's id.
    pub async fn with_a_dead_charge() -> (Self, String) {
        let system = Self::start(Options {
            trouble: Trouble {
                error_rate: 1.0,
                latency_ms: 0,
                ..Trouble::default()
            },
            payment_timeout: Duration::from_secs(300),
            breaker: runtime::BreakerSettings {
                threshold: 0,
                ..runtime::BreakerSettings::default()
            },
            ..Options::default()
        })
        .await;
        system.stock("SKU-P", 5).await;
        let id = system.place("SKU-P", 1, "pm_card_visa").await;
        testkit::eventually(Duration::from_secs(60), "the charge is dead", || async {
            system.env.depth("payment.dead").await == 1
        })
        .await;
        (system, id)
    }

    /// The system's connections to the broker, as the management API shows them.
    pub async fn broker_connections(&self) -> Vec<Value> {
        let path = format!(
            "vhosts/{}/connections",
            topology::management::encode_vhost(&self.env.vhost)
        );
        let all = self.env.management.get(&path).await.unwrap();
        all.as_array().unwrap().clone()
    }

    pub async fn assert_quiet_and_consistent(&self) {
        // Refunds may still be on their way: the money settles within a while.
        eventually(Duration::from_secs(30), "charges settled", || async {
            self.charges_settled().await.is_ok()
        })
        .await;
        if let Err(wrong) = self.charges_settled().await {
            panic!("{wrong}");
        }
        let negative: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inventory.stock WHERE available < 0 OR reserved < 0 OR sold < 0",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(negative, 0, "negative stock");
        let held_by_cancelled: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM inventory.reservations r JOIN orders.orders o ON o.id = r.order_id WHERE o.status = 'CANCELLED'",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap();
        assert_eq!(held_by_cancelled, 0, "a cancelled order still holds stock");
        for domain in contract::Domain::ALL {
            assert_eq!(
                self.env.depth(&domain.dead_queue()).await,
                0,
                "{} is not empty",
                domain.dead_queue()
            );
        }
    }

    /// `Err` naming the first order whose money is wrong: a charge standing
    /// on a cancelled order, or a confirmed order without exactly one.
    async fn charges_settled(&self) -> Result<(), String> {
        let orders: Vec<(String, String)> =
            sqlx::query_as("SELECT id::text, status FROM orders.orders")
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let mut standing: std::collections::HashMap<String, usize> = Default::default();
        for charge in self.gateway_charges(&[]).await {
            if charge["status"] == "succeeded" && charge["refunded"] == false {
                let order = charge["order_id"].as_str().unwrap_or_default().to_owned();
                *standing.entry(order).or_default() += 1;
            }
        }
        for (id, status) in orders {
            let n = standing.get(&id).copied().unwrap_or(0);
            match status.as_str() {
                "CANCELLED" if n != 0 => {
                    return Err(format!("{n} charge(s) stand on cancelled order {id}"));
                }
                "CONFIRMED" if n != 1 => {
                    return Err(format!("{n} charge(s) stand on confirmed order {id}"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    pub async fn stop(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        for task in self.tasks.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.smtp.remove().await;
        self.pool.close().await;
        for user in &self.users {
            let user = topology::management::encode_vhost(user);
            let _ = self.env.management.delete(&format!("users/{user}")).await;
        }
        self.env.cleanup().await;
        testkit::drop_database_roles(&self.database_roles).await;
    }
}

type Running = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// A worker's run, stopped when its sender in `stops` fires.
fn until_stopped<H: runtime::Handler>(
    stops: &mut Vec<oneshot::Sender<()>>,
    worker: runtime::Worker<H>,
) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    stops.push(stop);
    Box::pin(worker.run(async move {
        let _ = stopped.await;
    }))
}

async fn axum_serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    stopped: oneshot::Receiver<()>,
) {
    let _ = axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = stopped.await;
        })
        .await;
}
