//! `db_driver`: the handler's transaction (inbox insert + state change +
//! outbox insert) with sqlx and with tokio-postgres (pipelined, through
//! deadpool-postgres), so the hot path's driver is chosen on numbers.
//!
//! cargo run --release -p bench --bin db_driver -- [transactions] [concurrency]

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use std::time::Instant;
use uuid::Uuid;

const SETUP: &str = "
    DROP SCHEMA IF EXISTS driver_bench CASCADE;
    CREATE SCHEMA driver_bench;
    CREATE TABLE driver_bench.inbox (consumer text NOT NULL, message_id uuid NOT NULL, processed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (consumer, message_id));
    CREATE TABLE driver_bench.stock (sku text PRIMARY KEY, available bigint NOT NULL);
    CREATE TABLE driver_bench.outbox (id bigserial PRIMARY KEY, message_id uuid NOT NULL, routing_key text NOT NULL, body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
    INSERT INTO driver_bench.stock SELECT 'SKU-' || g, 1000000000 FROM generate_series(1, 1000) g;
";

const INBOX: &str =
    "INSERT INTO driver_bench.inbox (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING";
const STATE: &str = "UPDATE driver_bench.stock SET available = available - 1 WHERE sku = $1";
const OUTBOX: &str =
    "INSERT INTO driver_bench.outbox (message_id, routing_key, body) VALUES ($1, $2, $3)";

fn sku(i: usize) -> String {
    format!("SKU-{}", i % 1000 + 1)
}

async fn with_sqlx(url: &str, n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(concurrency)?)
        .connect(url)
        .await?;
    let started = Instant::now();
    let per = n / concurrency;
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let mut tx = pool.begin().await?;
                sqlx::query(INBOX)
                    .bind("bench")
                    .bind(Uuid::new_v4())
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(STATE)
                    .bind(sku(c * per + i))
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(OUTBOX)
                    .bind(Uuid::new_v4())
                    .bind(contract::keys::INVENTORY_RESERVED)
                    .bind(br#"{"order_id":"x"}"#.to_vec())
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
    let rate = (per * concurrency) as f64 / started.elapsed().as_secs_f64();
    pool.close().await;
    Ok(rate)
}

async fn with_tokio_postgres(url: &str, n: usize, concurrency: usize) -> anyhow::Result<f64> {
    let config: tokio_postgres::Config = url.parse()?;
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager).max_size(concurrency).build()?;
    let started = Instant::now();
    let per = n / concurrency;
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pool.get().await?;
            let inbox = client.prepare_cached(INBOX).await?;
            let state = client.prepare_cached(STATE).await?;
            let outbox = client.prepare_cached(OUTBOX).await?;
            for i in 0..per {
                let tx = client.transaction().await?;
                let (id, out_id, sku) = (Uuid::new_v4(), Uuid::new_v4(), sku(c * per + i));
                let body = br#"{"order_id":"x"}"#.to_vec();
                // The three statements go out back to back, one round trip.
                let consumer = "bench";
                let key = contract::keys::INVENTORY_RESERVED;
                let p1: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&consumer, &id];
                let p2: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&sku];
                let p3: [&(dyn tokio_postgres::types::ToSql + Sync); 3] = [&out_id, &key, &body];
                let (a, b, d) = futures::join!(
                    tx.execute(&inbox, &p1),
                    tx.execute(&state, &p2),
                    tx.execute(&outbox, &p3),
                );
                a?;
                b?;
                d?;
                tx.commit().await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per * concurrency) as f64 / started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args
        .get(1)
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(20_000);
    let concurrency: usize = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(8);
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| runtime::config::DEFAULT_DATABASE_URL.into());
    let pool = runtime::db::connect(&url, 1, "bench").await?;
    sqlx::raw_sql(SETUP).execute(&pool).await?;
    pool.close().await;

    println!("handler transaction (inbox + state change + outbox), {n} transactions");
    for c in [1, concurrency] {
        // Alternate, so that neither driver always runs on a warmer server.
        let s1 = with_sqlx(&url, n, c).await?;
        let t1 = with_tokio_postgres(&url, n, c).await?;
        let s2 = with_sqlx(&url, n, c).await?;
        let t2 = with_tokio_postgres(&url, n, c).await?;
        let (s, t) = ((s1 + s2) / 2.0, (t1 + t2) / 2.0);
        println!(
            "concurrency {c:>2}: sqlx {s:>8.0} tx/s   tokio-postgres pipelined {t:>8.0} tx/s   ratio {:.2}",
            t / s
        );
    }
    let pool = runtime::db::connect(&url, 1, "bench").await?;
    sqlx::raw_sql("DROP SCHEMA driver_bench CASCADE")
        .execute(&pool)
        .await?;
    Ok(())
}
