//! `notification-worker`: emails the customer the outcome of each order.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init();
    let settings = runtime::WorkerSettings::from_env_for::<notification_worker::Notifications>()?;
    let mail = notification_worker::MailSettings::from_env()?;
    settings.log_effective(notification_worker::SPEC.name);
    tracing::info!(smtp_url = %mail.smtp_url, from = %mail.from, "Mail");
    runtime::worker::run_until_signalled(notification_worker::build(settings, mail)).await
}
