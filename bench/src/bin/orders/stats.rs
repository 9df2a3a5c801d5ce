//! Reading the run: latency percentiles and stages, peak memory, the
//! workers' counts.

use std::collections::HashMap;
use std::time::Duration;

pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The stages of an order between its POST and its email, each named with
/// the hops and handlers it spans, and the status that ends it.
const STAGES: [(&str, &str); 4] = [
    ("POST → PENDING (publisher, order.place, saga)", "PENDING"),
    (
        "PENDING → STOCK_RESERVED (inventory.reserve, inventory, inventory.reserved, saga)",
        "STOCK_RESERVED",
    ),
    (
        "STOCK_RESERVED → PAID (payment.charge, gateway, payment, payment.charged, saga)",
        "PAID",
    ),
    ("PAID → CONFIRMED (the same transaction)", "CONFIRMED"),
];

/// Milliseconds each order spent in each stage, from the wall-clock times
/// (seconds) of its events and of its POST and email (`ends`), for the
/// orders that went the whole way; the last stage is CONFIRMED → email.
pub fn stage_times(
    events: &[(String, String, f64)],
    ends: &HashMap<String, (f64, f64)>,
) -> Vec<(String, Vec<f64>)> {
    let mut at: HashMap<&str, HashMap<&str, f64>> = HashMap::new();
    for (order, status, t) in events {
        at.entry(order.as_str())
            .or_default()
            .insert(status.as_str(), *t);
    }
    let mut times: Vec<(String, Vec<f64>)> = STAGES
        .iter()
        .map(|(name, _)| ((*name).to_owned(), Vec::new()))
        .chain([(
            "CONFIRMED → email (order.confirmed, notification, SMTP)".to_owned(),
            Vec::new(),
        )])
        .collect();
    for (order, (posted, emailed)) in ends {
        let Some(statuses) = at.get(order.as_str()) else {
            continue;
        };
        let mut path = vec![*posted];
        for (_, status) in STAGES {
            match statuses.get(status) {
                Some(t) => path.push(*t),
                None => break,
            }
        }
        if path.len() != STAGES.len() + 1 {
            continue;
        }
        path.push(*emailed);
        for (i, pair) in path.windows(2).enumerate() {
            times[i].1.push((pair[1] - pair[0]) * 1e3);
        }
    }
    times
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The orders POSTed in one second of the measured run, and their
/// POST→email latency.
#[derive(Debug, PartialEq, Eq)]
pub struct SecondOfRun {
    /// Seconds since the first measured POST.
    pub second: u64,
    pub orders: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// The measured orders grouped by the second of the run they were POSTed
/// in: how many, and their POST→email p50, p99 and maximum. Slow orders
/// spread over every second are a busy machine; slow orders bunched in a
/// few seconds are a stall (a checkpoint, a periodic job, a pause).
pub fn latency_by_second(ends: &[(Duration, Duration)]) -> Vec<SecondOfRun> {
    let mut seconds: std::collections::BTreeMap<u64, Vec<Duration>> = Default::default();
    for (posted, latency) in ends {
        seconds.entry(posted.as_secs()).or_default().push(*latency);
    }
    seconds
        .into_iter()
        .map(|(second, mut latencies)| {
            latencies.sort();
            let max = latencies.last().copied().unwrap_or_default();
            SecondOfRun {
                second,
                orders: latencies.len(),
                p50: percentile(&latencies, 0.5),
                p99: percentile(&latencies, 0.99),
                max,
            }
        })
        .collect()
}

/// `orderflow_worker_messages_total` of one worker's `/metrics`, by outcome.
pub fn outcomes(metrics: &str) -> Vec<(String, u64)> {
    metrics
        .lines()
        .filter(|l| l.starts_with("orderflow_worker_messages_total{"))
        .filter_map(|l| {
            let outcome = l.split("outcome=\"").nth(1)?.split('"').next()?;
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((outcome.to_owned(), n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcomes_are_read_from_a_worker_s_metrics() {
        let text = "# TYPE orderflow_worker_messages counter\n\
            orderflow_worker_messages_total{worker=\"order-worker\",outcome=\"applied\"} 12\n\
            orderflow_worker_messages_total{worker=\"order-worker\",outcome=\"duplicate\"} 1\n\
            orderflow_worker_dead_letters_total{worker=\"order-worker\",kind=\"malformed\"} 3\n";
        assert_eq!(
            outcomes(text),
            vec![("applied".to_owned(), 12), ("duplicate".to_owned(), 1)]
        );
    }

    fn event(order: &str, status: &str, at: f64) -> (String, String, f64) {
        (order.to_owned(), status.to_owned(), at)
    }

    /// An order that went the whole way gives one time per stage; one
    /// without all its events (cancelled, or not yet final) gives none.
    #[test]
    fn stage_times_span_post_to_email_and_skip_orders_that_did_not_go_the_whole_way() {
        let events = [
            event("a", "PENDING", 10.010),
            event("a", "STOCK_RESERVED", 10.030),
            event("a", "PAID", 10.060),
            event("a", "CONFIRMED", 10.060),
            event("b", "PENDING", 10.020),
            event("b", "CANCELLED", 10.040),
        ];
        let ends = HashMap::from([
            ("a".to_owned(), (10.0, 10.070)),
            ("b".to_owned(), (10.0, 10.050)),
            ("c".to_owned(), (10.0, 10.050)),
        ]);
        let times = stage_times(&events, &ends);
        assert_eq!(times.len(), STAGES.len() + 1);
        let each: Vec<Vec<i64>> = times
            .iter()
            .map(|(_, ms)| ms.iter().map(|m| m.round() as i64).collect())
            .collect();
        assert_eq!(each, [vec![10], vec![20], vec![30], vec![0], vec![10]]);
    }

    #[test]
    fn latencies_are_grouped_by_the_second_of_their_post() {
        let ms = Duration::from_millis;
        let ends = [
            (ms(100), ms(30)),
            (ms(900), ms(10)),
            (ms(2_500), ms(200)),
            (ms(999), ms(20)),
        ];
        let seconds = latency_by_second(&ends);
        assert_eq!(
            seconds,
            [
                SecondOfRun {
                    second: 0,
                    orders: 3,
                    p50: ms(20),
                    p99: ms(30),
                    max: ms(30),
                },
                SecondOfRun {
                    second: 2,
                    orders: 1,
                    p50: ms(200),
                    p99: ms(200),
                    max: ms(200),
                },
            ]
        );
    }
}
