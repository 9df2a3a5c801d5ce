//! Load shedding, so that a flood waits at its clients, not in the broker:
//!
//! - a token bucket per caller (`RATE_LIMIT_PER_KEY`, `RATE_LIMIT_BURST`):
//!   past it, `429` with `Retry-After`, whatever the endpoint;
//! - new orders refused with `503` and `Retry-After` while the `order`
//!   queue holds more than `MAX_BACKLOG` messages. The depth is read once a
//!   second on a connection of its own (a passive declare), never per
//!   request; a reading older than a few seconds sheds nothing, so a lost
//!   watcher never stops orders.

use crate::auth::Caller;
use crate::error::ApiError;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use runtime::config::{ConfigError, Source, Var};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const RATE_LIMIT_PER_KEY: Var = Var::new("RATE_LIMIT_PER_KEY", "1000/s");
/// Defaults to one second's worth of the rate.
const RATE_LIMIT_BURST: Var = Var::optional("RATE_LIMIT_BURST");
const MAX_BACKLOG: Var = Var::new("MAX_BACKLOG", "100000");

/// How often the backlog is read, and how old a reading may be to count.
const BACKLOG_POLL: Duration = Duration::from_secs(1);
const BACKLOG_FRESH: Duration = Duration::from_secs(5);
/// What a client is told to wait when the backlog is too long.
const BACKLOG_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The limits, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SheddingSettings {
    /// Requests per period and key, and the burst; `None`: unlimited.
    pub rate: Option<Rate>,
    /// Messages waiting in the `order` queue past which new orders are
    /// refused; `None`: never.
    pub max_backlog: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub requests: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

impl SheddingSettings {
    pub fn read(source: &Source) -> Result<Self, ConfigError> {
        let rate = source.parse(RATE_LIMIT_PER_KEY, parse_rate)?;
        let burst = source.optional(RATE_LIMIT_BURST, |raw| {
            raw.parse::<NonZeroU32>()
                .map_err(|_| "expected a whole number of requests, at least 1".to_owned())
        })?;
        let rate = rate.map(|(requests, per)| Rate {
            requests,
            per,
            burst: burst.unwrap_or_else(|| one_second_of(requests, per)),
        });
        let max_backlog = source.parse(MAX_BACKLOG, |raw| match raw {
            "off" => Ok(None),
            n => n
                .parse::<u64>()
                .map(Some)
                .map_err(|_| "expected a number of messages, or off".to_owned()),
        })?;
        Ok(Self { rate, max_backlog })
    }

    pub fn describe(&self) -> String {
        let rate = match &self.rate {
            Some(r) => format!("{}/{:?} burst {}", r.requests, r.per, r.burst),
            None => "off".to_owned(),
        };
        let backlog = self
            .max_backlog
            .map_or_else(|| "off".to_owned(), |n| n.to_string());
        format!("rate_limit_per_key={rate} max_backlog={backlog}")
    }
}

/// `200/s`, `12000/m`, `100000/h`, or `off`.
fn parse_rate(raw: &str) -> Result<Option<(NonZeroU32, Duration)>, String> {
    if raw == "off" {
        return Ok(None);
    }
    let expected = || "expected requests per s, m or h (such as 200/s), or off".to_owned();
    let (n, unit) = raw.split_once('/').ok_or_else(expected)?;
    let n: NonZeroU32 = n.trim().parse().map_err(|_| expected())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(expected()),
    };
    Ok(Some((n, per)))
}

/// The requests one second of `requests` per `per` allows, at least one.
fn one_second_of(requests: NonZeroU32, per: Duration) -> NonZeroU32 {
    let per_second = f64::from(requests.get()) / per.as_secs_f64();
    // Rounded up and at least 1; at most the u32 range.
    let n = per_second.ceil().clamp(1.0, f64::from(u32::MAX)) as u32;
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

/// The limits in force.
pub struct Shedding {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    /// Checks since the limiter last forgot full buckets.
    checks: AtomicU64,
    clock: DefaultClock,
    max_backlog: Option<u64>,
    backlog: Backlog,
}

impl std::fmt::Debug for Shedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shedding")
            .field("max_backlog", &self.max_backlog)
            .finish_non_exhaustive()
    }
}

impl Shedding {
    pub fn new(settings: &SheddingSettings) -> Self {
        let limiter = settings.rate.map(|rate| {
            // One token every `per / requests`, up to `burst` at once.
            let period = (rate.per / rate.requests.get()).max(Duration::from_nanos(1));
            let quota = Quota::with_period(period)
                .unwrap_or_else(|| Quota::per_second(rate.requests))
                .allow_burst(rate.burst);
            DefaultKeyedRateLimiter::keyed(quota)
        });
        Self {
            limiter,
            checks: AtomicU64::new(0),
            clock: DefaultClock::default(),
            max_backlog: settings.max_backlog,
            backlog: Backlog::default(),
        }
    }

