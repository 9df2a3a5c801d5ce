//! One broker user per binary, with the least it needs: RabbitMQ's
//! configure/write/read patterns on exchanges and queues, and topic
//! permissions on the routing keys it may publish. Applied by `topology
//! apply --users` through the management API (the operator's own user
//! creates them); each binary then connects as its user.
//!
//! What each may publish is the contract's: the publisher only its
//! commands, each worker only the messages it emits, so that a stolen
//! publisher password cannot publish `payment.charged` and confirm an
//! unpaid order. Workers also write to the default exchange (their retry
//! tiers and dead queue are reached through it), which RabbitMQ cannot
//! restrict by routing key: that is the reach a worker's password gives
//! beyond its own keys.

use crate::management::{Management, ManagementError, encode_vhost};
use crate::model::{password_hash, push};
use contract::{COMMANDS, Domain, EVENTS, keys};
use serde_json::json;

/// A binary's broker user and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The binary, and the user's name (after the deployment's prefix).
    pub binary: &'static str,
    /// Where `topology apply --users` reads the user's password.
    pub password_var: &'static str,
    pub configure: String,
    pub write: String,
    pub read: String,
    /// Per topic exchange: the routing keys it may publish and bind.
    pub topics: Vec<TopicPermission>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPermission {
    pub exchange: &'static str,
    pub write: String,
    pub read: String,
}

/// A regex that matches exactly one of `names`; `^$` (nothing) for none.
fn exactly(names: &[&str]) -> String {
    if names.is_empty() {
        return "^$".to_owned();
    }
    let escaped: Vec<String> = names.iter().map(|n| n.replace('.', "\\.")).collect();
    format!("^({})$", escaped.join("|"))
}

/// A domain's queues: its work queue, retry tiers and dead queue.
fn queues_of(domain: Domain) -> String {
    let q = domain.queue().replace('.', "\\.");
    format!("{q}|{q}\\.retry\\.[0-9]+|{q}\\.dead")
}

/// The default exchange, as permissions name it.
const DEFAULT_EXCHANGE: &str = "amq\\.default";

/// What a worker of `domain` emits, on `commands` and on `events`.
fn emitted_by(domain: Domain) -> (&'static [&'static str], &'static [&'static str]) {
    match domain {
        Domain::Order => (
            &[
                keys::INVENTORY_RESERVE,
                keys::INVENTORY_RELEASE,
                keys::INVENTORY_COMMIT,
                keys::PAYMENT_CHARGE,
                keys::PAYMENT_REFUND,
            ],
            &[keys::ORDER_CONFIRMED, keys::ORDER_CANCELLED],
        ),
        Domain::Inventory => (
            &[],
            &[
                keys::INVENTORY_RESERVED,
                keys::INVENTORY_OUT_OF_STOCK,
                keys::INVENTORY_RELEASED,
            ],
        ),
        Domain::Payment => (
            &[],
            &[
                keys::PAYMENT_CHARGED,
                keys::PAYMENT_DECLINED,
                keys::PAYMENT_REFUNDED,
            ],
        ),
        Domain::Notification => (&[], &[]),
    }
}

/// The binding keys of `domain`'s queue on `exchange`, as a read pattern.
fn bound_by(domain: Domain, exchange: &str) -> String {
    let patterns: Vec<&str> = contract::BINDINGS
        .iter()
        .filter(|b| b.domain == domain && b.exchange == exchange)
        .map(|b| b.pattern)
        .collect();
    // `*` and `#` are literal characters of a binding key.
    let escaped: Vec<String> = patterns
        .iter()
        .map(|p| {
            p.replace('.', "\\.")
                .replace('*', "\\*")
                .replace('#', "\\#")
        })
        .collect();
    if escaped.is_empty() {
        "^$".to_owned()
    } else {
        format!("^({})$", escaped.join("|"))
    }
}

