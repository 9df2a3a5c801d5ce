//! Which routing keys reach which domain's work queue. The broker topology
//! (`topology::model`) declares these bindings; decoders (`inbound!`) are
//! checked against them, so that a key routed to a queue whose worker
//! cannot decode it fails a unit test rather than becoming a dead letter.

use crate::names::{COMMANDS, Domain, EVENTS, keys};

/// A binding from a topic exchange into a domain's work queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    pub exchange: &'static str,
    pub domain: Domain,
    /// A topic pattern: words separated by `.`, `*` for exactly one word,
    /// `#` for zero or more.
    pub pattern: &'static str,
}

const fn bind(exchange: &'static str, domain: Domain, pattern: &'static str) -> Binding {
    Binding {
        exchange,
        domain,
        pattern,
    }
}

/// Every binding of the contract.
pub const BINDINGS: &[Binding] = &[
    bind(COMMANDS, Domain::Order, "order.*"),
    bind(EVENTS, Domain::Order, "inventory.*"),
    bind(EVENTS, Domain::Order, "payment.*"),
    bind(COMMANDS, Domain::Inventory, "inventory.*"),
    bind(COMMANDS, Domain::Payment, "payment.*"),
    bind(EVENTS, Domain::Notification, keys::ORDER_CONFIRMED),
    bind(EVENTS, Domain::Notification, keys::ORDER_CANCELLED),
];

/// The domains whose work queue receives a message published on
/// `exchange` with `routing_key`, each once.
pub fn consumers(exchange: &str, routing_key: &str) -> Vec<Domain> {
    let mut domains: Vec<Domain> = BINDINGS
        .iter()
        .filter(|b| b.exchange == exchange && topic_matches(b.pattern, routing_key))
        .map(|b| b.domain)
        .collect();
    domains.sort();
    domains.dedup();
    domains
}

/// Whether a topic exchange routes `routing_key` through `pattern`, as
/// RabbitMQ does.
pub fn topic_matches(pattern: &str, routing_key: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('.').collect();
    let key: Vec<&str> = routing_key.split('.').collect();
    matches_words(&pattern, &key)
}

fn matches_words(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| matches_words(rest, &key[skip..])),
        Some((&word, rest)) => match key.split_first() {
            Some((&k, key_rest)) => (word == "*" || word == k) && matches_words(rest, key_rest),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_the_broker_does() {
        assert!(topic_matches("order.*", "order.place"));
        assert!(topic_matches("order.*", "order.payment-timeout"));
        assert!(!topic_matches("order.*", "order.place.v2"));
        assert!(!topic_matches("order.*", "order"));
        assert!(topic_matches("order.#", "order"));
        assert!(topic_matches("order.#", "order.place.v2"));
        assert!(topic_matches("#", "anything.at.all"));
        assert!(topic_matches("order.confirmed", "order.confirmed"));
        assert!(!topic_matches("order.confirmed", "order.cancelled"));
    }

    #[test]
    fn events_reach_the_saga_and_outcomes_reach_notification() {
        assert_eq!(
            consumers(EVENTS, keys::PAYMENT_CHARGED),
            vec![Domain::Order]
        );
        assert_eq!(
            consumers(EVENTS, keys::ORDER_CONFIRMED),
            vec![Domain::Notification]
        );
        assert_eq!(
            consumers(COMMANDS, keys::INVENTORY_RESERVE),
            vec![Domain::Inventory]
        );
        assert!(consumers(COMMANDS, "shipping.send").is_empty());
        assert!(consumers(EVENTS, "order.placed").is_empty());
    }
}
