//! `probe-worker`: a worker process around the test probe handler, so the
//! runtime's fault tests can SIGKILL and SIGTERM a real process.

use runtime::testing::probe;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = runtime::WorkerSettings::from_env_for::<probe::ProbeHandler>()?;
    let spec = probe::probe_spec();
    let pool = runtime::db::connect(
        settings.database_url.expose(),
        settings.database_pool_size,
        spec.name,
    )
    .await?;
    runtime::db::migrate(&pool).await?;
    sqlx::raw_sql(probe::PROBE_TABLES).execute(&pool).await?;
    // Invocations are recorded outside the handler's transaction, on a pool of their own.
    let side = runtime::db::connect(settings.database_url.expose(), 4, spec.name).await?;
    let handler: probe::ProbeHandler = probe::ProbeHandler { pool: side };
    let worker = runtime::Worker::with_pool(spec, settings, pool, handler);
    worker.run(runtime::shutdown::signal()).await
}
