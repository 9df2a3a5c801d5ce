//! `payment-worker`: charges and refunds through the payment gateway.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init();
    let settings = runtime::WorkerSettings::from_env_for::<payment_worker::Payments>()?;
    let gateway = payment_worker::GatewaySettings::from_env()?;
    settings.log_effective(payment_worker::SPEC.name);
    tracing::info!(gateway = %gateway.url, timeout = ?gateway.timeout, max_in_flight = gateway.max_in_flight, "Payment gateway");
    runtime::worker::run_until_signalled(payment_worker::build(settings, &gateway)).await
}
