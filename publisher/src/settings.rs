//! The publisher's settings, from the environment.

use runtime::SecretUrl;
use runtime::config::{ConfigError, DEFAULT_DATABASE_URL, amqp_url_from_env, env_or};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    /// `HTTP_ADDR`; port 0 picks a free port (tests).
    pub http_addr: String,
    pub amqp_url: SecretUrl,
    pub database_url: SecretUrl,
    /// `REQUEST_TIMEOUT_MS`: the longest a request may take.
    pub request_timeout: Duration,
    /// `MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// `DATABASE_POOL_SIZE`: connections for the read side.
    pub database_pool_size: u32,
}

impl PublisherSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        let timeout_ms: u64 = env_or("REQUEST_TIMEOUT_MS", "10000")?;
        Ok(Self {
            http_addr: env_or("HTTP_ADDR", "127.0.0.1:8080")?,
            amqp_url: amqp_url_from_env()?,
            database_url: SecretUrl::new(env_or::<String>("DATABASE_URL", DEFAULT_DATABASE_URL)?),
            request_timeout: Duration::from_millis(timeout_ms),
            max_body_bytes: env_or("MAX_BODY_BYTES", "65536")?,
            database_pool_size: env_or("DATABASE_POOL_SIZE", "5")?,
        })
    }

    pub fn log_effective(&self) {
        tracing::info!(
            http_addr = %self.http_addr,
            amqp_url = %self.amqp_url,
            database_url = %self.database_url,
            request_timeout = ?self.request_timeout,
            max_body_bytes = self.max_body_bytes,
            "Effective configuration"
        );
    }
}
