//! The declared topology: exchanges, queues with their arguments, bindings.
//!
//! The same value is declared on a live broker (`declare`), written as a
//! definitions file (`export`) and compared with a live broker (`diff`), so
//! the three can never disagree about what the contract topology is.

use crate::retry::RetryDelays;
use contract::{BINDINGS, COMMANDS, Domain, EVENTS};
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// How often a quorum work queue redelivers one message before the broker
/// itself dead-letters it. The runtime dead-letters earlier (see
/// `runtime/src/worker/single.rs`, after a few handler starts) with full headers; this
/// is the backstop for a message that kills its worker before the runtime
/// can look at it. It is high because the broker also counts the messages
/// returned from a stopping worker's prefetch buffer.
pub const DELIVERY_LIMIT: i64 = 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub name: &'static str,
    pub kind: &'static str,
}

/// A queue and the exact arguments it is declared with. Arguments are JSON
/// values because that is how the management API and definitions files
/// speak about them; `declare` converts them to AMQP field values.
#[derive(Debug, Clone, PartialEq)]
pub struct Queue {
    pub name: String,
    pub arguments: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Binding {
    pub exchange: &'static str,
    pub queue: String,
    pub routing_key: &'static str,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub exchanges: Vec<Exchange>,
    pub queues: Vec<Queue>,
    pub bindings: Vec<Binding>,
}

impl Topology {
    /// The whole contract topology for the given retry tiers.
    pub fn contract(retry: &RetryDelays) -> Self {
        let exchanges = vec![
            Exchange {
                name: COMMANDS,
                kind: "topic",
            },
            Exchange {
                name: EVENTS,
                kind: "topic",
            },
        ];
        let mut queues = Vec::new();
        for domain in Domain::ALL {
            queues.push(work_queue(domain));
            for (tier, delay) in retry.iter() {
                queues.push(retry_tier(
                    domain.retry_queue(tier),
                    domain,
                    delay.as_millis(),
                ));
            }
            queues.push(dead_queue(domain));
        }
        Self {
            exchanges,
            queues,
            bindings: bindings(),
        }
    }

    /// The part of the topology one domain's worker needs: the exchanges,
    /// its own queues and the bindings into them.
    pub fn for_domain(&self, domain: Domain) -> Self {
        let own = |queue: &str| Domain::of_queue(queue) == Some(domain);
        Self {
            exchanges: self.exchanges.clone(),
            queues: self
                .queues
                .iter()
                .filter(|q| own(&q.name))
                .cloned()
                .collect(),
            bindings: self
                .bindings
                .iter()
                .filter(|b| own(&b.queue))
                .cloned()
                .collect(),
        }
    }

    pub fn queue(&self, name: &str) -> Option<&Queue> {
        self.queues.iter().find(|q| q.name == name)
    }

