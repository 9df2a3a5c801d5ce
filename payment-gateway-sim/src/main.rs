//! `payment-gateway-sim`: the payment provider stand-in, on `HTTP_ADDR`,
//! over HTTPS when `SIM_TLS_CERT` and `SIM_TLS_KEY` are set.

use payment_gateway_sim::{Gateway, Settings};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = Settings::from_env()?;
    settings.log_effective();
    let addr = &settings.http_addr;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on HTTP_ADDR={addr}: {e}"))?;
    let router = Gateway::new(settings.trouble).router();
    match &settings.tls {
        Some(files) => {
            tracing::info!(addr, "Payment gateway simulator listening (HTTPS)");
            let config = files.server_config().map_err(anyhow::Error::msg)?;
            payment_gateway_sim::tls::serve(listener, router, config, runtime::shutdown::signal())
                .await;
        }
        None => {
            tracing::info!(addr, "Payment gateway simulator listening");
            axum::serve(listener, router)
                .with_graceful_shutdown(runtime::shutdown::signal())
                .await?;
        }
    }
    Ok(())
}
