//! The benchmark's database, and what PostgreSQL did during the run.

use bench::cpu_seconds;
use std::collections::HashMap;
use std::time::Instant;

/// Creates `db` afresh on the server at `pg`; returns its URL.
pub async fn fresh(pg: &str, db: &str) -> anyhow::Result<String> {
    let admin = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{pg}/postgres"))
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(format!("{pg}/{db}"))
}

/// Work PostgreSQL has done so far, cluster-wide (the benchmark runs
/// alone): transaction ids assigned (one per transaction that writes, and
/// per savepoint that writes inside one) and WAL written. Both are exact at
/// once, unlike the statistics views, which backends update lazily.
#[derive(Clone, Copy)]
pub struct DbWork {
    pub xids: i64,
    pub wal_bytes: i64,
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

pub async fn db_work(pool: &sqlx::PgPool) -> anyhow::Result<DbWork> {
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
pub async fn seq_rows_read(pool: &sqlx::PgPool) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT coalesce(sum(seq_tup_read), 0)::int8 FROM pg_stat_user_tables")
            .fetch_one(pool)
            .await?,
    )
}

/// Each backend of the benchmark's database by pid: the process it serves
/// (each names itself as its `application_name`) and the CPU seconds it
/// has used so far.
pub async fn db_backends_cpu(pool: &sqlx::PgPool) -> anyhow::Result<HashMap<u32, (String, f64)>> {
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
pub async fn db_tx_rate(url: &str, n: usize) -> anyhow::Result<f64> {
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
