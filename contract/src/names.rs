//! Every exchange, queue and routing-key name of the contract, defined once.
//!
//! Nothing outside this crate spells a broker name as a string literal: the
//! names are what operators see in the management UI and what acceptance
//! tests rely on, so one typo elsewhere would be a silent contract break.
//! A domain also names the worker that consumes its queue and the database
//! schema that worker owns, which `dlq` reads to decide what was applied.

use std::fmt;

/// Topic exchange for commands: "do this" (`order.place`, `inventory.reserve`).
pub const COMMANDS: &str = "commands";
/// Topic exchange for events: "this happened" (`inventory.reserved`, `order.confirmed`).
pub const EVENTS: &str = "events";

/// A domain owns one work queue, its retry tiers and its dead queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    Order,
    Inventory,
    Payment,
    Notification,
}

impl Domain {
    pub const ALL: [Domain; 4] = [
        Domain::Order,
        Domain::Inventory,
        Domain::Payment,
        Domain::Notification,
    ];

    /// The name of the domain's work queue, which is also the domain's name.
    pub const fn queue(self) -> &'static str {
        match self {
            Domain::Order => "order",
            Domain::Inventory => "inventory",
            Domain::Payment => "payment",
            Domain::Notification => "notification",
        }
    }

    /// The worker binary that consumes the domain's queue; also its inbox
    /// consumer name and the prefix of its connection names.
    pub const fn worker(self) -> &'static str {
        match self {
            Domain::Order => "order-worker",
            Domain::Inventory => "inventory-worker",
            Domain::Payment => "payment-worker",
            Domain::Notification => "notification-worker",
        }
    }

    /// The PostgreSQL schema the domain's worker owns.
    pub const fn schema(self) -> &'static str {
        match self {
            Domain::Order => "orders",
            Domain::Inventory => "inventory",
            Domain::Payment => "payments",
            Domain::Notification => "notifications",
        }
    }

    /// Retry tier `n` (1-based) of the domain's work queue.
    pub fn retry_queue(self, tier: usize) -> String {
        retry_queue(self.queue(), tier)
    }

    /// The domain's dead queue.
    pub fn dead_queue(self) -> String {
        dead_queue(self.queue())
    }

    /// Which domain a work, retry or dead queue belongs to.
    pub fn of_queue(queue: &str) -> Option<Domain> {
        let head = queue.split('.').next()?;
        Domain::ALL.into_iter().find(|d| d.queue() == head)
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.queue())
    }
}

/// `Q.retry.N`: where a message waits before attempt `N + 1`.
pub fn retry_queue(queue: &str, tier: usize) -> String {
    format!("{queue}.retry.{tier}")
}

/// `Q.dead`: where a message rests once it can no longer be processed.
pub fn dead_queue(queue: &str) -> String {
    format!("{queue}.dead")
}

/// The work queue a dead queue belongs to (`inventory.dead` → `inventory`).
pub fn work_queue_of_dead(dead: &str) -> Option<&str> {
    dead.strip_suffix(".dead")
}

/// Routing keys, `<domain>.<verb>`, defined with their message types in
/// the registry (`registry.rs`). Commands travel on [`COMMANDS`], events on
/// [`EVENTS`].
pub use crate::registry::keys;

/// Message headers of the contract.
pub mod headers {
    /// Which attempt this delivery is, starting at 1; counted by the runtime
    /// because the broker's `x-death` count does not survive republishing.
    pub const ATTEMPT: &str = "x-attempt";
    pub const ERROR_KIND: &str = "x-error-kind";
    pub const ERROR: &str = "x-error";
    pub const ATTEMPTS: &str = "x-attempts";
    pub const FIRST_FAILED_AT: &str = "x-first-failed-at";
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// A dead copy's original `expiration`: the copy itself has none, so
    /// that it cannot expire out of the dead queue unseen.
    pub const ORIGINAL_EXPIRATION: &str = "x-original-expiration";
    /// How many times `dlq replay` has put this message back.
    pub const REPLAYS: &str = "x-replays";
    pub const TRACEPARENT: &str = "traceparent";
    /// Set by the broker on quorum-queue redeliveries.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Set by the broker when it dead-letters a message.
    pub const DEATH: &str = "x-death";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(Domain::Inventory.queue(), "inventory");
        assert_eq!(Domain::Inventory.retry_queue(2), "inventory.retry.2");
        assert_eq!(Domain::Payment.dead_queue(), "payment.dead");
        assert_eq!(work_queue_of_dead("payment.dead"), Some("payment"));
        assert_eq!(Domain::of_queue("order.retry.3"), Some(Domain::Order));
        assert_eq!(Domain::of_queue("shipping"), None);
    }
}
