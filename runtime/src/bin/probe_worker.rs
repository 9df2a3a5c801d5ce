//! `probe-worker`: a worker process around the test probe handler, so the
//! runtime's fault tests can SIGKILL and SIGTERM a real process.

#[path = "../../tests/support/probe.rs"]
mod probe;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init();
    let settings = runtime::WorkerSettings::from_env()?;
    let pool =
        runtime::db::connect(settings.database_url.expose(), settings.database_pool_size).await?;
    runtime::db::migrate(&pool).await?;
    sqlx::raw_sql(probe::PROBE_TABLES).execute(&pool).await?;
    let handler = probe::ProbeHandler { pool: pool.clone() };
    let worker = runtime::Worker::with_pool(probe::probe_spec(), settings, pool, handler);
    worker.run(runtime::shutdown::signal()).await
}
