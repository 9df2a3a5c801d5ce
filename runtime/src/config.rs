//! Typed settings read from the environment, with the contract's local defaults.
//!
//! Every binary builds its settings here, fails with a message naming the
//! variable when one is wrong, and logs the effective values with secrets
//! masked.

use std::{fmt, str::FromStr, time::Duration};
use topology::RetryDelays;

pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/orderflow";

/// A value that must never reach a log line in clear, such as a URL with a
/// password in it. `Debug` and `Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:****@host/…`.
pub fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // Several URLs where one is expected (refused, but printed): each masked.
    if let Some(next) = rest.find("://").and_then(|i| rest[..i].rfind(',')) {
        let split = scheme_end + 3 + next;
        return format!(
            "{}{}",
            mask_password(&url[..split]),
            mask_password(&url[split..])
        );
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:****{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{name}={value:?} is not valid: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// Reads `name` from the environment, or `default` when it is unset or empty.
pub fn env_or<T>(name: &'static str, default: &str) -> Result<T, ConfigError>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    let value = std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned());
    value.trim().parse().map_err(|e: T::Err| ConfigError {
        name,
        value,
        reason: e.to_string(),
    })
}

/// `AMQP_URL`, read and parsed at start: a URL the client cannot read is
/// bad configuration, reported at once (password masked), not a broker to
/// wait for.
pub fn amqp_url_from_env() -> Result<SecretUrl, ConfigError> {
    check_amqp_url(&env_or::<String>("AMQP_URL", DEFAULT_AMQP_URL)?)
}

fn check_amqp_url(url: &str) -> Result<SecretUrl, ConfigError> {
    match topology::BrokerAddresses::parse(url) {
        Ok(_) => Ok(SecretUrl::new(url)),
        Err(reason) => Err(ConfigError {
            name: "AMQP_URL",
            value: mask_password(url),
            reason: format!("not an AMQP URL: {reason}"),
        }),
    }
}

/// Settings shared by every worker binary.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub amqp_url: SecretUrl,
    pub database_url: SecretUrl,
    pub retry_delays: RetryDelays,
    /// Unacknowledged deliveries the broker may push to this consumer (`PREFETCH`).
    pub prefetch: u16,
    /// Handler transactions in flight at once (`CONCURRENCY`); at most `prefetch`.
    pub concurrency: usize,
    /// The most deliveries one handler transaction takes (`BATCH_SIZE`).
    /// A transaction takes the deliveries already waiting, and, when more
    /// are likely, those that arrive within `batch_linger` of its first.
    pub batch_size: usize,
    /// How long a transaction waits for more deliveries after its first,
    /// unless `batch_size` arrive sooner (`BATCH_LINGER_MS`); it waits only
    /// when more are likely (`chunks.rs`). Zero: it takes only those
    /// already waiting.
    pub batch_linger: Duration,
    /// Connections in the database pool (`DATABASE_POOL_SIZE`).
    pub database_pool_size: u32,
    /// How old an outbox row must be before the sweeper relays it (`OUTBOX_SWEEP_AFTER`).
    pub outbox_sweep_after: Duration,
    /// How long the inbox remembers an applied message (`INBOX_RETENTION_DAYS`).
    pub inbox_retention: Duration,
    /// Where the worker serves `/metrics`, `/healthz` and `/readyz`
    /// (`METRICS_ADDR`, such as `0.0.0.0:9100`); unset, it serves nothing.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

impl WorkerSettings {
    /// Logs the effective configuration, passwords masked.
    pub fn log_effective(&self, binary: &str) {
        tracing::info!(
            binary,
            amqp_url = %self.amqp_url,
            database_url = %self.database_url,
            retry_delays = %self.retry_delays,
            prefetch = self.prefetch,
            concurrency = self.concurrency,
            batch_size = self.batch_size,
            batch_linger = ?self.batch_linger,
            database_pool_size = self.database_pool_size,
            outbox_sweep_after = ?self.outbox_sweep_after,
            inbox_retention = ?self.inbox_retention,
            metrics_addr = ?self.metrics_addr,
            "Effective configuration"
        );
    }

    /// The settings of a worker whose handler is `H`, from the environment;
    /// `CONCURRENCY` defaults to `H::DEFAULT_CONCURRENCY`.
    pub fn from_env_for<H: crate::Handler>() -> Result<Self, ConfigError> {
        let prefetch: u16 = env_or("PREFETCH", "128")?;
        if prefetch == 0 {
            return Err(ConfigError {
                name: "PREFETCH",
                value: "0".into(),
                reason: "must be at least 1 (0 would mean unbounded)".into(),
            });
        }
        let concurrency: usize = env_or("CONCURRENCY", &H::DEFAULT_CONCURRENCY.to_string())?;
        let concurrency = concurrency.clamp(1, prefetch.into());
        let batch_size: usize = env_or("BATCH_SIZE", "64")?;
        let batch_size = batch_size.clamp(1, prefetch.into());
        let linger_ms: u64 = env_or("BATCH_LINGER_MS", "3")?;
        // One connection per transaction in flight, one for the sweeper and
        // the start counter; at most eight, which keeps four domains times
        // two replicas inside PostgreSQL's default limit of 100.
        let pool: u32 = env_or("DATABASE_POOL_SIZE", &(concurrency + 2).min(8).to_string())?;
        let sweep_after_ms: u64 = env_or("OUTBOX_SWEEP_AFTER_MS", "5000")?;
        let retention_days: u64 = env_or("INBOX_RETENTION_DAYS", "30")?;
        let metrics_addr = match env_or::<String>("METRICS_ADDR", "")? {
            addr if addr.is_empty() => None,
            addr => Some(
                addr.parse()
                    .map_err(|e: std::net::AddrParseError| ConfigError {
                        name: "METRICS_ADDR",
                        value: addr.clone(),
                        reason: format!("{e} (expected HOST:PORT such as 0.0.0.0:9100)"),
                    })?,
            ),
        };
        Ok(Self {
            amqp_url: amqp_url_from_env()?,
            database_url: SecretUrl::new(env_or::<String>("DATABASE_URL", DEFAULT_DATABASE_URL)?),
            retry_delays: env_or("RETRY_DELAYS", "1s,5s,30s,2m,10m")?,
            prefetch,
            concurrency,
            batch_size,
            batch_linger: Duration::from_millis(linger_ms),
            database_pool_size: pool.max(2),
            outbox_sweep_after: Duration::from_millis(sweep_after_ms),
            inbox_retention: Duration::from_secs(retention_days.max(1) * 86_400),
            metrics_addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, Failure, Handler, Inbound, Malformed};

    struct Nothing;

    impl Inbound for Nothing {
        fn decode(kind: &str, _body: &[u8]) -> Result<Self, Malformed> {
            Err(Malformed::UnknownType(kind.to_owned()))
        }
    }

    struct Undeclared;

    impl Handler for Undeclared {
        type Message = Nothing;

        async fn handle(&self, _ctx: &mut Context, _message: Nothing) -> Result<(), Failure> {
            Ok(())
        }
    }

    struct Mailer;

    impl Handler for Mailer {
        type Message = Nothing;
        const DEFAULT_CONCURRENCY: usize = 6;

        async fn handle(&self, _ctx: &mut Context, _message: Nothing) -> Result<(), Failure> {
            Ok(())
        }
    }

    #[test]
    fn concurrency_defaults_to_what_the_handler_declares() {
        // The test process sets no CONCURRENCY: the defaults apply.
        let undeclared = WorkerSettings::from_env_for::<Undeclared>().expect("settings");
        let mailer = WorkerSettings::from_env_for::<Mailer>().expect("settings");
        assert_eq!(undeclared.concurrency, 2);
        assert_eq!(undeclared.database_pool_size, 4);
        assert_eq!(mailer.concurrency, 6);
        assert_eq!(mailer.database_pool_size, 8);
    }

    #[test]
    fn an_amqp_url_that_cannot_be_read_is_refused_with_its_password_masked() {
        for (bad, why) in [
            ("garbage", "relative URL"),
            ("amqp://guest:s3cret@127.0.0.1:99999/%2f", "port"),
        ] {
            let e = check_amqp_url(bad).expect_err(bad);
            let text = e.to_string();
            assert!(text.starts_with("AMQP_URL="), "{text}");
            assert!(text.contains(why), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
        assert!(check_amqp_url(DEFAULT_AMQP_URL).is_ok());
        assert!(check_amqp_url("amqps://u:p@broker.example:5671/prod").is_ok());
    }

    #[test]
    fn an_amqp_url_may_name_the_nodes_of_a_cluster() {
        let nodes = "amqp://shop:s3cret@rabbit-1:5672,rabbit-2:5672,rabbit-3/%2f";
        let read = check_amqp_url(nodes).expect(nodes);
        assert_eq!(
            read.to_string(),
            "amqp://shop:****@rabbit-1:5672,rabbit-2:5672,rabbit-3/%2f"
        );
        for (bad, why) in [
            (
                "amqp://shop:s3cret@rabbit-1,,rabbit-3/%2f",
                "node 2 of the list is empty",
            ),
            (
                "amqp://shop:s3cret@rabbit-1/%2f,amqp://shop:s3cret@rabbit-2/%2f",
                "several URLs",
            ),
            (
                "amqp://shop:s3cret@rabbit-1,rabbit-2:99999/%2f",
                "node 2 (rabbit-2:99999)",
            ),
        ] {
            let text = check_amqp_url(bad).expect_err(bad).to_string();
            assert!(text.contains(why), "{text}");
            assert!(!text.contains("s3cret"), "{text}");
        }
    }

    #[test]
    fn passwords_are_masked_and_the_rest_is_kept() {
        assert_eq!(
            mask_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:****@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_password("postgres://postgres@127.0.0.1:5432/orderflow"),
            "postgres://postgres@127.0.0.1:5432/orderflow"
        );
        assert_eq!(
            mask_password("postgres://u:p@ss@db/x"),
            "postgres://u:****@db/x"
        );
        assert_eq!(mask_password("not a url"), "not a url");
        assert_eq!(
            mask_password("amqp://a:one@h1/%2f,amqp://b:two@h2/%2f"),
            "amqp://a:****@h1/%2f,amqp://b:****@h2/%2f"
        );
        let s = SecretUrl::new("amqp://a:b@h/");
        assert_eq!(format!("{s:?}"), "\"amqp://a:****@h/\"");
    }
}
