//! Logging set-up shared by every binary, read like the rest of its
//! configuration: a bad `RUST_LOG` or `LOG_FORMAT` is refused at start.

use settings::{ConfigError, Source, Var};
use tracing_subscriber::EnvFilter;

/// The log filter; unset, the binary's default (`info`, `warn` for `dlq`).
const RUST_LOG: Var = Var::optional("RUST_LOG");
/// `text`, or `json`: one JSON object per line, for log shippers.
const LOG_FORMAT: Var = Var::new("LOG_FORMAT", "text");

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), formatted by
/// `LOG_FORMAT`.
pub fn init() -> Result<(), ConfigError> {
    init_with_default("info")
}

/// As [`init`], with another filter when `RUST_LOG` is unset.
pub fn init_with_default(default: &str) -> Result<(), ConfigError> {
    let source = Source::environment();
    let filter = source
        .optional(RUST_LOG, |raw| {
            EnvFilter::try_new(raw).map_err(|e| {
                format!("not a log filter such as info or orderflow=debug,lapin=warn: {e}")
            })
        })?
        .unwrap_or_else(|| EnvFilter::new(default));
    let json = source.parse(LOG_FORMAT, |raw| match raw {
        "text" => Ok(false),
        "json" => Ok(true),
        _ => Err("must be text or json".to_owned()),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
    // A second init (tests) keeps the first subscriber; that is fine.
    drop(result);
    Ok(())
}
