//! `order-worker`: the order saga, consuming the `order` queue.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = order_worker::Settings::from_env()?;
    settings.log_effective();
    let build = order_worker::build(settings.worker, settings.payment_timeout);
    runtime::worker::run_until_signalled(build).await
}
