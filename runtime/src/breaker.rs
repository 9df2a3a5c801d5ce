//! Circuit breakers, one per dependency a handler names in
//! [`Failure::Unavailable`](crate::Failure::Unavailable).
//!
//! Closed, a breaker counts its dependency's failures in a row; at
//! `BREAKER_THRESHOLD` it opens, and the worker takes no message while any
//! breaker is open, so messages wait in their queue instead of spending
//! their retry tiers on an outage. After `BREAKER_COOLDOWN` it is half-open:
//! one message goes through as a probe; if the dependency fails it again,
//! the breaker opens for another cooldown, else it closes. A failure that
//! finds (or makes) its breaker open spends no attempt: the message waits
//! in the first retry tier and comes back to the gate.
//!
//! Kept free of the broker and the database, with the clock passed in, so
//! the transitions are tested alone.

use crate::handler::Dependency;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// When breakers open and how long they stay open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Failures of one dependency in a row that open its breaker
    /// (`BREAKER_THRESHOLD`); 0 turns the breakers off.
    pub threshold: u32,
    /// How long an open breaker waits before it lets one message through
    /// as a probe (`BREAKER_COOLDOWN`).
    pub cooldown: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            threshold: 5,
            cooldown: Duration::from_secs(10),
        }
    }
}

/// What `/readyz` and `/metrics` show of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is out; every other message waits for its outcome.
    HalfOpen,
}

#[cfg(test)]
impl State {
    fn shown(self) -> BreakerState {
        match self {
            Self::Closed { .. } => BreakerState::Closed,
            Self::Open { .. } => BreakerState::Open,
            Self::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

/// What the gate answers a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Every breaker is closed: handle the chunk.
    Free,
    /// `Dependency`'s breaker is half-open: handle one message as its
    /// probe, report with [`Breakers::probed`], then ask again.
    Probe(Dependency),
}

/// What the gate decided at one instant.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    Pass(Pass),
    /// Wait until the instant (a breaker's cooldown ends), or until a
    /// breaker changes.
    Wait(Option<Instant>),
}

/// The breakers of one worker.
pub struct Breakers {
    settings: BreakerSettings,
    worker: &'static str,
    states: Mutex<BTreeMap<Dependency, State>>,
    changed: Notify,
    /// Told of every transition (`/metrics`, `/readyz`).
    on_change: Box<dyn Fn(Dependency, BreakerState) + Send + Sync>,
}

impl std::fmt::Debug for Breakers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breakers")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl Breakers {
    pub fn new(
        worker: &'static str,
        settings: BreakerSettings,
        on_change: impl Fn(Dependency, BreakerState) + Send + Sync + 'static,
    ) -> Self {
        Self {
            settings,
            worker,
            states: Mutex::new(BTreeMap::new()),
            changed: Notify::new(),
            on_change: Box::new(on_change),
        }
    }

