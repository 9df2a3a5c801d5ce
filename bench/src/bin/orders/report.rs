//! What the run is measured against (the machine's ceiling), what is read
//! before and after it, and the report printed as Markdown.

use crate::database::{DbWork, db_backends_cpu, db_tx_rate, db_work, seq_rows_read};
use crate::drive::Driven;
use crate::smtp::Arrivals;
use crate::stats::{latency_by_second, percentile, stage_times};
use crate::system::System;
use crate::{Args, SKUS};
use bench::{cpu_of_all, cpu_seconds, hop};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The machine's ceiling: the raw broker hop, acked one by one (the
/// model's hop) and one ack per 32 deliveries (what batched acks save the
/// broker), and the raw PostgreSQL small-write transaction rate.
pub struct Ceiling {
    hop: hop::Hop,
    hop_batched_acks: hop::Hop,
    db_rate: f64,
}

impl Ceiling {
    pub async fn measure(args: &Args, amqp: &str, db_url: &str) -> anyhow::Result<Option<Self>> {
        if args.no_ceiling {
            return Ok(None);
        }
        Ok(Some(Self {
            hop: hop::with_lapin(amqp, 20_000, 1, hop::LapinPublishes::Together, None).await?,
            hop_batched_acks: hop::with_lapin(
                amqp,
                20_000,
                32,
                hop::LapinPublishes::Together,
                None,
            )
            .await?,
            db_rate: db_tx_rate(db_url, 20_000).await?,
        }))
    }

    /// The model: per order, 7 broker hops and 7 transactions before its
    /// email (place, reserve, reserved, charge, charged, confirmed, commit).
    fn orders_per_second(&self) -> f64 {
        let (hops, txs) = (7.0, 7.0);
        1.0 / (hops / self.hop.rate + txs / self.db_rate)
    }
}

/// What is read just before the measured run.
pub struct Before {
    cpu: Vec<f64>,
    broker_cpu: f64,
    db_cpu: f64,
    bench_cpu: f64,
    db_work: DbWork,
    db_backends: HashMap<u32, (String, f64)>,
    pub seq_rows: i64,
}

impl Before {
    pub async fn take(system: &System, pool: &sqlx::PgPool) -> anyhow::Result<Self> {
        Ok(Self {
            seq_rows: seq_rows_read(pool).await?,
            cpu: system.cpu_seconds(),
            broker_cpu: cpu_of_all("beam.smp"),
            db_cpu: cpu_of_all("postgres"),
            bench_cpu: cpu_seconds(std::process::id()),
            db_work: db_work(pool).await?,
            db_backends: db_backends_cpu(pool).await?,
        })
    }
}

/// Everything the report prints.
pub struct Report {
    accepted: usize,
    /// Each measured order's POST and email, for those whose email came.
    ends: HashMap<String, (Instant, Instant)>,
    latencies: Vec<Duration>,
    e2e_secs: f64,
    states: Vec<(String, i64)>,
    stages: Vec<(String, Vec<f64>)>,
    db_work: DbWork,
    db_cpu: Vec<(String, f64)>,
    cpu: Vec<(String, f64)>,
    rss: Vec<(String, Option<u64>)>,
    consumed: BTreeMap<String, u64>,
    expected_applied: u64,
    warm_up: usize,
    /// Rows read by sequential scans during the run; read after the stop.
    pub seq_rows: i64,
}

impl Report {
    pub async fn collect(
        args: &Args,
        pool: &sqlx::PgPool,
        system: &System,
        http: &reqwest::Client,
        before: &Before,
        driven: &Driven,
        arrivals: &Arrivals,
    ) -> anyhow::Result<Self> {
        let db_work = db_work(pool).await? - before.db_work;
        let (ends, last_email) = {
            let a = arrivals.lock().map_err(|_| anyhow::anyhow!("lock"))?;
            let ends: HashMap<String, (Instant, Instant)> = driven
                .posted
                .iter()
                .filter_map(|(id, t)| a.get(id).map(|e| (id.clone(), (*t, *e))))
                .collect();
            (ends, a.values().max().copied())
        };
        let mut latencies: Vec<Duration> = ends.values().map(|(p, e)| *e - *p).collect();
        latencies.sort();
        let e2e_secs = last_email
            .map(|t| (t - driven.started).as_secs_f64())
            .unwrap_or(f64::NAN);
        let (states, stages) = states_and_stages(pool, driven, &ends).await?;
        let cpu = system
            .cpu_since(&before.cpu)
            .into_iter()
            .chain([
                (
                    "rabbitmq (beam.smp)".to_owned(),
                    cpu_of_all("beam.smp") - before.broker_cpu,
                ),
                (
                    "postgresql (all backends)".to_owned(),
                    cpu_of_all("postgres") - before.db_cpu,
                ),
                (
                    "this benchmark (HTTP client, SMTP sink)".to_owned(),
                    cpu_seconds(std::process::id()) - before.bench_cpu,
                ),
            ])
            .collect();
        // Every order confirmed consumed 7 messages (place, reserve,
        // reserved, charge, charged, commit, confirmed) and the set-up a
        // restock per SKU, warm-up included.
        // Seven per order, and per SKU its price and its restock.
        let expected_applied = 7 * (driven.accepted() + args.warm_up) as u64 + 2 * SKUS as u64;
        let all_confirmed = states.iter().all(|(s, _)| s == "CONFIRMED");
        Ok(Self {
            accepted: driven.accepted(),
            ends,
            latencies,
            e2e_secs,
            states,
            stages,
            db_work,
            db_cpu: db_cpu_by_client(pool, before).await?,
            cpu,
            rss: system.peak_rss(),
            consumed: settled_counts(system, http, all_confirmed, expected_applied).await?,
            expected_applied,
            warm_up: args.warm_up,
            seq_rows: 0,
        })
    }

