//! `order-worker`: the order saga, consuming the `order` queue.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init();
    let settings = runtime::WorkerSettings::from_env_for::<order_worker::OrderSaga>()?;
    let payment_timeout = order_worker::payment_timeout_from_env()?;
    settings.log_effective(order_worker::SPEC.name);
    tracing::info!(?payment_timeout, "Payment timeout");
    runtime::worker::run_until_signalled(order_worker::build(settings, payment_timeout)).await
}
