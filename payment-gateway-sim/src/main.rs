//! `payment-gateway-sim`: the payment provider stand-in, on `HTTP_ADDR`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init();
    let addr = std::env::var("HTTP_ADDR").unwrap_or_else(|_| "127.0.0.1:8090".into());
    let trouble = payment_gateway_sim::Trouble::from_env()?;
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on HTTP_ADDR={addr}: {e}"))?;
    tracing::info!(
        addr,
        error_rate = trouble.error_rate,
        latency_ms = trouble.latency_ms,
        "Payment gateway simulator listening"
    );
    axum::serve(
        listener,
        payment_gateway_sim::Gateway::new(trouble).router(),
    )
    .with_graceful_shutdown(runtime::shutdown::signal())
    .await?;
    Ok(())
}