/// Every binary's identity.
pub fn identities() -> Vec<Identity> {
    let mut all = vec![Identity {
        binary: "publisher",
        password_var: "AMQP_PASSWORD_PUBLISHER",
        configure: "^$".to_owned(),
        write: exactly(&[COMMANDS]),
        // Consumes nothing; the backlog watcher's passive declare of the
        // order queue needs no permission.
        read: "^$".to_owned(),
        topics: vec![
            TopicPermission {
                exchange: COMMANDS,
                write: exactly(&[
                    keys::ORDER_PLACE,
                    keys::ORDER_CANCEL,
                    keys::ORDER_SET_PRICE,
                    keys::INVENTORY_RESTOCK,
                ]),
                read: "^$".to_owned(),
            },
            TopicPermission {
                exchange: EVENTS,
                write: "^$".to_owned(),
                read: "^$".to_owned(),
            },
        ],
    }];
    for domain in Domain::ALL {
        let queues = queues_of(domain);
        let exchanges = format!("{}|{}", COMMANDS, EVENTS);
        let (commands, events) = emitted_by(domain);
        all.push(Identity {
            binary: domain.worker(),
            password_var: match domain {
                Domain::Order => "AMQP_PASSWORD_ORDER_WORKER",
                Domain::Inventory => "AMQP_PASSWORD_INVENTORY_WORKER",
                Domain::Payment => "AMQP_PASSWORD_PAYMENT_WORKER",
                Domain::Notification => "AMQP_PASSWORD_NOTIFICATION_WORKER",
            },
            // Declares the exchanges and its own queues at start.
            configure: format!("^({exchanges}|{queues})$"),
            // Binds its queues, publishes what it emits, and moves
            // messages to its tiers and dead queue (default exchange).
            write: format!("^({exchanges}|{DEFAULT_EXCHANGE}|{queues})$"),
            read: format!("^({exchanges}|{queues})$"),
            topics: vec![
                TopicPermission {
                    exchange: COMMANDS,
                    write: exactly(commands),
                    read: bound_by(domain, COMMANDS),
                },
                TopicPermission {
                    exchange: EVENTS,
                    write: exactly(events),
                    read: bound_by(domain, EVENTS),
                },
            ],
        });
    }
    let dead: Vec<String> = Domain::ALL
        .iter()
        .map(|d| d.dead_queue().replace('.', "\\."))
        .collect();
    all.push(Identity {
        binary: "dlq",
        password_var: "AMQP_PASSWORD_DLQ",
        configure: "^$".to_owned(),
        // Replays to the exchange a message was first published to, and
        // restores purged messages to their dead queue.
        write: format!(
            "^({COMMANDS}|{EVENTS}|{DEFAULT_EXCHANGE}|{})$",
            dead.join("|")
        ),
        read: format!("^({})$", dead.join("|")),
        topics: vec![
            TopicPermission {
                exchange: COMMANDS,
                write: ".*".to_owned(),
                read: "^$".to_owned(),
            },
            TopicPermission {
                exchange: EVENTS,
                write: ".*".to_owned(),
                read: "^$".to_owned(),
            },
        ],
    });
    all
}

impl Identity {
    /// Adds the user `prefix` + binary, with `password`, its permissions on
    /// `vhost` and its topic permissions, to a definitions document (for a
    /// broker that loads its definitions at start).
    pub fn add_to_definitions(
        &self,
        doc: &mut serde_json::Value,
        vhost: &str,
        prefix: &str,
        password: &str,
    ) {
        let user = format!("{prefix}{}", self.binary);
        push(
            doc,
            "users",
            json!({
                "name": user,
                "password_hash": password_hash(password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": [],
            }),
        );
        push(
            doc,
            "permissions",
            json!({ "user": user, "vhost": vhost, "configure": self.configure, "write": self.write, "read": self.read }),
        );
        for topic in &self.topics {
            push(
                doc,
                "topic_permissions",
                json!({ "user": user, "vhost": vhost, "exchange": topic.exchange, "write": topic.write, "read": topic.read }),
            );
        }
    }

    /// Creates or updates the user `prefix` + binary with `password` and
    /// sets its permissions on `vhost`.
    pub async fn apply(
        &self,
        api: &Management,
        vhost: &str,
        prefix: &str,
        password: &str,
    ) -> Result<(), ManagementError> {
        let user = format!("{prefix}{}", self.binary);
        let encoded_user = encode_vhost(&user);
        let vhost = encode_vhost(vhost);
        api.put(
            &format!("users/{encoded_user}"),
            &json!({ "password": password, "tags": "" }),
        )
        .await?;
        api.put(
            &format!("permissions/{vhost}/{encoded_user}"),
            &json!({ "configure": self.configure, "write": self.write, "read": self.read }),
        )
        .await?;
        for topic in &self.topics {
            api.put(
                &format!("topic-permissions/{vhost}/{encoded_user}"),
                &json!({ "exchange": topic.exchange, "write": topic.write, "read": topic.read }),
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(binary: &str) -> Identity {
        identities()
            .into_iter()
            .find(|i| i.binary == binary)
            .unwrap_or_else(|| panic!("no identity {binary}"))
    }

    #[test]
    fn every_binary_that_speaks_amqp_has_an_identity_with_its_password_variable() {
        let names: Vec<&str> = identities().iter().map(|i| i.binary).collect();
        for domain in Domain::ALL {
            assert!(names.contains(&domain.worker()), "{names:?}");
        }
        assert!(names.contains(&"publisher") && names.contains(&"dlq"));
        for identity in identities() {
            let expected = format!(
                "AMQP_PASSWORD_{}",
                identity.binary.to_ascii_uppercase().replace('-', "_")
            );
            assert_eq!(identity.password_var, expected);
        }
    }

    #[test]
    fn a_worker_may_publish_only_what_it_emits() {
        let payment = of("payment-worker");
        let events = payment.topics.iter().find(|t| t.exchange == EVENTS);
        let events = events.map(|t| t.write.clone()).unwrap_or_default();
        assert!(events.contains("payment\\.charged"), "{events}");
        assert!(!events.contains("order"), "{events}");
        let publisher = of("publisher");
        assert_eq!(publisher.configure, "^$");
        assert!(
            publisher
                .topics
                .iter()
                .all(|t| !t.write.contains("payment"))
        );
    }
}
