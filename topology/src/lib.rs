//! The orderflow broker topology as data.
//!
//! The names it declares come from the `contract` crate. It knows nothing
//! about SQL, HTTP clients of the shop, or domain rules; its only HTTP is the RabbitMQ management API used by `diff`.
#![forbid(unsafe_code)]

pub mod addresses;
pub mod declare;
pub mod diff;
pub mod https;
pub mod identities;
pub mod management;
pub mod model;
pub mod report;
pub mod retry;

pub use addresses::{AddressError, BrokerAddresses};
pub use declare::{Mismatch, declare, queue_depth};
pub use diff::{Drift, diff};
pub use management::Management;
pub use model::{DELIVERY_LIMIT, Topology};
pub use retry::RetryDelays;
