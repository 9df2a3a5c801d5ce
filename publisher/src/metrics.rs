//! Prometheus metrics of the publisher, served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub command: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub published: Family<CommandLabels, Counter>,
    pub publish_failures: Family<CommandLabels, Counter>,
    pub publish_seconds: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("orderflow_publisher");
        let requests = Family::<RequestLabels, Counter>::default();
        let published = Family::<CommandLabels, Counter>::default();
        let publish_failures = Family::<CommandLabels, Counter>::default();
        let publish_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            requests.clone(),
        );
        registry.register(
            "commands_published",
            "Commands confirmed by the broker",
            published.clone(),
        );
        registry.register(
            "publish_failures",
            "Commands the broker did not confirm",
            publish_failures.clone(),
        );
        registry.register(
            "publish_seconds",
            "Time from publish to broker confirm",
            publish_seconds.clone(),
        );
        Self {
            registry,
            requests,
            published,
            publish_failures,
            publish_seconds,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
