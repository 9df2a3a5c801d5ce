//! `orders`: the end-to-end benchmark. Starts the whole system from the
//! release binaries (publisher, every worker, the gateway simulator) with an
//! SMTP sink in this process that records when each email arrives, drives N
//! orders at concurrency C (after a warm-up it leaves out), and reports
//! accepted/s at the HTTP edge, end-to-end orders/s (first POST to last
//! email), POST-to-email latency,
//! peak RSS per process, final states, per-stage timings, and the machine's
//! ceiling (raw broker hop rate, raw PostgreSQL transaction rate).
//!
//! ./scripts/bench.sh --orders 1000 --concurrency 32 --replicas 1
//!
//! The run, phase by phase: `main.rs` (set up, start, warm up, drive,
//! collect, stop, report), `system.rs` (the processes), `smtp.rs` (the
//! sink), `drive.rs` (the orders), `report.rs` (what is read and printed),
//! `database.rs` and `stats.rs` (what they read with).

mod database;
mod drive;
mod report;
mod smtp;
mod stats;
mod system;

use clap::Parser;
use report::{Before, Ceiling, Report};
use std::time::Duration;
use system::System;

#[derive(Parser)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    pub orders: usize,
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Offer orders at this fixed rate (orders/s) instead of keeping
    /// `--concurrency` in flight: the latency at a given load.
    #[arg(long)]
    pub rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    pub replicas: usize,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    pub bin: String,
    /// DATABASE_POOL_SIZE of each worker (its default is 8).
    #[arg(long)]
    pub pool: Option<u32>,
    /// Extra environment for every process, e.g. `--env BATCH_SIZE=16`
    /// (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    pub envs: Vec<(String, String)>,
    /// Skip the ceiling measurements.
    #[arg(long)]
    pub no_ceiling: bool,
    /// Orders placed (8 at a time) and finished before the measured run
    /// and left out of its figures: the first orders after a start pay
    /// for cold connections, statements and caches, and the tables need
    /// some history for their statistics to describe them (the benchmark
    /// runs `VACUUM ANALYZE` after these). 0: none.
    #[arg(long, default_value_t = 3000)]
    pub warm_up: usize,
    /// The broker's AMQP address (`host:port`, guest/guest): another
    /// broker on this host, configured differently, for comparison.
    #[arg(long, default_value = bench::BROKER)]
    pub broker: String,
    /// That broker's management API.
    #[arg(long, default_value = bench::MANAGEMENT)]
    pub management: String,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

const VHOST: &str = "orderflow_bench";
const DB: &str = "orderflow_bench";
const PG: &str = "postgres://postgres@127.0.0.1:5432";
const RETRY_DELAYS: &str = "1s,5s,30s,2m,10m";
/// The SKUs the orders spread over.
pub const SKUS: usize = 20;
/// Worker `i` of replica `r` serves its metrics on this port plus `10 r + i`.
pub const METRICS_PORTS: u16 = 19101;

// One thread: the load generator shares the machine's cores with what it
// measures, and threads waking each other cost it a third more CPU
// (`docs/BENCHMARKS.md`, 2026-12-02).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(".run")?;
    let management = bench::management(&args.management);
    let amqp = bench::fresh_vhost(&management, &args.broker, VHOST).await?;
    let db_url = database::fresh(PG, DB).await?;
    let connection = lapin::Connection::connect(&amqp, Default::default()).await?;
    let declared = topology::Topology::contract(&RETRY_DELAYS.parse()?);
    topology::declare(&connection, &declared).await?;
    let pool = runtime::db::connect(&db_url, 4, "bench").await?;
    runtime::db::migrate(&pool).await?;
    let ceiling = Ceiling::measure(&args, &amqp, &db_url).await?;

    let (arrivals, smtp_port) = smtp::start().await?;
    // The publisher authenticates as in production: one admin key, made for the run.
    let token = uuid::Uuid::new_v4().simple().to_string();
    let mut system = System::start(
        &args,
        vec![
            ("API_KEYS", format!("bench:admin:{token}")),
            // The load is the point: the one key is not held to a rate.
            ("RATE_LIMIT_PER_KEY", "off".to_owned()),
            ("AMQP_URL", amqp.clone()),
            ("DATABASE_URL", db_url.clone()),
            ("RETRY_DELAYS", RETRY_DELAYS.to_owned()),
            ("RUST_LOG", "warn".to_owned()),
            ("SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}")),
        ],
    )?;
    let mut authorization = reqwest::header::HeaderMap::new();
    authorization.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {token}").parse()?,
    );
    let http = topology::https::client_builder()
        .pool_max_idle_per_host(args.concurrency)
        .default_headers(authorization)
        .build()?;
    system::ready(&http).await?;
    system::stock(&http, &pool).await?;
    drive::warm_up(&args, &http, &arrivals).await?;
    // Statistics and visibility as autovacuum keeps them on a database
    // that has run for a while: a fresh one has none, each worker
    // connection's prepared statements keep plans made on its first few
    // rows (sequential scans), and on a server without autovacuum nothing
    // replans them while the tables grow (`docs/BENCHMARKS.md`, 2026-12-02,
    // fourth session). Plans are made again after it, on the warm-up's rows.
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;

    let before = Before::take(&system, &pool).await?;
    let driven = drive::drive(&args, &http).await;
    // Wait for every email (10 minutes at most); what is missing then is
    // reported.
    smtp::emails_arrived(&arrivals, driven.accepted(), Duration::from_secs(600)).await;
    let mut report =
        Report::collect(&args, &pool, &system, &http, &before, &driven, &arrivals).await?;
    system.stop().await;
    // Read once the workers' backends have exited: a backend reports its
    // table statistics lazily, at the latest when it ends.
    report.seq_rows = database::seq_rows_read(&pool).await? - before.seq_rows;
    report.print(&args, &ceiling, &driven);
    pool.close().await;
    let _ = management.delete(&format!("vhosts/{VHOST}")).await;
    report.verdict()
}
