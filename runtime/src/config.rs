//! Typed settings read from the environment, with the contract's local defaults.
//!
//! Every binary builds one settings tree on the shared reader (`settings`):
//! each variable is declared once here or beside the settings that use it,
//! a bad value is refused at start naming the variable, and the effective
//! values are logged with secrets masked.

use std::net::SocketAddr;
use std::time::Duration;
use topology::RetryDelays;
use topology::retry::RETRY_DELAYS;

pub use settings::{
    ConfigError, SecretUrl, Source, Var, at_least, host_port, invalid, mask_password,
};

pub use topology::addresses::{AMQP_URL, amqp_url};
pub const DATABASE_URL: Var = Var::new(
    "DATABASE_URL",
    "postgres://postgres@127.0.0.1:5432/orderflow",
);
pub const INBOX_RETENTION_DAYS: Var = Var::new("INBOX_RETENTION_DAYS", "30");
pub const DEFAULT_AMQP_URL: &str = AMQP_URL.default;
pub const DEFAULT_DATABASE_URL: &str = DATABASE_URL.default;

const PREFETCH: Var = Var::new("PREFETCH", "128");
/// Defaults to the handler's `DEFAULT_CONCURRENCY`.
const CONCURRENCY: Var = Var::optional("CONCURRENCY");
const BATCH_SIZE: Var = Var::new("BATCH_SIZE", "64");
const BATCH_LINGER_MS: Var = Var::new("BATCH_LINGER_MS", "3");
/// Defaults to what the concurrency needs (`WorkerSettings::read`).
const DATABASE_POOL_SIZE: Var = Var::optional("DATABASE_POOL_SIZE");
const OUTBOX_SWEEP_AFTER_MS: Var = Var::new("OUTBOX_SWEEP_AFTER_MS", "5000");
const METRICS_ADDR: Var = Var::optional("METRICS_ADDR");
/// How long a handler (its preparation, its handling, a deadline scan) may
/// take before it is given up on as a transient failure.
const HANDLER_TIMEOUT: Var = Var::new("HANDLER_TIMEOUT", "60s");
/// Failures of one dependency in a row that open its circuit breaker; 0: off.
const BREAKER_THRESHOLD: Var = Var::new("BREAKER_THRESHOLD", "5");
/// How long an open breaker waits before one message goes through as a probe.
const BREAKER_COOLDOWN: Var = Var::new("BREAKER_COOLDOWN", "10s");

/// `DATABASE_URL`, checked only for its scheme: the pool reports the rest.
pub fn database_url(source: &Source) -> Result<SecretUrl, ConfigError> {
    source.secret_url(DATABASE_URL, |url| {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(())
        } else {
            Err("not a postgres:// URL".to_owned())
        }
    })
}

/// `INBOX_RETENTION_DAYS`: how long an inbox remembers an applied message
/// (at least a day).
pub fn inbox_retention(source: &Source) -> Result<Duration, ConfigError> {
    let days: u64 = source.get(INBOX_RETENTION_DAYS)?;
    Ok(Duration::from_secs(days.max(1) * 86_400))
}

