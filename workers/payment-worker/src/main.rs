//! `payment-worker`: charges and refunds through the payment gateway.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = payment_worker::Settings::from_env()?;
    settings.log_effective();
    let build = payment_worker::build(settings.worker, &settings.gateway);
    runtime::worker::run_until_signalled(build).await
}
