//! `order-worker`: the order saga, consuming the `order` queue.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = order_worker::Settings::from_env()?;
    settings.log_effective();
    let saga = order_worker::OrderSaga {
        payment_timeout: settings.payment_timeout,
        pricing: settings.pricing,
    };
    let build = runtime::Worker::build(order_worker::SPEC, settings.worker, saga);
    runtime::worker::run_until_signalled(build).await
}
