//! orderflow's wire contract, the ground floor of the house.
//!
//! Everything another binary, an operator or an acceptance test relies on
//! about the broker is defined here, once: exchange, queue and routing-key
//! names and headers (`names`), which keys reach which domain's queue
//! (`bindings`), the payload types (`payloads`), and the registry that ties
//! each type to its exchange (`registry`). A consumer's decoder is built by
//! [`inbound!`] from the same types, and checks itself against the bindings.
//!
//! This crate does no I/O: it names things and reads bytes.
#![forbid(unsafe_code)]

pub mod bindings;
pub mod message;
pub mod names;
pub mod payloads;
pub mod registry;

pub use bindings::{BINDINGS, Binding};
pub use message::{Inbound, Malformed, Message, decode_json};
pub use names::{COMMANDS, Domain, EVENTS, headers, keys};
pub use payloads::*;
pub use registry::{MESSAGE_TYPES, MessageType};
