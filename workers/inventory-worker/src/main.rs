//! `inventory-worker`: consumes the `inventory` queue.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = runtime::WorkerSettings::from_env_for::<inventory_worker::Inventory>()?;
    settings.log_effective(inventory_worker::SPEC.name);
    runtime::worker::run_until_signalled(inventory_worker::build(settings)).await
}
