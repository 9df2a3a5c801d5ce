//! The thin HTTP producer: the only component that speaks HTTP to clients.
#![forbid(unsafe_code)]

pub mod auth;
pub mod domain;
pub mod error;
pub mod metrics;
pub mod routes;
pub mod settings;
pub mod shedding;
pub mod startup;

pub use settings::PublisherSettings;
pub use startup::Application;
