//! The publisher's settings tree, read once at start.

use crate::auth::AuthSettings;
use crate::shedding::SheddingSettings;
use runtime::SecretUrl;
use runtime::config::{ConfigError, Source, Var, amqp_url, database_url};
use std::time::Duration;

/// `HTTP_ADDR`; port 0 picks a free port (tests).
const HTTP_ADDR: Var = Var::new("HTTP_ADDR", "127.0.0.1:8080");
const REQUEST_TIMEOUT_MS: Var = Var::new("REQUEST_TIMEOUT_MS", "10000");
const MAX_BODY_BYTES: Var = Var::new("MAX_BODY_BYTES", "65536");
const DATABASE_POOL_SIZE: Var = Var::new("DATABASE_POOL_SIZE", "5");
/// `METRICS_ADDR`: `/metrics` on a port of its own, for a scraper inside
/// the deployment, without a key (unset: only the API's, admin only).
const METRICS_ADDR: Var = Var::optional("METRICS_ADDR");

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
    /// `RATE_LIMIT_PER_KEY`, `RATE_LIMIT_BURST`, `MAX_BACKLOG`.
    pub shedding: SheddingSettings,
    /// `API_KEYS`, or `AUTH=off`.
    pub auth: AuthSettings,
    /// `METRICS_ADDR`: where `/metrics` is also served, without a key.
    pub metrics_addr: Option<String>,
}

impl PublisherSettings {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::read(&Source::environment())
    }

    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        let timeout_ms: u64 = source.get(REQUEST_TIMEOUT_MS)?;
        Ok(Self {
            // Bound at start, where an address taken is reported.
            http_addr: source.parse(HTTP_ADDR, runtime::config::host_port)?,
            amqp_url: amqp_url(source)?,
            database_url: database_url(source)?,
            request_timeout: Duration::from_millis(timeout_ms),
            max_body_bytes: source.get(MAX_BODY_BYTES)?,
            database_pool_size: source.get(DATABASE_POOL_SIZE)?,
            shedding: SheddingSettings::read(source)?,
            metrics_addr: source.optional(METRICS_ADDR, runtime::config::host_port)?,
            // Last: a publisher without keys is refused after any other
            // bad variable is named.
            auth: AuthSettings::read(source)?,
        })
    }

    pub fn log_effective(&self) {
        tracing::info!(
            http_addr = %self.http_addr,
            amqp_url = %self.amqp_url,
            database_url = %self.database_url,
            request_timeout = ?self.request_timeout,
            max_body_bytes = self.max_body_bytes,
            database_pool_size = self.database_pool_size,
            auth = %self.auth.describe(),
            shedding = %self.shedding.describe(),
            metrics_addr = self.metrics_addr.as_deref().unwrap_or("unset"),
            "Effective configuration"
        );
        if matches!(self.auth, AuthSettings::Off) {
            tracing::warn!(
                "AUTH=off: every endpoint is open to anyone who reaches HTTP_ADDR; for local development only"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_contract_s_local_ones() {
        let settings =
            PublisherSettings::read(&Source::from_pairs([("AUTH", "off")])).expect("defaults");
        assert_eq!(settings.http_addr, "127.0.0.1:8080");
        assert_eq!(settings.request_timeout, Duration::from_secs(10));
        assert_eq!(settings.max_body_bytes, 65536);
    }

    #[test]
    fn every_bad_variable_is_refused_naming_it() {
        for (name, bad) in [
            ("HTTP_ADDR", "localhost"),
            ("REQUEST_TIMEOUT_MS", "10s"),
            ("MAX_BODY_BYTES", "-1"),
            ("DATABASE_POOL_SIZE", "x"),
            ("AMQP_URL", "nonsense"),
        ] {
            let e = PublisherSettings::read(&Source::from_pairs([(name, bad)])).expect_err(name);
            assert!(
                e.to_string()
                    .starts_with(&format!("{name}={bad:?} is not valid: ")),
                "{e}"
            );
        }
    }
}
