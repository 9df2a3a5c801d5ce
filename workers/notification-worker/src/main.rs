//! `notification-worker`: emails the customer the outcome of each order.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = notification_worker::Settings::from_env()?;
    settings.log_effective();
    let build = notification_worker::build(settings.worker, settings.mail);
    runtime::worker::run_until_signalled(build).await
}