    fn count(&self, outcome: &str) -> u64 {
        self.consumed.get(outcome).copied().unwrap_or(0)
    }

    /// An error when the run is not a result: an accepted order not final,
    /// an email missing, a message dead-lettered or counts that disagree.
    pub fn verdict(&self) -> anyhow::Result<()> {
        let finals: i64 = self
            .states
            .iter()
            .filter(|(s, _)| s == "CONFIRMED" || s == "CANCELLED")
            .map(|(_, n)| n)
            .sum();
        let lost = self.accepted as i64 - finals;
        if lost != 0 || self.latencies.len() != self.accepted {
            anyhow::bail!(
                "not a result: {lost} accepted orders not final, {} emails for {} orders",
                self.latencies.len(),
                self.accepted
            );
        }
        let all_confirmed = self.states.iter().all(|(s, _)| s == "CONFIRMED");
        let (dead, applied) = (self.count("dead_lettered"), self.count("applied"));
        if dead != 0 || (all_confirmed && applied != self.expected_applied) {
            anyhow::bail!(
                "not a result: the workers dead-lettered {dead} messages and applied {applied} where the orders need {}",
                self.expected_applied
            );
        }
        Ok(())
    }

    pub fn print(&self, args: &Args, ceiling: &Option<Ceiling>, driven: &Driven) {
        let offered = match driven.rate {
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
        let e2e_rate = self.latencies.len() as f64 / self.e2e_secs;
        self.print_figures(args, driven, e2e_rate);
        // Without a ceiling measured there is nothing to set the run against.
        if let Some(ceiling) = ceiling {
            print_ceiling(ceiling, e2e_rate);
        }
        self.print_resources();
        self.print_stages();
        // At a fixed rate every second carries the same load, so a second
        // slower than the rest points at something other than the load.
        if driven.rate.is_some() {
            self.print_by_second(driven);
        }
    }

    fn print_figures(&self, args: &Args, driven: &Driven, e2e_rate: f64) {
        let accepted = self.accepted;
        let latencies = &self.latencies;
        println!("| measure | value |\n| --- | --- |");
        println!("| accepted (202) | {accepted} of {} |", args.orders);
        println!(
            "| accepted/s at the HTTP edge | {:.0} |",
            accepted as f64 / driven.accept_secs()
        );
        println!("| emails received | {} |", latencies.len());
        println!("| end-to-end orders/s (first POST to last email) | {e2e_rate:.0} |");
        println!(
            "| latency POST→email p50 / p95 / p99 | {:.0} / {:.0} / {:.0} ms |",
            percentile(latencies, 0.5).as_secs_f64() * 1e3,
            percentile(latencies, 0.95).as_secs_f64() * 1e3,
            percentile(latencies, 0.99).as_secs_f64() * 1e3
        );
        let per_order = |n: i64| n as f64 / accepted.max(1) as f64;
        println!(
            "| PostgreSQL per order | {:.2} transaction ids, {:.1} KiB of WAL, {:.0} rows read by sequential scans |",
            per_order(self.db_work.xids),
            per_order(self.db_work.wal_bytes) / 1024.0,
            per_order(self.seq_rows)
        );
        println!(
            "| final states | {} |",
            joined(self.states.iter().map(|(s, n)| (s, n)))
        );
        let applied = self.count("applied");
        println!(
            "| messages consumed by outcome (workers' `/metrics`, warm-up included) | {}; applied {} 7 × {} orders + {SKUS} prices + {SKUS} restocks |",
            joined(self.consumed.iter()),
            if applied == self.expected_applied {
                "="
            } else {
                "≠"
            },
            accepted + self.warm_up
        );
    }

    fn print_resources(&self) {
        println!("\nPeak RSS (VmHWM):\n");
        for (name, kib) in &self.rss {
            println!(
                "- {name}: {}",
                kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
                    .unwrap_or_else(|| "?".into())
            );
        }
        let total_cpu: f64 = self.cpu.iter().map(|(_, c)| c).sum();
        println!(
            "\nCPU seconds during the run ({:.1} s wall, {:.1} s of 2 cores available):\n",
            self.e2e_secs,
            self.e2e_secs * 2.0
        );
        let mut cpu = self.cpu.clone();
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
        for (client, c) in &self.db_cpu {
            println!("- {client}: {c:.1} s");
        }
    }

    fn print_stages(&self) {
        println!(
            "\nTime per stage, p50 / p99 / mean (POST and email on this process's clock, the rest from `order_events`):\n"
        );
        for (stage, ms) in &self.stages {
            if ms.is_empty() {
                continue;
            }
            let mut ms = ms.clone();
            ms.sort_by(f64::total_cmp);
            let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
            let mean = ms.iter().sum::<f64>() / ms.len() as f64;
            println!("- {stage}: {:.1} / {:.1} / {mean:.1} ms", at(0.5), at(0.99));
        }
    }

    fn print_by_second(&self, driven: &Driven) {
        let ends: Vec<(Duration, Duration)> = self
            .ends
            .values()
            .map(|(posted, emailed)| (*posted - driven.started, *emailed - *posted))
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
}

fn print_ceiling(ceiling: &Ceiling, e2e_rate: f64) {
    let Ceiling {
        hop,
        hop_batched_acks,
        db_rate,
    } = ceiling;
    let hop_rate = hop.rate;
    let modelled = ceiling.orders_per_second();
    println!(
        "| raw broker hop rate (quorum, confirms, acks) | {hop_rate:.0} msg/s, broker {:.0} µs CPU/msg |",
        hop.broker_us
    );
    println!(
        "| same, one ack per 32 deliveries (`multiple`) | {:.0} msg/s, broker {:.0} µs CPU/msg |",
        hop_batched_acks.rate, hop_batched_acks.broker_us
    );
    println!("| raw PostgreSQL small-write tx rate (8 conns) | {db_rate:.0} tx/s |");
    println!("| modelled ceiling 1/(7/hop + 7/tx) | {modelled:.0} orders/s |");
    println!(
        "| end-to-end as share of the ceiling | {:.0}% |",
        100.0 * e2e_rate / modelled
    );
}

fn joined<S: std::fmt::Display, N: std::fmt::Display>(
    counts: impl Iterator<Item = (S, N)>,
) -> String {
    counts
        .map(|(s, n)| format!("{s} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The measured orders' final states, and the time each spent in each stage.
#[allow(clippy::type_complexity)]
async fn states_and_stages(
    pool: &sqlx::PgPool,
    driven: &Driven,
    ends: &HashMap<String, (Instant, Instant)>,
) -> anyhow::Result<(Vec<(String, i64)>, Vec<(String, Vec<f64>)>)> {
    // The measured orders only, not the warm-up's.
    let measured: Vec<String> = driven.posted.keys().cloned().collect();
    let states: Vec<(String, i64)> = sqlx::query_as(
        "SELECT status, count(*) FROM orders.orders WHERE id::text = ANY($1) GROUP BY status ORDER BY status",
    )
    .bind(&measured)
    .fetch_all(pool)
    .await?;
    let events: Vec<(String, String, f64)> = sqlx::query_as(
        "SELECT order_id::text, status, extract(epoch FROM at)::float8 FROM orders.order_events \
         WHERE order_id::text = ANY($1)",
    )
    .bind(&measured)
    .fetch_all(pool)
    .await?;
    let wall = |t: Instant| {
        driven
            .started_wall
            .checked_add(t.saturating_duration_since(driven.started))
            .and_then(|w| w.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(f64::NAN, |d| d.as_secs_f64())
    };
    let ends = ends
        .iter()
        .map(|(id, (posted, emailed))| (id.clone(), (wall(*posted), wall(*emailed))))
        .collect();
    Ok((states, stage_times(&events, &ends)))
}

/// PostgreSQL backends' CPU during the run, by the process they serve; a
/// backend that started during the run counts from zero.
async fn db_cpu_by_client(
    pool: &sqlx::PgPool,
    before: &Before,
) -> anyhow::Result<Vec<(String, f64)>> {
    let mut by_client: HashMap<String, f64> = HashMap::new();
    for (pid, (client, c)) in db_backends_cpu(pool).await? {
        let was = before.db_backends.get(&pid).map_or(0.0, |(_, b)| *b);
        *by_client.entry(client).or_insert(0.0) += c - was;
    }
    let mut by_client: Vec<(String, f64)> = by_client.into_iter().collect();
    by_client.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(by_client)
}

/// The workers' counts by outcome. An order's `inventory.commit` may still
/// be on its way when its email has arrived, so when every order was
/// confirmed the counts get up to 30 s to reach what the orders need.
async fn settled_counts(
    system: &System,
    http: &reqwest::Client,
    all_confirmed: bool,
    expected_applied: u64,
) -> anyhow::Result<BTreeMap<String, u64>> {
    let settle_by = Instant::now() + Duration::from_secs(30);
    loop {
        let consumed = system.consumed(http).await?;
        let applied = consumed.get("applied").copied().unwrap_or(0);
        if !all_confirmed || applied >= expected_applied || Instant::now() > settle_by {
            return Ok(consumed);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
