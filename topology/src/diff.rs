//! Comparing a live broker (through the management API) with the declared topology.

use crate::management::{Management, ManagementError, encode_vhost};
use crate::model::Topology;
use contract::{COMMANDS, Domain, EVENTS};
use serde_json::Value;
use std::collections::BTreeSet;
use std::fmt;

/// One way in which the live broker differs from the declared topology.
#[derive(Debug, Clone, PartialEq)]
pub enum Drift {
    MissingExchange(String),
    ExchangeType {
        exchange: String,
        declared: String,
        live: String,
    },
    MissingQueue(String),
    UnexpectedQueue(String),
    QueueArgument {
        queue: String,
        argument: String,
        declared: Option<Value>,
        live: Option<Value>,
    },
    MissingBinding {
        exchange: String,
        queue: String,
        routing_key: String,
    },
    UnexpectedBinding {
        exchange: String,
        queue: String,
        routing_key: String,
    },
}

impl fmt::Display for Drift {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |v: &Option<Value>| match v {
            Some(v) => v.to_string(),
            None => "(not set)".to_owned(),
        };
        match self {
            Drift::MissingExchange(e) => write!(f, "exchange {e}: missing"),
            Drift::ExchangeType {
                exchange,
                declared,
                live,
            } => write!(
                f,
                "exchange {exchange}: type is {live}, declared {declared}"
            ),
            Drift::MissingQueue(q) => write!(f, "queue {q}: missing"),
            Drift::UnexpectedQueue(q) => write!(f, "queue {q}: exists but is not declared"),
            Drift::QueueArgument {
                queue,
                argument,
                declared,
                live,
            } => write!(
                f,
                "queue {queue}: argument {argument} is {}, declared {}",
                show(live),
                show(declared)
            ),
            Drift::MissingBinding {
                exchange,
                queue,
                routing_key,
            } => write!(f, "binding {exchange} -> {queue} ({routing_key}): missing"),
            Drift::UnexpectedBinding {
                exchange,
                queue,
                routing_key,
            } => write!(
                f,
                "binding {exchange} -> {queue} ({routing_key}): exists but is not declared"
            ),
        }
    }
}

/// Every difference between the live vhost and `declared`, in a stable order.
pub async fn diff(
    api: &Management,
    vhost: &str,
    declared: &Topology,
) -> Result<Vec<Drift>, ManagementError> {
    let v = encode_vhost(vhost);
    let exchanges = api.get(&format!("exchanges/{v}")).await?;
    let queues = api.get(&format!("queues/{v}")).await?;
    let bindings = api.get(&format!("bindings/{v}")).await?;
    Ok(compare(declared, &exchanges, &queues, &bindings))
}

