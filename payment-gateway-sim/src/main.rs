//! `payment-gateway-sim`: the payment provider stand-in, on `HTTP_ADDR`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = payment_gateway_sim::Settings::from_env()?;
    settings.log_effective();
    let addr = &settings.http_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on HTTP_ADDR={addr}: {e}"))?;
    tracing::info!(addr, "Payment gateway simulator listening");
    axum::serve(
        listener,
        payment_gateway_sim::Gateway::new(settings.trouble).router(),
    )
    .with_graceful_shutdown(runtime::shutdown::signal())
    .await?;
    Ok(())
}