    /// Records a failure of `dependency`; true when its breaker is open
    /// now (opened by it, or already open), so the message should wait
    /// without spending an attempt.
    pub fn failed(&self, dependency: Dependency, now: Instant) -> bool {
        if self.settings.threshold == 0 {
            return false;
        }
        let mut states = self.lock();
        let state = states
            .entry(dependency)
            .or_insert(State::Closed { failures: 0 });
        let opened = match *state {
            State::Closed { failures } if failures + 1 < self.settings.threshold => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                return false;
            }
            State::Closed { failures } => {
                warn!(worker = self.worker, %dependency, failures = failures + 1, cooldown = ?self.settings.cooldown, "Circuit breaker opened: taking no messages until a probe succeeds");
                true
            }
            State::Open { .. } => false,
            State::HalfOpen => {
                warn!(worker = self.worker, %dependency, cooldown = ?self.settings.cooldown, "Circuit breaker probe failed; open again");
                true
            }
        };
        if opened {
            *state = State::Open {
                until: now + self.settings.cooldown,
            };
            drop(states);
            (self.on_change)(dependency, BreakerState::Open);
            self.changed.notify_waiters();
        }
        true
    }

    /// A message was applied: every dependency it needed answered, so the
    /// failures counted in a row start again.
    pub fn applied(&self) {
        let mut states = self.lock();
        for state in states.values_mut() {
            if let State::Closed { failures } = state {
                *failures = 0;
            }
        }
    }

    /// The probe of `dependency` reached its outcome: unless it failed the
    /// dependency again (which reopened the breaker), the breaker closes.
    pub fn probed(&self, dependency: Dependency) {
        let mut states = self.lock();
        let Some(state) = states.get_mut(&dependency) else {
            return;
        };
        if matches!(state, State::HalfOpen) {
            *state = State::Closed { failures: 0 };
            drop(states);
            info!(worker = self.worker, %dependency, "Circuit breaker closed: the probe got through");
            (self.on_change)(dependency, BreakerState::Closed);
            self.changed.notify_waiters();
        }
    }

    /// Each dependency that has failed, with its breaker's state.
    #[cfg(test)]
    fn states(&self) -> Vec<(Dependency, BreakerState)> {
        self.lock().iter().map(|(d, s)| (*d, s.shown())).collect()
    }

    /// Waits until the chunk may go ([`Pass`]), or `None` once `token` is
    /// cancelled.
    pub async fn admit(&self, token: &CancellationToken) -> Option<Pass> {
        loop {
            // Registered before deciding, so a change between the decision
            // and the wait is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wait = match self.decide(Instant::now()) {
                Decision::Pass(pass) => return Some(pass),
                Decision::Wait(until) => until,
            };
            let cooldown = async {
                match wait {
                    Some(until) => tokio::time::sleep_until(until.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = token.cancelled() => return None,
                () = changed => {}
                () = cooldown => {}
            }
        }
    }

    fn decide(&self, now: Instant) -> Decision {
        let mut states = self.lock();
        // A probe out: everything else waits for its outcome.
        if states.values().any(|s| matches!(s, State::HalfOpen)) {
            return Decision::Wait(None);
        }
        let cooled = states.iter().find_map(|(dependency, state)| {
            matches!(state, State::Open { until } if *until <= now).then_some(*dependency)
        });
        if let Some(dependency) = cooled {
            states.insert(dependency, State::HalfOpen);
            drop(states);
            info!(worker = self.worker, %dependency, "Circuit breaker half-open: one message goes through as a probe");
            (self.on_change)(dependency, BreakerState::HalfOpen);
            return Decision::Pass(Pass::Probe(dependency));
        }
        let earliest = states
            .values()
            .filter_map(|state| match state {
                State::Open { until } => Some(*until),
                _ => None,
            })
            .min();
        match earliest {
            Some(until) => Decision::Wait(Some(until)),
            None => Decision::Pass(Pass::Free),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Dependency, State>> {
        // A panic while holding the lock leaves the map whole: every write
        // is one assignment.
        self.states
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::sync::Arc;

    const GATEWAY: Dependency = Dependency::named("payment-gateway");

    fn breakers(threshold: u32) -> (Breakers, Arc<Mutex<Vec<BreakerState>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let breakers = Breakers::new(
            "test-worker",
            BreakerSettings {
                threshold,
                cooldown: Duration::from_secs(10),
            },
            move |_, state| log.lock().unwrap_or_else(|e| e.into_inner()).push(state),
        );
        (breakers, seen)
    }

    #[test]
    fn opens_after_the_threshold_in_a_row_and_an_applied_message_resets_the_count() {
        let (b, seen) = breakers(3);
        let now = Instant::now();
        assert!(!b.failed(GATEWAY, now));
        assert!(!b.failed(GATEWAY, now));
        b.applied();
        assert!(!b.failed(GATEWAY, now));
        assert!(!b.failed(GATEWAY, now));
        assert_eq!(b.decide(now), Decision::Pass(Pass::Free));
        assert!(b.failed(GATEWAY, now), "the third in a row opens it");
        assert!(b.failed(GATEWAY, now), "failures in flight find it open");
        assert_eq!(b.states(), vec![(GATEWAY, BreakerState::Open)]);
        assert_eq!(
            b.decide(now),
            Decision::Wait(Some(now + Duration::from_secs(10)))
        );
        assert_eq!(*seen.lock().unwrap(), vec![BreakerState::Open]);
    }

    #[test]
    fn after_the_cooldown_one_probe_goes_and_its_outcome_decides() {
        let (b, seen) = breakers(1);
        let start = Instant::now();
        assert!(b.failed(GATEWAY, start));
        let later = start + Duration::from_secs(11);
        assert_eq!(b.decide(later), Decision::Pass(Pass::Probe(GATEWAY)));
        assert_eq!(b.decide(later), Decision::Wait(None), "one probe at a time");
        // The probe fails: open for another cooldown.
        assert!(b.failed(GATEWAY, later));
        assert_eq!(
            b.decide(later),
            Decision::Wait(Some(later + Duration::from_secs(10)))
        );
        let again = later + Duration::from_secs(10);
        assert_eq!(b.decide(again), Decision::Pass(Pass::Probe(GATEWAY)));
        b.probed(GATEWAY);
        assert_eq!(b.decide(again), Decision::Pass(Pass::Free));
        assert_eq!(b.states(), vec![(GATEWAY, BreakerState::Closed)]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Open,
                BreakerState::HalfOpen,
                BreakerState::Closed
            ]
        );
    }

    #[test]
    fn dependencies_have_breakers_of_their_own() {
        let (b, _) = breakers(2);
        let now = Instant::now();
        assert!(!b.failed(GATEWAY, now));
        assert!(!b.failed(Dependency::DATABASE, now));
        assert!(b.failed(GATEWAY, now));
        assert_eq!(
            b.states(),
            vec![
                (Dependency::DATABASE, BreakerState::Closed),
                (GATEWAY, BreakerState::Open)
            ]
        );
    }

    #[test]
    fn a_threshold_of_zero_never_opens() {
        let (b, seen) = breakers(0);
        let now = Instant::now();
        for _ in 0..100 {
            assert!(!b.failed(GATEWAY, now));
        }
        assert_eq!(b.decide(now), Decision::Pass(Pass::Free));
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn admit_waits_for_the_cooldown_and_ends_with_the_token() {
        let (b, _) = breakers(1);
        let b = Breakers {
            settings: BreakerSettings {
                threshold: 1,
                cooldown: Duration::from_millis(50),
            },
            ..b
        };
        let token = CancellationToken::new();
        assert_eq!(b.admit(&token).await, Some(Pass::Free));
        assert!(b.failed(GATEWAY, Instant::now()));
        let asked = Instant::now();
        assert_eq!(b.admit(&token).await, Some(Pass::Probe(GATEWAY)));
        assert!(asked.elapsed() >= Duration::from_millis(40));
        // The probe is out and has not reported: the next chunk waits.
        token.cancel();
        assert_eq!(b.admit(&token).await, None);
    }
}