/// The comparison itself, on the management API's JSON, kept pure for tests.
pub fn compare(
    declared: &Topology,
    exchanges: &Value,
    queues: &Value,
    bindings: &Value,
) -> Vec<Drift> {
    let mut drift = Vec::new();
    let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
    let exchanges = list(exchanges);
    let queues = list(queues);
    let bindings = list(bindings);

    for exchange in &declared.exchanges {
        match exchanges.iter().find(|e| e["name"] == exchange.name) {
            None => drift.push(Drift::MissingExchange(exchange.name.to_owned())),
            Some(live) if live["type"] != exchange.kind => drift.push(Drift::ExchangeType {
                exchange: exchange.name.to_owned(),
                declared: exchange.kind.to_owned(),
                live: live["type"].as_str().unwrap_or("?").to_owned(),
            }),
            Some(_) => {}
        }
    }

    for queue in &declared.queues {
        let Some(live) = queues.iter().find(|q| q["name"] == queue.name.as_str()) else {
            drift.push(Drift::MissingQueue(queue.name.clone()));
            continue;
        };
        let empty = serde_json::Map::new();
        let live_args = live["arguments"].as_object().unwrap_or(&empty);
        let names: BTreeSet<&String> = queue.arguments.keys().chain(live_args.keys()).collect();
        for name in names {
            let declared_value = queue.arguments.get(name);
            let live_value = live_args.get(name);
            // The broker reports a classic queue without `x-queue-type`.
            let implied_classic = name == "x-queue-type"
                && live_value.is_none()
                && declared_value.and_then(Value::as_str) == Some("classic");
            if !same(declared_value, live_value) && !implied_classic {
                drift.push(Drift::QueueArgument {
                    queue: queue.name.clone(),
                    argument: name.clone(),
                    declared: declared_value.cloned(),
                    live: live_value.cloned(),
                });
            }
        }
    }
    for live in &queues {
        let name = live["name"].as_str().unwrap_or_default();
        let ours = Domain::of_queue(name).is_some();
        if ours && declared.queue(name).is_none() {
            drift.push(Drift::UnexpectedQueue(name.to_owned()));
        }
    }

    let key = |e: &str, q: &str, k: &str| (e.to_owned(), q.to_owned(), k.to_owned());
    let declared_bindings: BTreeSet<_> = declared
        .bindings
        .iter()
        .map(|b| key(b.exchange, &b.queue, b.routing_key))
        .collect();
    let live_bindings: BTreeSet<_> = bindings
        .iter()
        .filter(|b| b["destination_type"] == "queue")
        .filter(|b| b["source"] == COMMANDS || b["source"] == EVENTS)
        .map(|b| {
            key(
                b["source"].as_str().unwrap_or_default(),
                b["destination"].as_str().unwrap_or_default(),
                b["routing_key"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    for (exchange, queue, routing_key) in declared_bindings.difference(&live_bindings) {
        drift.push(Drift::MissingBinding {
            exchange: exchange.clone(),
            queue: queue.clone(),
            routing_key: routing_key.clone(),
        });
    }
    for (exchange, queue, routing_key) in live_bindings.difference(&declared_bindings) {
        drift.push(Drift::UnexpectedBinding {
            exchange: exchange.clone(),
            queue: queue.clone(),
            routing_key: routing_key.clone(),
        });
    }
    drift
}

/// JSON equality where numbers compare by value (`5000` equals `5000.0`).
fn same(a: Option<&Value>, b: Option<&Value>) -> bool {
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x.as_f64() == y.as_f64(),
        (a, b) => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::RetryDelays;
    use serde_json::json;

    fn live_copy(t: &Topology) -> (Value, Value, Value) {
        let d = t.definitions("/");
        let bindings = d["bindings"]
            .as_array()
            .map(|bs| {
                bs.iter()
                    .map(|b| {
                        let mut b = b.clone();
                        b["destination_type"] = json!("queue");
                        b
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        (d["exchanges"].clone(), d["queues"].clone(), json!(bindings))
    }

    #[test]
    fn an_identical_broker_has_no_drift() {
        let t = Topology::contract(&RetryDelays::contract_default());
        let (e, q, b) = live_copy(&t);
        assert_eq!(compare(&t, &e, &q, &b), vec![]);
    }

    #[test]
    fn a_changed_argument_and_a_missing_queue_are_named() {
        let t = Topology::contract(&RetryDelays::contract_default());
        let (e, mut q, b) = live_copy(&t);
        let queues = q.as_array_mut().expect("array");
        queues.retain(|q| q["name"] != "payment.dead");
        for queue in queues.iter_mut() {
            if queue["name"] == "inventory.retry.1" {
                queue["arguments"]["x-message-ttl"] = json!(2000);
            }
        }
        let drift = compare(&t, &e, &q, &b);
        assert_eq!(drift.len(), 2, "{drift:?}");
        assert!(drift.contains(&Drift::MissingQueue("payment.dead".into())));
        assert!(drift.contains(&Drift::QueueArgument {
            queue: "inventory.retry.1".into(),
            argument: "x-message-ttl".into(),
            declared: Some(json!(1000)),
            live: Some(json!(2000)),
        }));
        assert_eq!(
            drift[1].to_string(),
            "queue payment.dead: missing".to_string()
        );
    }
}
