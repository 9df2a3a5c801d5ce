//! What `/readyz` says of a worker beyond reachability: whether the broker
//! blocks its publishes, its circuit breakers, and whether its consumer is
//! making progress. Written by the consumer loop, read by the probe.

use crate::breaker::BreakerState;
use crate::handler::Dependency;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The consumer's state, as the last stage to touch it left it.
#[derive(Debug)]
pub struct Health {
    consuming: AtomicBool,
    blocked: AtomicBool,
    breakers: Mutex<BTreeMap<Dependency, BreakerState>>,
    /// Chunks past the gate and not yet finished.
    working: AtomicUsize,
    /// When a delivery was last settled, or work last began after none
    /// was in hand.
    progress: Mutex<Instant>,
    /// How long work may be in hand with nothing settled before the
    /// consumer counts as stalled.
    stall_after: Duration,
}

/// What `/readyz` reports of the consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Subscribed to its queue.
    pub consuming: bool,
    /// The broker blocks its publishes (a resource alarm).
    pub blocked: bool,
    /// Deliveries in hand and none settled for longer than the stall limit.
    pub stalled: bool,
    pub breakers: Vec<(Dependency, BreakerState)>,
}

impl Readiness {
    /// Ready to make progress, given whether the database answers.
    pub fn ready(&self, database: bool) -> bool {
        database
            && self.consuming
            && !self.blocked
            && !self.stalled
            && self
                .breakers
                .iter()
                .all(|(_, state)| *state == BreakerState::Closed)
    }

    /// The JSON body of `/readyz`.
    pub fn body(&self, database: bool) -> String {
        let broker = if self.blocked {
            "blocked"
        } else if self.consuming {
            "ok"
        } else {
            "unavailable"
        };
        let breakers: BTreeMap<&str, &str> = self
            .breakers
            .iter()
            .map(|(d, s)| (d.name(), s.as_str()))
            .collect();
        let breakers = serde_json::to_string(&breakers).unwrap_or_else(|_| "{}".to_owned());
        let database = if database { "ok" } else { "unavailable" };
        let consumer = if self.stalled { "stalled" } else { "ok" };
        format!(
            "{{\"broker\":\"{broker}\",\"database\":\"{database}\",\"consumer\":\"{consumer}\",\"breakers\":{breakers}}}\n"
        )
    }
}

/// Work in hand while it lives.
pub struct Working<'a>(&'a Health);

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.0.working.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Health {
    pub fn new(stall_after: Duration) -> Self {
        Self {
            consuming: AtomicBool::new(false),
            blocked: AtomicBool::new(false),
            breakers: Mutex::new(BTreeMap::new()),
            working: AtomicUsize::new(0),
            progress: Mutex::new(Instant::now()),
            stall_after,
        }
    }

    pub fn set_consuming(&self, consuming: bool) {
        self.consuming.store(consuming, Ordering::Release);
    }

    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::Acquire)
    }

    pub fn set_blocked(&self, blocked: bool) {
        self.blocked.store(blocked, Ordering::Release);
    }

    pub fn set_breaker(&self, dependency: Dependency, state: BreakerState) {
        self.lock_breakers().insert(dependency, state);
    }

    /// A chunk passed the gate; its work is in hand until the guard drops.
    pub fn working(&self) -> Working<'_> {
        if self.working.fetch_add(1, Ordering::AcqRel) == 0 {
            // Idle until now: the stall is counted from here.
            self.advanced();
        }
        Working(self)
    }

    /// A delivery was settled.
    pub fn advanced(&self) {
        *self.lock_progress() = Instant::now();
    }

    pub fn readiness(&self, now: Instant) -> Readiness {
        let since = now.saturating_duration_since(*self.lock_progress());
        Readiness {
            consuming: self.is_consuming(),
            blocked: self.blocked.load(Ordering::Acquire),
            stalled: self.working.load(Ordering::Acquire) > 0 && since > self.stall_after,
            breakers: self.lock_breakers().iter().map(|(d, s)| (*d, *s)).collect(),
        }
    }

    fn lock_breakers(&self) -> std::sync::MutexGuard<'_, BTreeMap<Dependency, BreakerState>> {
        // Every write is one insert: a poisoned map is whole.
        self.breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_progress(&self) -> std::sync::MutexGuard<'_, Instant> {
        self.progress
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stalled_only_with_work_in_hand_and_nothing_settled_for_too_long() {
        let health = Health::new(Duration::from_secs(5));
        health.set_consuming(true);
        let later = Instant::now() + Duration::from_secs(60);
        assert!(!health.readiness(later).stalled, "idle is not stalled");
        let working = health.working();
        assert!(!health.readiness(Instant::now()).stalled);
        assert!(health.readiness(later).stalled);
        assert!(!health.readiness(later).ready(true));
        drop(working);
        assert!(!health.readiness(later).stalled);
        assert!(health.readiness(later).ready(true));
    }

    #[test]
    fn the_body_names_what_is_wrong() {
        let health = Health::new(Duration::from_secs(5));
        health.set_consuming(true);
        health.set_breaker(Dependency::named("payment-gateway"), BreakerState::Open);
        let readiness = health.readiness(Instant::now());
        assert!(!readiness.ready(true));
        assert_eq!(
            readiness.body(true).trim(),
            r#"{"broker":"ok","database":"ok","consumer":"ok","breakers":{"payment-gateway":"open"}}"#
        );
        health.set_blocked(true);
        health.set_breaker(Dependency::named("payment-gateway"), BreakerState::Closed);
        let readiness = health.readiness(Instant::now());
        assert!(!readiness.ready(true));
        assert!(readiness.body(true).contains(r#""broker":"blocked""#));
        health.set_blocked(false);
        assert!(health.readiness(Instant::now()).ready(true));
    }
}
