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

use bench::{cpu_of_all, cpu_seconds, hop};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    orders: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Offer orders at this fixed rate (orders/s) instead of keeping
    /// `--concurrency` in flight: the latency at a given load.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin: String,
    /// DATABASE_POOL_SIZE of each worker (its default is 8).
    #[arg(long)]
    pool: Option<u32>,
    /// Extra environment for every process, e.g. `--env BATCH_SIZE=16`
    /// (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    envs: Vec<(String, String)>,
    /// Skip the ceiling measurements.
    #[arg(long)]
    no_ceiling: bool,
    /// Orders placed (8 at a time) and finished before the measured run
    /// and left out of its figures: the first orders after a start pay
    /// for cold connections, statements and caches, and the tables need
    /// some history for their statistics to describe them (the benchmark
    /// runs `VACUUM ANALYZE` after these). 0: none.
    #[arg(long, default_value_t = 3000)]
    warm_up: usize,
    /// The broker's AMQP address (`host:port`, guest/guest): another
    /// broker on this host, configured differently, for comparison.
    #[arg(long, default_value = bench::BROKER)]
    broker: String,
    /// That broker's management API.
    #[arg(long, default_value = bench::MANAGEMENT)]
    management: String,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

const VHOST: &str = "orderflow_bench";
const DB: &str = "orderflow_bench";
const PG: &str = "postgres://postgres@127.0.0.1:5432";
const SKUS: usize = 20;
/// Worker `i` of replica `r` serves its metrics on this port plus `10 r + i`.
const METRICS_PORTS: u16 = 19101;

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A minimal SMTP server: accepts every message and records, per order id
/// in the subject, when it arrived.
async fn smtp_sink(listener: tokio::net::TcpListener, arrivals: Arrivals) {
    loop {
        let Ok((socket, _)) = listener.accept().await else {
            return;
        };
        let arrivals = arrivals.clone();
        tokio::spawn(async move {
            let (read, mut write) = socket.into_split();
            let mut reader = BufReader::new(read);
            let _ = write.write_all(b"220 bench ESMTP\r\n").await;
            let mut in_data = false;
            let mut subject = String::new();
            // Replies to a pipelined group go out in one write, once the
            // group has been read.
            let mut replies: Vec<u8> = Vec::new();
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let line = line.trim_end_matches(['\r', '\n']);
                if in_data {
                    if line == "." {
                        in_data = false;
                        if let Some(id) = subject.split_whitespace().nth(1)
                            && let Ok(mut a) = arrivals.lock()
                        {
                            a.entry(id.to_owned()).or_insert_with(Instant::now);
                        }
                        subject.clear();
                        replies.extend_from_slice(b"250 OK\r\n");
                    } else if let Some(s) = line.strip_prefix("Subject: ") {
                        subject = s.to_owned();
                    }
                } else {
                    let verb = line
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250-bench\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                        "DATA" => {
                            in_data = true;
                            b"354 go ahead\r\n"
                        }
                        "QUIT" => {
                            // After the replies of the group it closes.
                            replies.extend_from_slice(b"221 bye\r\n");
                            let _ = write.write_all(&replies).await;
                            return;
                        }
                        _ => b"250 OK\r\n",
                    };
                    replies.extend_from_slice(reply);
                }
                if !replies.is_empty() && reader.buffer().is_empty() {
                    if write.write_all(&replies).await.is_err() {
                        return;
                    }
                    replies.clear();
                }
            }
        });
    }
}