    /// `429` with how long to wait when `caller` is past its rate.
    fn admit(&self, caller: &Caller) -> Result<(), ApiError> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        // Every JWT subject gets a bucket: those that are full again are
        // forgotten now and then, so the map stays the size of the callers
        // active in the last second or so.
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            limiter.retain_recent();
        }
        limiter.check_key(&caller.name).map_err(|not_until| {
            ApiError::TooManyRequests(not_until.wait_time_from(self.clock.now()))
        })
    }

    /// `503` with a while to wait when the `order` queue's backlog is too
    /// long to take another order.
    pub fn admit_order(&self) -> Result<(), ApiError> {
        let Some(max) = self.max_backlog else {
            return Ok(());
        };
        match self.backlog.fresh() {
            Some(depth) if depth > max => Err(ApiError::Overloaded(
                format!(
                    "{depth} orders are waiting to be processed (more than {max}); try again later"
                ),
                BACKLOG_RETRY_AFTER,
            )),
            _ => Ok(()),
        }
    }

    /// Reads the `order` queue's depth once a second until `token` is
    /// cancelled (only when a backlog limit is set).
    pub fn watch_backlog(self: &Arc<Self>, amqp_url: String, token: CancellationToken) {
        if self.max_backlog.is_none() {
            return;
        }
        let shedding = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = token.cancelled() => {}
                () = shedding.backlog.watch(&amqp_url) => {}
            }
        });
    }
}

/// The last reading of the `order` queue's depth.
#[derive(Debug)]
struct Backlog {
    depth: AtomicU64,
    at: Mutex<Option<Instant>>,
}

impl Default for Backlog {
    fn default() -> Self {
        Self {
            depth: AtomicU64::new(0),
            at: Mutex::new(None),
        }
    }
}

impl Backlog {
    fn fresh(&self) -> Option<u64> {
        let at = *self.at.lock().unwrap_or_else(|e| e.into_inner());
        at.filter(|at| at.elapsed() < BACKLOG_FRESH)
            .map(|_| self.depth.load(Ordering::Acquire))
    }

    fn record(&self, depth: u64) {
        self.depth.store(depth, Ordering::Release);
        *self.at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    async fn watch(&self, amqp_url: &str) {
        let queue = contract::Domain::Order.queue();
        loop {
            let connection =
                runtime::broker::connect_with_backoff(amqp_url, "publisher backlog").await;
            let read = async {
                let channel = connection.create_channel().await?;
                loop {
                    self.record(u64::from(topology::queue_depth(&channel, queue).await?));
                    tokio::time::sleep(BACKLOG_POLL).await;
                }
            };
            let read: Result<std::convert::Infallible, lapin::Error> = read.await;
            let Err(e) = read;
            tracing::warn!(error = %e, queue, "Cannot read the order backlog; orders are not shed until it is read again");
            let _ = connection.close(200, "reconnecting".into()).await;
            tokio::time::sleep(BACKLOG_POLL).await;
        }
    }
}

/// Middleware after authentication: the caller's rate.
pub async fn limit(
    State(shedding): State<Arc<Shedding>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(caller) = request.extensions().get::<Caller>() {
        shedding.admit(caller)?;
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::auth::Role;

    fn settings(pairs: &[(&str, &str)]) -> Result<SheddingSettings, ConfigError> {
        SheddingSettings::read(&Source::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn rates_read_per_second_minute_or_hour_with_a_burst_of_one_second() {
        let s = settings(&[("RATE_LIMIT_PER_KEY", "120/m")]).unwrap();
        let rate = s.rate.unwrap();
        assert_eq!(rate.per, Duration::from_secs(60));
        assert_eq!(rate.burst.get(), 2);
        let s = settings(&[("RATE_LIMIT_PER_KEY", "off"), ("MAX_BACKLOG", "off")]).unwrap();
        assert_eq!(s.rate, None);
        assert_eq!(s.max_backlog, None);
        for (name, bad) in [
            ("RATE_LIMIT_PER_KEY", "200"),
            ("RATE_LIMIT_PER_KEY", "0/s"),
            ("RATE_LIMIT_PER_KEY", "200/d"),
            ("RATE_LIMIT_BURST", "0"),
            ("MAX_BACKLOG", "-1"),
        ] {
            let e = settings(&[(name, bad)]).unwrap_err();
            assert_eq!(e.name, name, "{e}");
        }
    }

    #[test]
    fn a_key_past_its_burst_waits_and_others_do_not() {
        let shedding = Shedding::new(
            &settings(&[("RATE_LIMIT_PER_KEY", "10/s"), ("RATE_LIMIT_BURST", "3")]).unwrap(),
        );
        let caller = |name: &str| Caller {
            name: name.to_owned(),
            role: Role::Orders,
            customer: None,
        };
        for _ in 0..3 {
            shedding.admit(&caller("shop")).unwrap();
        }
        match shedding.admit(&caller("shop")) {
            Err(ApiError::TooManyRequests(wait)) => {
                assert!(wait <= Duration::from_millis(100), "{wait:?}")
            }
            other => panic!("{other:?}"),
        }
        shedding.admit(&caller("other")).unwrap();
    }

    #[test]
    fn the_backlog_sheds_orders_only_while_its_reading_is_fresh_and_long() {
        let shedding = Shedding::new(&settings(&[("MAX_BACKLOG", "10")]).unwrap());
        assert!(shedding.admit_order().is_ok(), "never read: nothing shed");
        shedding.backlog.record(10);
        assert!(shedding.admit_order().is_ok());
        shedding.backlog.record(11);
        assert!(matches!(
            shedding.admit_order(),
            Err(ApiError::Overloaded(..))
        ));
        *shedding.backlog.at.lock().unwrap() = Some(Instant::now() - BACKLOG_FRESH);
        assert!(
            shedding.admit_order().is_ok(),
            "a stale reading sheds nothing"
        );
    }
}
