//! `publisher`: the HTTP API, on `HTTP_ADDR`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    runtime::telemetry::init()?;
    let settings = publisher::PublisherSettings::from_env()?;
    settings.log_effective();
    let app = publisher::Application::build(settings).await?;
    app.run(runtime::shutdown::signal()).await
}
