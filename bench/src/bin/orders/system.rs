//! The system under test, from the release binaries: the gateway
//! simulator, every worker (each serving its metrics) and the publisher.

use crate::stats::{outcomes, peak_rss_kib};
use crate::{Args, METRICS_PORTS, SKUS};
use bench::cpu_seconds;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The publisher's address.
pub const API: &str = "http://127.0.0.1:18080";
const GATEWAY_ADDR: &str = "127.0.0.1:18090";
const WORKERS: [&str; 4] = [
    "order-worker",
    "inventory-worker",
    "payment-worker",
    "notification-worker",
];

struct Proc {
    name: String,
    child: Child,
}

pub struct System {
    procs: Vec<Proc>,
    metrics_ports: Vec<u16>,
}

impl System {
    /// Starts every binary with `common` (plus `--env`) in its environment,
    /// logging to `.run/bench-<name>.log`.
    pub fn start(args: &Args, mut common: Vec<(&'static str, String)>) -> anyhow::Result<Self> {
        common.push(("PAYMENT_GATEWAY_URL", format!("http://{GATEWAY_ADDR}")));
        if let Some(pool) = args.pool {
            common.push(("DATABASE_POOL_SIZE", pool.to_string()));
        }
        let mut common: Vec<(&str, String)> = common;
        for (k, v) in &args.envs {
            common.retain(|(name, _)| name != k);
            common.push((k.as_str(), v.clone()));
        }
        let mut system = Self {
            procs: Vec::new(),
            metrics_ports: Vec::new(),
        };
        let with = |extra: (&'static str, String)| {
            let mut env = common.clone();
            env.push(extra);
            env
        };
        let bin = |name: &str| format!("{}/{name}", args.bin);
        let gateway_env = with(("HTTP_ADDR", GATEWAY_ADDR.to_owned()));
        system.spawn(
            "payment-gateway-sim",
            &bin("payment-gateway-sim"),
            &gateway_env,
        )?;
        // Each worker serves its metrics, so the run is measured with them
        // on and its counts are checked against the orders at the end.
        for r in 0..args.replicas {
            for (i, w) in WORKERS.into_iter().enumerate() {
                let port = METRICS_PORTS + u16::try_from(10 * r + i)?;
                let env = with(("METRICS_ADDR", format!("127.0.0.1:{port}")));
                system.spawn(&format!("{w}-{r}"), &bin(w), &env)?;
                system.metrics_ports.push(port);
            }
        }
        let publisher_env = with(("HTTP_ADDR", "127.0.0.1:18080".to_owned()));
        system.spawn("publisher", &bin("publisher"), &publisher_env)?;
        Ok(system)
    }

    fn spawn(&mut self, name: &str, bin: &str, env: &[(&str, String)]) -> anyhow::Result<()> {
        let log = std::fs::File::create(format!(".run/bench-{name}.log"))?;
        let child = Command::new(bin)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stderr(log)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
        });
        Ok(())
    }

    /// Each process's CPU seconds so far, in start order.
    pub fn cpu_seconds(&self) -> Vec<f64> {
        self.procs
            .iter()
            .map(|p| p.child.id().map(cpu_seconds).unwrap_or(0.0))
            .collect()
    }

    /// Each process's name and CPU seconds since `before`.
    pub fn cpu_since(&self, before: &[f64]) -> Vec<(String, f64)> {
        self.procs
            .iter()
            .zip(self.cpu_seconds().into_iter().zip(before))
            .map(|(p, (now, before))| (p.name.clone(), now - before))
            .collect()
    }

    /// Each process's peak resident memory (VmHWM), in KiB.
    pub fn peak_rss(&self) -> Vec<(String, Option<u64>)> {
        self.procs
            .iter()
            .map(|p| (p.name.clone(), p.child.id().and_then(peak_rss_kib)))
            .collect()
    }

    /// What the workers say they did with what they consumed, by outcome.
    pub async fn consumed(&self, http: &reqwest::Client) -> anyhow::Result<BTreeMap<String, u64>> {
        let mut consumed = BTreeMap::new();
        for port in &self.metrics_ports {
            let text = http
                .get(format!("http://127.0.0.1:{port}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            for (outcome, n) in outcomes(&text) {
                *consumed.entry(outcome).or_default() += n;
            }
        }
        Ok(consumed)
    }

    /// SIGTERM to each process, then up to 30 s for each to end.
    pub async fn stop(&mut self) {
        for p in &self.procs {
            if let Some(pid) = p.child.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for p in &mut self.procs {
            let _ = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await;
        }
    }
}

/// Waits (a minute at most) for the publisher to answer `/readyz`.
pub async fn ready(http: &reqwest::Client) -> anyhow::Result<()> {
    let ready = async {
        loop {
            if let Ok(r) = http.get(format!("{API}/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    Ok(tokio::time::timeout(Duration::from_secs(60), ready).await?)
}

/// Prices and stocks every SKU the orders use, and waits until both are there.
pub async fn stock(http: &reqwest::Client, pool: &sqlx::PgPool) -> anyhow::Result<()> {
    for s in 0..SKUS {
        http.put(format!("{API}/products/B-{s}"))
            .json(&json!({"unit_price_cents": 1000, "currency": "EUR"}))
            .send()
            .await?
            .error_for_status()?;
        http.post(format!("{API}/inventory/B-{s}/restock"))
            .json(&json!({"quantity": 1_000_000}))
            .send()
            .await?
            .error_for_status()?;
    }
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT (SELECT count(*) FROM inventory.stock) + (SELECT count(*) FROM orders.products)",
        )
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        if n == 2 * SKUS as i64 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// POSTs order `i` (one unit of one of the SKUs); its id and when the 202
/// came, or `None` if it was not accepted.
pub async fn place_order(http: &reqwest::Client, i: usize) -> Option<(String, Instant)> {
    let body = json!({"customer_email": "bench@example.com", "currency": "EUR",
        "items": [{"sku": format!("B-{}", i % SKUS), "quantity": 1, "unit_price_cents": 1000}]});
    let r = http
        .post(format!("{API}/orders"))
        .json(&body)
        .send()
        .await
        .ok()?;
    if r.status() != 202 {
        return None;
    }
    let v: Value = r.json().await.ok()?;
    Some((v["order_id"].as_str()?.to_owned(), Instant::now()))
}