    /// A RabbitMQ definitions document for `vhost`, importable in the
    /// management UI or loaded at broker start (`load_definitions`).
    pub fn definitions(&self, vhost: &str) -> Value {
        json!({
            "rabbit_version": "3.10",
            "vhosts": [{ "name": vhost }],
            "exchanges": self.exchanges.iter().map(|e| json!({
                "name": e.name,
                "vhost": vhost,
                "type": e.kind,
                "durable": true,
                "auto_delete": false,
                "internal": false,
                "arguments": {},
            })).collect::<Vec<_>>(),
            "queues": self.queues.iter().map(|q| json!({
                "name": q.name,
                "vhost": vhost,
                "durable": true,
                "auto_delete": false,
                "arguments": q.arguments,
            })).collect::<Vec<_>>(),
            "bindings": self.bindings.iter().map(|b| json!({
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            })).collect::<Vec<_>>(),
        })
    }
}

fn quorum_args(dead_letter_to: String) -> BTreeMap<String, Value> {
    BTreeMap::from([
        ("x-queue-type".to_owned(), json!("quorum")),
        // The default exchange routes by queue name, so dead-lettering needs
        // no extra exchange and cannot be misrouted by a binding change.
        ("x-dead-letter-exchange".to_owned(), json!("")),
        (
            "x-dead-letter-routing-key".to_owned(),
            json!(dead_letter_to),
        ),
        // At-least-once dead-lettering: the broker keeps the message until
        // the target queue confirmed it. It requires reject-publish overflow.
        ("x-dead-letter-strategy".to_owned(), json!("at-least-once")),
        ("x-overflow".to_owned(), json!("reject-publish")),
    ])
}

fn work_queue(domain: Domain) -> Queue {
    let mut arguments = quorum_args(domain.dead_queue());
    arguments.insert("x-delivery-limit".to_owned(), json!(DELIVERY_LIMIT));
    Queue {
        name: domain.queue().to_owned(),
        arguments,
    }
}

/// A retry tier: holds messages for its TTL, then dead-letters them back
/// into the work queue.
fn retry_tier(name: String, domain: Domain, ttl_ms: u128) -> Queue {
    let mut arguments = quorum_args(domain.queue().to_owned());
    arguments.insert("x-message-ttl".to_owned(), json!(ttl_ms));
    Queue { name, arguments }
}

/// Dead queues are classic queues: `dlq` lists them by consuming without
/// acking and letting the broker return the messages in place, which on a
/// classic queue neither reorders them nor counts a delivery.
fn dead_queue(domain: Domain) -> Queue {
    Queue {
        name: domain.dead_queue(),
        arguments: BTreeMap::from([("x-queue-type".to_owned(), json!("classic"))]),
    }
}

fn bindings() -> Vec<Binding> {
    let mut all: Vec<Binding> = BINDINGS
        .iter()
        .map(|b| Binding {
            exchange: b.exchange,
            queue: b.domain.queue().to_owned(),
            routing_key: b.pattern,
        })
        .collect();
    all.sort();
    all
}

/// Adds a user with full rights on `vhost` to a definitions document. A
/// broker that loads definitions at start creates no default user, so the
/// document must carry the one the services log in with. The password is
/// stored as RabbitMQ's salted SHA-256 hash, never in clear.
pub fn add_user(doc: &mut Value, vhost: &str, name: &str, password: &str) {
    push(
        doc,
        "users",
        json!({
            "name": name,
            "password_hash": password_hash(password),
            "hashing_algorithm": "rabbit_password_hashing_sha256",
            "tags": ["administrator"],
        }),
    );
    push(
        doc,
        "permissions",
        json!({ "user": name, "vhost": vhost, "configure": ".*", "write": ".*", "read": ".*" }),
    );
}

/// Appends `item` to the array `key` of the definitions document.
pub(crate) fn push(doc: &mut Value, key: &str, item: Value) {
    match doc.get_mut(key).and_then(Value::as_array_mut) {
        Some(items) => items.push(item),
        None => doc[key] = json!([item]),
    }
}

/// A password as RabbitMQ's definitions carry it
/// (`rabbit_password_hashing_sha256`): base64 of a 4-byte salt and the
/// SHA-256 of the salt and the password.
pub(crate) fn password_hash(password: &str) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    let salt: [u8; 4] = rand::random();
    let mut hasher = sha2::Sha256::new();
    hasher.update(salt);
    hasher.update(password.as_bytes());
    let mut salted = salt.to_vec();
    salted.extend_from_slice(&hasher.finalize());
    base64::engine::general_purpose::STANDARD.encode(salted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contract_has_every_queue_tier_and_dead_queue() {
        let t = Topology::contract(&RetryDelays::contract_default());
        let names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
        for domain in Domain::ALL {
            assert!(names.contains(&domain.queue()));
            assert!(names.contains(&domain.dead_queue().as_str()));
            for tier in 1..=5 {
                assert!(names.contains(&domain.retry_queue(tier).as_str()));
            }
            assert!(!names.contains(&domain.retry_queue(6).as_str()));
        }
        let tier2 = t.queue("payment.retry.2").expect("tier 2");
        assert_eq!(tier2.arguments["x-message-ttl"], json!(5000));
        assert_eq!(
            tier2.arguments["x-dead-letter-routing-key"],
            json!("payment")
        );
        let work = t.queue("payment").expect("work queue");
        assert_eq!(
            work.arguments["x-dead-letter-routing-key"],
            json!("payment.dead")
        );
        assert_eq!(work.arguments["x-delivery-limit"], json!(DELIVERY_LIMIT));
    }

    #[test]
    fn a_domain_sees_only_its_own_queues() {
        let t = Topology::contract(&RetryDelays::contract_default()).for_domain(Domain::Inventory);
        assert!(t.queues.iter().all(|q| q.name.starts_with("inventory")));
        assert!(t.bindings.iter().all(|b| b.queue == "inventory"));
        assert_eq!(t.exchanges.len(), 2);
    }

    #[test]
    fn definitions_name_the_vhost_everywhere() {
        let t = Topology::contract(&RetryDelays::contract_default());
        let d = t.definitions("shop");
        assert_eq!(d["vhosts"][0]["name"], "shop");
        for key in ["exchanges", "queues", "bindings"] {
            let items = d[key].as_array().expect("array");
            assert!(!items.is_empty());
            assert!(items.iter().all(|i| i["vhost"] == "shop"));
        }
    }
}