/// A `HOST:PORT` to listen on.
pub fn socket_addr(raw: &str) -> Result<SocketAddr, String> {
    raw.parse()
        .map_err(|e| format!("{e} (expected HOST:PORT such as 0.0.0.0:9100)"))
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
    /// The longest a handler may take on a message or a chunk, and its
    /// transaction's statements and lock waits (`HANDLER_TIMEOUT`); past
    /// it the work is given up on as a transient failure.
    pub handler_timeout: Duration,
    /// When a dependency's circuit breaker opens, and for how long
    /// (`BREAKER_THRESHOLD`, `BREAKER_COOLDOWN`).
    pub breaker: crate::BreakerSettings,
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
            handler_timeout = ?self.handler_timeout,
            breaker_threshold = self.breaker.threshold,
            breaker_cooldown = ?self.breaker.cooldown,
            "Effective configuration"
        );
    }

    /// The settings of a worker whose handler is `H`, from the environment;
    /// `CONCURRENCY` defaults to `H::DEFAULT_CONCURRENCY`.
    pub fn from_env_for<H: crate::handler::Handler>() -> Result<Self, ConfigError> {
        Self::read::<H>(&Source::environment())
    }

    /// The settings of a worker whose handler is `H`, from `source`.
    pub fn read<H: crate::handler::Handler>(source: &Source) -> Result<Self, ConfigError> {
        let prefetch: u16 = source.parse(PREFETCH, |raw| {
            let n: u16 = raw.parse().map_err(|e| format!("{e}"))?;
            settings::at_least(n, 1).map_err(|e| format!("{e} (0 would mean unbounded)"))
        })?;
        let concurrency: usize = source
            .optional(CONCURRENCY, |raw| raw.parse().map_err(|e| format!("{e}")))?
            .unwrap_or(H::DEFAULT_CONCURRENCY)
            .clamp(1, prefetch.into());
        let batch_size = source.get::<usize>(BATCH_SIZE)?.clamp(1, prefetch.into());
        let linger_ms: u64 = source.get(BATCH_LINGER_MS)?;
        // One connection per transaction in flight, one for the sweeper and
        // the start counter; at most eight, which keeps four domains times
        // two replicas inside PostgreSQL's default limit of 100.
        let pool: u32 = source
            .optional(DATABASE_POOL_SIZE, |raw| {
                raw.parse().map_err(|e| format!("{e}"))
            })?
            .unwrap_or_else(|| (concurrency as u32 + 2).min(8));
        let sweep_after_ms: u64 = source.get(OUTBOX_SWEEP_AFTER_MS)?;
        Ok(Self {
            amqp_url: amqp_url(source)?,
            database_url: database_url(source)?,
            retry_delays: source.get(RETRY_DELAYS)?,
            prefetch,
            concurrency,
            batch_size,
            batch_linger: Duration::from_millis(linger_ms),
            database_pool_size: pool.max(2),
            outbox_sweep_after: Duration::from_millis(sweep_after_ms),
            inbox_retention: inbox_retention(source)?,
            metrics_addr: source.optional(METRICS_ADDR, socket_addr)?,
            handler_timeout: source.duration(HANDLER_TIMEOUT)?,
            breaker: crate::BreakerSettings {
                threshold: source.get(BREAKER_THRESHOLD)?,
                cooldown: source.duration(BREAKER_COOLDOWN)?,
            },
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

    fn check_amqp_url(url: &str) -> Result<SecretUrl, ConfigError> {
        amqp_url(&Source::from_pairs([("AMQP_URL", url)]))
    }

    #[test]
    fn concurrency_defaults_to_what_the_handler_declares() {
        let unset = Source::default();
        let undeclared = WorkerSettings::read::<Undeclared>(&unset).expect("settings");
        let mailer = WorkerSettings::read::<Mailer>(&unset).expect("settings");
        assert_eq!(undeclared.concurrency, 2);
        assert_eq!(undeclared.database_pool_size, 4);
        assert_eq!(mailer.concurrency, 6);
        assert_eq!(mailer.database_pool_size, 8);
    }

    #[test]
    fn every_bad_worker_variable_is_refused_naming_it() {
        for (name, bad) in [
            ("PREFETCH", "0"),
            ("PREFETCH", "many"),
            ("CONCURRENCY", "-1"),
            ("BATCH_SIZE", "x"),
            ("BATCH_LINGER_MS", "3ms"),
            ("DATABASE_POOL_SIZE", "big"),
            ("OUTBOX_SWEEP_AFTER_MS", "soon"),
            ("INBOX_RETENTION_DAYS", "forever"),
            ("METRICS_ADDR", "9100"),
            ("HANDLER_TIMEOUT", "forever"),
            ("RETRY_DELAYS", "1s,x"),
            ("DATABASE_URL", "mysql://db/x"),
        ] {
            let source = Source::from_pairs([(name, bad)]);
            let e = WorkerSettings::read::<Undeclared>(&source).expect_err(name);
            let expected = format!("{name}={bad:?} is not valid: ");
            assert!(e.to_string().starts_with(&expected), "{e}");
        }
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
}
