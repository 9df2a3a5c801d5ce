//! The alerts (`deploy/prometheus/alerts.yml`) and the dashboard
//! (`deploy/grafana/dashboards/orderflow.json`) watch metrics the binaries
//! really export: every `orderflow_*` series they name, and every label
//! they group or select by, is read off a running worker's and publisher's
//! `/metrics`. (promtool checks their syntax and tests the alerts:
//! `scripts/monitoring.sh`.)
#![allow(clippy::unwrap_used)]

use e2e::{Options, System};
use payment_gateway_sim::Trouble;
use std::collections::BTreeSet;
use std::time::Duration;

/// The sample names a `/metrics` text can hold, from its `# TYPE` lines
/// (a family without samples yet still counts), and its label names.
fn exported(text: &str, names: &mut BTreeSet<String>, labels: &mut BTreeSet<String>) {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            match kind {
                "counter" => {
                    names.insert(format!("{name}_total"));
                }
                "histogram" => {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
                _ => {
                    names.insert(name.to_owned());
                }
            }
        } else if let Some((_, rest)) = line.split_once('{') {
            for pair in rest.split(['}', ',']) {
                if let Some((label, _)) = pair.split_once('=') {
                    labels.insert(label.trim().to_owned());
                }
            }
        }
    }
}

/// `orderflow_*` names in `text`.
fn named(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("orderflow_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        found.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    found
}

/// The label names an expression over `orderflow_*` series groups or
/// selects by: `by (a, b)` and `name{a="…"}`.
fn labels_used(expr: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for (at, _) in expr.match_indices("by (") {
        let inside = &expr[at + 4..];
        let inside = &inside[..inside.find(')').unwrap()];
        used.extend(inside.split(',').map(|l| l.trim().to_owned()));
    }
    for (at, _) in expr.match_indices("orderflow_") {
        let tail = &expr[at..];
        let name_end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        if let Some(selector) = tail[name_end..].strip_prefix('{') {
            let selector = &selector[..selector.find('}').unwrap()];
            used.extend(
                selector
                    .split(',')
                    .filter_map(|m| m.split(['=', '!', '~']).next())
                    .map(|l| l.trim().to_owned()),
            );
        }
    }
    used
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_alerts_and_the_dashboard_watch_metrics_the_binaries_export() {
    // A gateway down long enough to open the payment worker's breaker, and
    // a malformed message: every family then has samples (a family that
    // never had any is not in the text at all).
    let system = System::start(Options {
        payment_metrics: true,
        trouble: Trouble {
            error_rate: 1.0,
            latency_ms: 0,
            ..Trouble::default()
        },
        retry_delays: "100ms,100ms,100ms,100ms,100ms,100ms,100ms,100ms",
        ..Options::default()
    })
    .await;
    let admin = e2e::client_with_token(e2e::ADMIN_TOKEN);
    let worker_metrics = format!("{}/metrics", system.payment_metrics.as_ref().unwrap());
    system.stock("SKU-M", 2).await;
    let id = system.place("SKU-M", 1, "pm_card_visa").await;
    testkit::eventually(
        Duration::from_secs(30),
        "the gateway's breaker in /metrics",
        || async {
            let text = admin
                .get(&worker_metrics)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            text.contains("orderflow_worker_breaker_open{")
        },
    )
    .await;
    system.set_trouble(Trouble::default()).await;
    system.wait_final(&id).await;
    system
        .env
        .publish(
            contract::COMMANDS,
            contract::keys::PAYMENT_CHARGE,
            lapin::BasicProperties::default().with_type("payment.charge".into()),
            b"not json",
        )
        .await;
    testkit::eventually(
        Duration::from_secs(30),
        "the malformed charge dead",
        || async { system.env.depth("payment.dead").await == 1 },
    )
    .await;

    let mut names = BTreeSet::new();
    let mut labels = BTreeSet::new();
    // The publisher's metrics port serves them without a key, and nothing
    // of the API; the API's `/metrics` still takes an admin key.
    let publisher_metrics = system.publisher_metrics.as_ref().unwrap();
    let plain = topology::https::client();
    let unkeyed = plain
        .get(format!("{publisher_metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed.status(), 200);
    assert!(
        unkeyed
            .text()
            .await
            .unwrap()
            .contains("orderflow_publisher_commands_published_total")
    );
    let api = plain
        .get(format!("{publisher_metrics}/orders/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 404);
    let unkeyed_api = plain
        .get(format!("{}/metrics", system.api))
        .send()
        .await
        .unwrap();
    assert_eq!(unkeyed_api.status(), 401);
    for url in [
        format!("{}/metrics", system.api),
        format!("{publisher_metrics}/metrics"),
        format!("{}/metrics", system.payment_metrics.as_ref().unwrap()),
    ] {
        let text = admin.get(&url).send().await.unwrap().text().await.unwrap();
        exported(&text, &mut names, &mut labels);
    }
    // Prometheus adds these to every scraped series.
    labels.extend(["instance".to_owned(), "job".to_owned(), "le".to_owned()]);

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let alerts = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/dashboards/orderflow.json")).unwrap(),
    )
    .unwrap();
    let mut expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .map(|t| t["expr"].as_str().unwrap().to_owned())
        .collect();
    assert!(expressions.len() >= 10, "{expressions:?}");
    // Each alert's expression: from `expr:` to its `for:`.
    let rules: Vec<String> = alerts
        .split("expr:")
        .skip(1)
        .map(|rule| rule.split("for:").next().unwrap().to_owned())
        .collect();
    assert_eq!(rules.len(), 6, "{rules:?}");
    expressions.extend(rules);

    for expr in &expressions {
        for name in named(expr) {
            assert!(
                names.contains(&name),
                "{name} is not exported; exported: {names:?}"
            );
        }
        if expr.contains("orderflow_") && !expr.contains("rabbitmq_") {
            for label in labels_used(expr) {
                assert!(
                    labels.contains(&label),
                    "label {label} (in {expr}) is not exported: {labels:?}"
                );
            }
        }
    }
    system.stop().await;
}