/// POSTs order `i` (one unit of one of the SKUs); its id and when the 202
/// came, or `None` if it was not accepted.
async fn place_order(http: &reqwest::Client, api: &str, i: usize) -> Option<(String, Instant)> {
    let body = json!({"customer_email": "bench@example.com", "currency": "EUR",
        "items": [{"sku": format!("B-{}", i % SKUS), "quantity": 1, "unit_price_cents": 1000}]});
    let r = http
        .post(format!("{api}/orders"))
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

/// Waits until the sink has `n` emails or `within` has passed; whether
/// they all came.
async fn emails_arrived(arrivals: &Arrivals, n: usize, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if arrivals.lock().map(|a| a.len()).unwrap_or(0) >= n {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The stages of an order between its POST and its email, each named with
/// the hops and handlers it spans, and the status that ends it.
const STAGES: [(&str, &str); 4] = [
    ("POST → PENDING (publisher, order.place, saga)", "PENDING"),
    (
        "PENDING → STOCK_RESERVED (inventory.reserve, inventory, inventory.reserved, saga)",
        "STOCK_RESERVED",
    ),
    (
        "STOCK_RESERVED → PAID (payment.charge, gateway, payment, payment.charged, saga)",
        "PAID",
    ),
    ("PAID → CONFIRMED (the same transaction)", "CONFIRMED"),
];

/// Milliseconds each order spent in each stage, from the wall-clock times
/// (seconds) of its events and of its POST and email (`ends`), for the
/// orders that went the whole way; the last stage is CONFIRMED → email.
fn stage_times(
    events: &[(String, String, f64)],
    ends: &HashMap<String, (f64, f64)>,
) -> Vec<(String, Vec<f64>)> {
    let mut at: HashMap<&str, HashMap<&str, f64>> = HashMap::new();
    for (order, status, t) in events {
        at.entry(order.as_str())
            .or_default()
            .insert(status.as_str(), *t);
    }
    let mut times: Vec<(String, Vec<f64>)> = STAGES
        .iter()
        .map(|(name, _)| ((*name).to_owned(), Vec::new()))
        .chain([(
            "CONFIRMED → email (order.confirmed, notification, SMTP)".to_owned(),
            Vec::new(),
        )])
        .collect();
    for (order, (posted, emailed)) in ends {
        let Some(statuses) = at.get(order.as_str()) else {
            continue;
        };
        let mut path = vec![*posted];
        for (_, status) in STAGES {
            match statuses.get(status) {
                Some(t) => path.push(*t),
                None => break,
            }
        }
        if path.len() != STAGES.len() + 1 {
            continue;
        }
        path.push(*emailed);
        for (i, pair) in path.windows(2).enumerate() {
            times[i].1.push((pair[1] - pair[0]) * 1e3);
        }
    }
    times
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The orders POSTed in one second of the measured run, and their
/// POST→email latency.
#[derive(Debug, PartialEq, Eq)]
struct SecondOfRun {
    /// Seconds since the first measured POST.
    second: u64,
    orders: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

/// The measured orders grouped by the second of the run they were POSTed
/// in: how many, and their POST→email p50, p99 and maximum. Slow orders
/// spread over every second are a busy machine; slow orders bunched in a
/// few seconds are a stall (a checkpoint, a periodic job, a pause).
fn latency_by_second(ends: &[(Duration, Duration)]) -> Vec<SecondOfRun> {
    let mut seconds: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for (posted, latency) in ends {
        seconds.entry(posted.as_secs()).or_default().push(*latency);
    }
    seconds
        .into_iter()
        .map(|(second, mut latencies)| {
            latencies.sort();
            let max = latencies.last().copied().unwrap_or_default();
            SecondOfRun {
                second,
                orders: latencies.len(),
                p50: percentile(&latencies, 0.5),
                p99: percentile(&latencies, 0.99),
                max,
            }
        })
        .collect()
}

/// Work PostgreSQL has done so far, cluster-wide (the benchmark runs
/// alone): transaction ids assigned (one per transaction that writes, and
/// per savepoint that writes inside one) and WAL written. Both are exact at
/// once, unlike the statistics views, which backends update lazily.
#[derive(Clone, Copy)]
struct DbWork {
    xids: i64,
    wal_bytes: i64,
}

impl std::ops::Sub for DbWork {
    type Output = DbWork;
    fn sub(self, before: DbWork) -> DbWork {
        DbWork {
            xids: self.xids - before.xids,
            wal_bytes: self.wal_bytes - before.wal_bytes,
        }
    }
}

async fn db_work(pool: &sqlx::PgPool) -> anyhow::Result<DbWork> {
    let (xids, wal_bytes): (i64, i64) = sqlx::query_as(
        "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::int8, \
         pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8",
    )
    .fetch_one(pool)
    .await?;
    Ok(DbWork { xids, wal_bytes })
}

/// Rows read by sequential scans of the benchmark database's tables so
/// far, as the statistics views have them: a plan that scans a growing
/// table shows here as rows per order that grow with the run.
async fn seq_rows_read(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(sum(seq_tup_read), 0)::int8 FROM pg_stat_user_tables")
            .fetch_one(pool)
            .await?,
    )
}

/// Each backend of the benchmark's database by pid: the process it serves
/// (each names itself as its `application_name`) and the CPU seconds it
/// has used so far.
async fn db_backends_cpu(pool: &sqlx::PgPool) -> anyhow::Result<HashMap<u32, (String, f64)>> {
    let backends: Vec<(i32, String)> = sqlx::query_as(
        "SELECT pid, application_name FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_all(pool)
    .await?;
    Ok(backends
        .into_iter()
        .filter_map(|(pid, client)| {
            let pid = u32::try_from(pid).ok()?;
            Some((pid, (client, cpu_seconds(pid))))
        })
        .collect())
}

/// Small write transactions (one insert, commit), 8 at a time, connected
/// as the workers connect.
async fn db_tx_rate(url: &str, n: usize) -> anyhow::Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect_with(runtime::db::connect_options(url, "bench")?)
        .await?;
    sqlx::raw_sql(
        "CREATE TABLE IF NOT EXISTS bench_writes (id bigserial PRIMARY KEY, v text NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..n / 8 {
                let mut tx = pool.begin().await?;
                sqlx::query("INSERT INTO bench_writes (v) VALUES ('x')")
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Ok::<_, sqlx::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let rate = (n / 8 * 8) as f64 / started.elapsed().as_secs_f64();
    sqlx::raw_sql("DROP TABLE bench_writes")
        .execute(&pool)
        .await?;
    Ok(rate)
}

struct Proc {
    name: String,
    child: Child,
}

fn spawn(
    procs: &mut Vec<Proc>,
    name: &str,
    bin: &str,
    env: &[(&str, String)],
) -> anyhow::Result<()> {
    let log = std::fs::File::create(format!(".run/bench-{name}.log"))?;
    let child = Command::new(bin)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stderr(log)
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    procs.push(Proc {
        name: name.to_owned(),
        child,
    });
    Ok(())
}

// One thread: the load generator shares the machine's cores with what it
// measures, and threads waking each other cost it a third more CPU
// (`docs/BENCHMARKS.md`, 2026-12-02).
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(".run")?;
    let api_mgmt = bench::management(&args.management);
    let amqp = bench::fresh_vhost(&api_mgmt, &args.broker, VHOST).await?;
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{PG}/postgres"))
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {DB} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DB}")))
        .execute(&admin)
        .await?;
    let db_url = format!("{PG}/{DB}");
    let retry = "1s,5s,30s,2m,10m";
    let conn = lapin::Connection::connect(&amqp, Default::default()).await?;
    topology::declare(&conn, &topology::Topology::contract(&retry.parse()?)).await?;
    let pool = runtime::db::connect(&db_url, 4, "bench").await?;
    runtime::db::migrate(&pool).await?;

    // Acks one by one (the model's hop), and one ack per 32 deliveries, to
    // show what batched acks would save the broker.
    let (hop, hop_batched_acks, db_rate) = if args.no_ceiling {
        let nothing = hop::Hop {
            rate: f64::NAN,
            broker_us: f64::NAN,
            client_us: f64::NAN,
        };
        (nothing, nothing, f64::NAN)
    } else {
        (
            hop::with_lapin(&amqp, 20_000, 1, hop::LapinPublishes::Together, None).await?,
            hop::with_lapin(&amqp, 20_000, 32, hop::LapinPublishes::Together, None).await?,
            db_tx_rate(&db_url, 20_000).await?,
        )
    };
    let hop_rate = hop.rate;

    let arrivals: Arrivals = Arc::default();
    let smtp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let smtp_port = smtp.local_addr()?.port();
    tokio::spawn(smtp_sink(smtp, arrivals.clone()));

    let common = vec![
        ("AMQP_URL", amqp.clone()),
        ("DATABASE_URL", db_url.clone()),
        ("RETRY_DELAYS", retry.to_owned()),
        ("RUST_LOG", "warn".to_owned()),
        ("SMTP_URL", format!("smtp://127.0.0.1:{smtp_port}")),
        ("PAYMENT_GATEWAY_URL", "http://127.0.0.1:18090".to_owned()),
    ];
    let mut common = common;
    if let Some(pool) = args.pool {
        common.push(("DATABASE_POOL_SIZE", pool.to_string()));
    }
    for (k, v) in &args.envs {
        common.retain(|(name, _)| name != k);
        common.push((k.as_str(), v.clone()));
    }
    let mut procs = Vec::new();
    let mut env = common.clone();
    env.push(("HTTP_ADDR", "127.0.0.1:18090".to_owned()));
    spawn(
        &mut procs,
        "payment-gateway-sim",
        &format!("{}/payment-gateway-sim", args.bin),
        &env,
    )?;
    // Each worker serves its metrics, so the run is measured with them on
    // and its counts are checked against the orders at the end.
    let mut metrics_ports = Vec::new();
    for r in 0..args.replicas {
        for (i, w) in [
            "order-worker",
            "inventory-worker",
            "payment-worker",
            "notification-worker",
        ]
        .into_iter()
        .enumerate()
        {
            let port = METRICS_PORTS + u16::try_from(10 * r + i)?;
            let mut env = common.clone();
            env.push(("METRICS_ADDR", format!("127.0.0.1:{port}")));
            spawn(
                &mut procs,
                &format!("{w}-{r}"),
                &format!("{}/{w}", args.bin),
                &env,
            )?;
            metrics_ports.push(port);
        }
    }
    let mut env = common.clone();
    env.push(("HTTP_ADDR", "127.0.0.1:18080".to_owned()));
    spawn(
        &mut procs,
        "publisher",
        &format!("{}/publisher", args.bin),
        &env,
    )?;
    let api = "http://127.0.0.1:18080";
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let ready = async {
        loop {
            if let Ok(r) = http.get(format!("{api}/readyz")).send().await
                && r.status().is_success()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(60), ready).await?;
    for s in 0..SKUS {
        http.post(format!("{api}/inventory/B-{s}/restock"))
            .json(&json!({"quantity": 1_000_000}))
            .send()
            .await?;
    }
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM inventory.stock")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        if n == SKUS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Warm up, then forget the warm-up's emails.
    if args.warm_up > 0 {
        let warm = futures::stream::iter(0..args.warm_up)
            .map(|i| place_order(&http, api, i))
            .buffer_unordered(8)
            .filter(|placed| std::future::ready(placed.is_some()))
            .count()
            .await;
        if warm != args.warm_up {
            anyhow::bail!("{warm} of {} warm-up orders accepted", args.warm_up);
        }
        if !emails_arrived(&arrivals, warm, Duration::from_secs(120)).await {
            anyhow::bail!("the warm-up orders' emails did not all arrive within 2 minutes");
        }
        arrivals
            .lock()
            .map_err(|_| anyhow::anyhow!("lock"))?
            .clear();
    }
    // Statistics and visibility as autovacuum keeps them on a database
    // that has run for a while: a fresh one has none, each worker
    // connection's prepared statements keep plans made on its first few
    // rows (sequential scans), and on a server without autovacuum nothing
    // replans them while the tables grow (`docs/BENCHMARKS.md`, 2026-12-02,
    // fourth session). Plans are made again after it, on the warm-up's rows.
    sqlx::raw_sql("VACUUM ANALYZE").execute(&pool).await?;
    let seq_rows_before = seq_rows_read(&pool).await?;

    // Drive.
    let cpu_before: Vec<f64> = procs
        .iter()
        .map(|p| p.child.id().map(cpu_seconds).unwrap_or(0.0))
        .collect();
    let (broker_before, db_before, bench_before) = (
        cpu_of_all("beam.smp"),
        cpu_of_all("postgres"),
        cpu_seconds(std::process::id()),
    );
    let db_work_before = db_work(&pool).await?;
    let db_cpu_before = db_backends_cpu(&pool).await?;
    let posted: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let rate = args.rate.filter(|r| *r > 0.0);
    // At a fixed rate every order is in flight from its start time on.
    let in_flight = if rate.is_some() {
        args.orders.max(1)
    } else {
        args.concurrency
    };
    let started = Instant::now();
    // The same moment on the wall clock, which `order_events` uses.
    let started_wall = std::time::SystemTime::now();
    let results = futures::stream::iter(0..args.orders)
        .map(|i| {
            let http = http.clone();
            let posted = posted.clone();
            async move {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(
                        (started + Duration::from_secs_f64(i as f64 / rate)).into(),
                    )
                    .await;
                }
                let t = Instant::now();
                let (id, accepted_at) = place_order(&http, api, i).await?;
                posted.lock().ok()?.insert(id, t);
                Some(accepted_at)
            }
        })
        .buffer_unordered(in_flight)
        .collect::<Vec<_>>()
        .await;
    let accepted = results.iter().flatten().count();
    let accept_secs = results
        .iter()
        .flatten()
        .max()
        .map(|t| (*t - started).as_secs_f64())
        .unwrap_or(f64::NAN);

    // Wait for every email (10 minutes at most); what is missing then is
    // reported below.
    emails_arrived(&arrivals, accepted, Duration::from_secs(600)).await;
    let db_work = db_work(&pool).await? - db_work_before;
    // Each measured order's POST and email, for those whose email came.
    let (ends, last_email) = {
        let a = arrivals.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        let p = posted.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        let ends: HashMap<String, (Instant, Instant)> = p
            .iter()
            .filter_map(|(id, t)| a.get(id).map(|e| (id.clone(), (*t, *e))))
            .collect();
        (ends, a.values().max().copied())
    };
    let mut latencies: Vec<Duration> = ends.values().map(|(p, e)| *e - *p).collect();
    latencies.sort();
    let e2e_secs = last_email
        .map(|t| (t - started).as_secs_f64())
        .unwrap_or(f64::NAN);
    // The measured orders only, not the warm-up's.
    let measured: Vec<String> = posted
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .keys()
        .cloned()
        .collect();
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM orders.orders WHERE id::text = ANY($1) GROUP BY status ORDER BY status",
    )
    .bind(&measured)
    .fetch_all(&pool)
    .await?;
    let events: Vec<(String, String, f64)> = sqlx::query_as(
        "SELECT order_id::text, status, extract(epoch FROM at)::float8 FROM orders.order_events \
         WHERE order_id::text = ANY($1)",
    )
    .bind(&measured)
    .fetch_all(&pool)
    .await?;
    let stages = {
        let wall = |t: Instant| {
            started_wall
                .checked_add(t.saturating_duration_since(started))
                .and_then(|w| w.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(f64::NAN, |d| d.as_secs_f64())
        };
        let ends = ends
            .iter()
            .map(|(id, (posted, emailed))| (id.clone(), (wall(*posted), wall(*emailed))));
        stage_times(&events, &ends.collect())
    };
    let db_cpu = {
        // By backend first: one that started during the run counts from zero.
        let mut by_client: HashMap<String, f64> = HashMap::new();
        for (pid, (client, c)) in db_backends_cpu(&pool).await? {
            let before = db_cpu_before.get(&pid).map_or(0.0, |(_, b)| *b);
            *by_client.entry(client).or_insert(0.0) += c - before;
        }
        let mut by_client: Vec<(String, f64)> = by_client.into_iter().collect();
        by_client.sort_by(|a, b| b.1.total_cmp(&a.1));
        by_client
    };
    let cpu: Vec<(String, f64)> = procs
        .iter()
        .zip(&cpu_before)
        .map(|(p, before)| {
            (
                p.name.clone(),
                p.child.id().map(cpu_seconds).unwrap_or(0.0) - before,
            )
        })
        .chain([
            (
                "rabbitmq (beam.smp)".to_owned(),
                cpu_of_all("beam.smp") - broker_before,
            ),
            (
                "postgresql (all backends)".to_owned(),
                cpu_of_all("postgres") - db_before,
            ),
            (
                "this benchmark (HTTP client, SMTP sink)".to_owned(),
                cpu_seconds(std::process::id()) - bench_before,
            ),
        ])
        .collect();
    let rss: Vec<(String, Option<u64>)> = procs
        .iter()
        .map(|p| (p.name.clone(), p.child.id().and_then(peak_rss_kib)))
        .collect();
    // What the workers say they did with what they consumed, warm-up
    // included. Every order confirmed consumed 7 messages (place, reserve,
    // reserved, charge, charged, commit, confirmed) and the set-up a
    // restock per SKU; an order's `inventory.commit` may still be on its
    // way when its email has arrived, so the counts get a few seconds.
    let all_confirmed = states.iter().all(|(s, _)| s == "CONFIRMED");
    let expected_applied = 7 * (accepted + args.warm_up) as u64 + SKUS as u64;
    let settle_by = Instant::now() + Duration::from_secs(30);
    let consumed = loop {
        let mut consumed: std::collections::BTreeMap<String, u64> = Default::default();
        for port in &metrics_ports {
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
        let applied = consumed.get("applied").copied().unwrap_or(0);
        if !all_confirmed || applied >= expected_applied || Instant::now() > settle_by {
            break consumed;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for p in &procs {
        if let Some(pid) = p.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
    }
    for p in &mut procs {
        let _ = tokio::time::timeout(Duration::from_secs(30), p.child.wait()).await;
    }
    // Read once the workers' backends have exited: a backend reports its
    // table statistics lazily, at the latest when it ends.
    let seq_rows = seq_rows_read(&pool).await? - seq_rows_before;

    // The model: per order, 7 broker hops and 7 transactions before its email
    // (place, reserve, reserved, charge, charged, confirmed, commit).
    let (hops, txs) = (7.0, 7.0);
    let ceiling = 1.0 / (hops / hop_rate + txs / db_rate);
    let e2e_rate = latencies.len() as f64 / e2e_secs;
    let offered = match rate {
        Some(r) => format!("offered at {r:.0}/s"),
        None => format!("concurrency {}", args.concurrency),
    };
    println!(
        "## {} orders, {offered}, {} replica(s) of each worker, after {} warm-up orders and VACUUM ANALYZE\n",
        args.orders, args.replicas, args.warm_up
    );
    println!(
        "Worker database pool: {}\n",
        args.pool
            .map(|p| p.to_string())
            .unwrap_or_else(|| "8 (default)".into())
    );
    println!("| measure | value |\n| --- | --- |");
    println!("| accepted (202) | {accepted} of {} |", args.orders);
    println!(
        "| accepted/s at the HTTP edge | {:.0} |",
        accepted as f64 / accept_secs
    );
    println!("| emails received | {} |", latencies.len());
    println!("| end-to-end orders/s (first POST to last email) | {e2e_rate:.0} |");
    println!(
        "| latency POST→email p50 / p95 / p99 | {:.0} / {:.0} / {:.0} ms |",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.95).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3
    );
    let per_order = |n: i64| n as f64 / accepted.max(1) as f64;
    println!(
        "| PostgreSQL per order | {:.2} transaction ids, {:.1} KiB of WAL, {:.0} rows read by sequential scans |",
        per_order(db_work.xids),
        per_order(db_work.wal_bytes) / 1024.0,
        per_order(seq_rows)
    );
    println!(
        "| final states | {} |",
        states
            .iter()
            .map(|(s, n)| format!("{s} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let applied = consumed.get("applied").copied().unwrap_or(0);
    let dead = consumed.get("dead_lettered").copied().unwrap_or(0);
    println!(
        "| messages consumed by outcome (workers' `/metrics`, warm-up included) | {}; applied {} 7 × {} orders + {SKUS} restocks |",
        consumed
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect::<Vec<_>>()
            .join(", "),
        if applied == expected_applied {
            "="
        } else {
            "≠"
        },
        accepted + args.warm_up
    );
    // Without a ceiling measured there is nothing to set the run against.
    if !args.no_ceiling {
        println!(
            "| raw broker hop rate (quorum, confirms, acks) | {hop_rate:.0} msg/s, broker {:.0} µs CPU/msg |",
            hop.broker_us
        );
        println!(
            "| same, one ack per 32 deliveries (`multiple`) | {:.0} msg/s, broker {:.0} µs CPU/msg |",
            hop_batched_acks.rate, hop_batched_acks.broker_us
        );
        println!("| raw PostgreSQL small-write tx rate (8 conns) | {db_rate:.0} tx/s |");
        println!("| modelled ceiling 1/({hops}/hop + {txs}/tx) | {ceiling:.0} orders/s |");
        println!(
            "| end-to-end as share of the ceiling | {:.0}% |",
            100.0 * e2e_rate / ceiling
        );
    }
    println!("\nPeak RSS (VmHWM):\n");
    for (name, kib) in rss {
        println!(
            "- {name}: {}",
            kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                .unwrap_or_else(|| "?".into())
        );
    }
    let total_cpu: f64 = cpu.iter().map(|(_, c)| c).sum();
    println!(
        "\nCPU seconds during the run ({e2e_secs:.1} s wall, {:.1} s of 2 cores available):\n",
        e2e_secs * 2.0
    );
    let mut cpu = cpu;
    cpu.sort_by(|a, b| b.1.total_cmp(&a.1));
    for (name, c) in &cpu {
        println!(
            "- {name}: {c:.1} s ({:.0}%)",
            100.0 * c / total_cpu.max(f64::EPSILON)
        );
    }
    println!(
        "\nPostgreSQL backends' CPU by the process they serve (`application_name`; \
         backends that ended during the run are not counted):\n"
    );
    for (client, c) in &db_cpu {
        println!("- {client}: {c:.1} s");
    }
    println!(
        "\nTime per stage, p50 / p99 / mean (POST and email on this process's clock, the rest from `order_events`):\n"
    );
    for (stage, mut ms) in stages {
        if ms.is_empty() {
            continue;
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
        let mean = ms.iter().sum::<f64>() / ms.len() as f64;
        println!("- {stage}: {:.1} / {:.1} / {mean:.1} ms", at(0.5), at(0.99));
    }
    // At a fixed rate every second carries the same load, so a second
    // slower than the rest points at something other than the load.
    if rate.is_some() {
        let ends: Vec<(Duration, Duration)> = ends
            .values()
            .map(|(posted, emailed)| (*posted - started, *emailed - *posted))
            .collect();
        println!("\nPOST→email by the second of the run the order was POSTed in:\n");
        println!("| second | orders | p50 | p99 | max |\n| --- | --- | --- | --- | --- |");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        for s in latency_by_second(&ends) {
            println!(
                "| {} | {} | {:.0} | {:.0} | {:.0} |",
                s.second,
                s.orders,
                ms(s.p50),
                ms(s.p99),
                ms(s.max)
            );
        }
    }
    let lost = accepted as i64
        - states
            .iter()
            .filter(|(s, _)| s == "CONFIRMED" || s == "CANCELLED")
            .map(|(_, n)| n)
            .sum::<i64>();
    pool.close().await;
    let _ = api_mgmt.delete(&format!("vhosts/{VHOST}")).await;
    if lost != 0 || latencies.len() != accepted {
        anyhow::bail!(
            "not a result: {lost} accepted orders not final, {} emails for {accepted} orders",
            latencies.len()
        );
    }
    if dead != 0 || (all_confirmed && applied != expected_applied) {
        anyhow::bail!(
            "not a result: the workers dead-lettered {dead} messages and applied {applied} where the orders need {expected_applied}"
        );
    }
    Ok(())
}

/// `orderflow_worker_messages_total` of one worker's `/metrics`, by outcome.
fn outcomes(metrics: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("orderflow_worker_messages_total{"))
        .filter_map(|l| {
            let outcome = l.split("outcome=\"").nth(1)?.split('"').next()?;
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((outcome.to_owned(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcomes_are_read_from_a_worker_s_metrics() {
        let text = "# TYPE orderflow_worker_messages counter\n\
            orderflow_worker_messages_total{worker=\"order-worker\",outcome=\"applied\"} 12\n\
            orderflow_worker_messages_total{worker=\"order-worker\",outcome=\"duplicate\"} 1\n\
            orderflow_worker_dead_letters_total{worker=\"order-worker\",kind=\"malformed\"} 3\n";
        assert_eq!(
            outcomes(text),
            vec![("applied".to_owned(), 12), ("duplicate".to_owned(), 1)]
        );
    }

    fn event(order: &str, status: &str, at: f64) -> (String, String, f64) {
        (order.to_owned(), status.to_owned(), at)
    }

    /// An order that went the whole way gives one time per stage; one
    /// without all its events (cancelled, or not yet final) gives none.
    #[test]
    fn stage_times_span_post_to_email_and_skip_orders_that_did_not_go_the_whole_way() {
        let events = [
            event("a", "PENDING", 10.010),
            event("a", "STOCK_RESERVED", 10.030),
            event("a", "PAID", 10.060),
            event("a", "CONFIRMED", 10.060),
            event("b", "PENDING", 10.020),
            event("b", "CANCELLED", 10.040),
        ];
        let ends = HashMap::from([
            ("a".to_owned(), (10.0, 10.070)),
            ("b".to_owned(), (10.0, 10.050)),
            ("c".to_owned(), (10.0, 10.050)),
        ]);
        let times = stage_times(&events, &ends);
        assert_eq!(times.len(), STAGES.len() + 1);
        let each: Vec<Vec<i64>> = times
            .iter()
            .map(|(_, ms)| ms.iter().map(|m| m.round() as i64).collect())
            .collect();
        assert_eq!(each, [vec![10], vec![20], vec![30], vec![0], vec![10]]);
    }

    #[test]
    fn latencies_are_grouped_by_the_second_of_their_post() {
        let ms = Duration::from_millis;
        let ends = [
            (ms(100), ms(30)),
            (ms(900), ms(10)),
            (ms(2_500), ms(200)),
            (ms(999), ms(20)),
        ];
        let seconds = latency_by_second(&ends);
        assert_eq!(
            seconds,
            [
                SecondOfRun {
                    second: 0,
                    orders: 3,
                    p50: ms(20),
                    p99: ms(30),
                    max: ms(30),
                },
                SecondOfRun {
                    second: 2,
                    orders: 1,
                    p50: ms(200),
                    p99: ms(200),
                    max: ms(200),
                },
            ]
        );
    }
}
