//! The orderflow messaging runtime.
//!
//! Every worker binary stands on this crate: connections with recovery, a
//! publisher with confirms, the consumer loop with bounded concurrency, the
//! handler API, retry tiers and dead-lettering, the inbox and the
//! transactional outbox, migrations, settings, logging and shutdown.
//! Domain handlers use only [`Handler`], [`Context`] and [`Failure`]; they
//! never touch channels, acks or retry plumbing.
#![forbid(unsafe_code)]

mod acks;
pub mod breaker;
pub mod broker;
mod chunks;
pub mod config;
pub mod db;
pub mod envelope;
pub mod handler;
pub mod health;
pub mod metrics;
pub mod routing;
pub mod shutdown;
pub mod store;
pub mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;
pub mod worker;

pub use breaker::BreakerSettings;
pub use broker::{PublishError, Publisher};
pub use config::{SecretUrl, WorkerSettings};
pub use envelope::{Envelope, Inbound, Malformed, Message, Outgoing, decode_json};
pub use handler::{Context, Dependency, Failure, Fresh, Handler, Together};
pub use routing::DeadKind;
pub use worker::{Worker, WorkerSpec};
