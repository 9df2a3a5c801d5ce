//! Where a failed message goes next: a retry tier or the dead queue.
//!
//! Kept pure so the policy is tested without a broker; the consumer loop
//! does the publishing.

use rand::Rng;
use std::time::Duration;
use topology::RetryDelays;

/// Why a message ended in its dead queue (header `x-error-kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// The handler said no retry can help.
    Permanent,
    /// Transient failures used up every retry tier.
    Exhausted,
    /// The message could not be decoded.
    Malformed,
    /// The message was redelivered too often without an outcome: it kills
    /// or hangs its worker.
    DeliveryLimit,
}

impl DeadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::Permanent => "permanent",
            DeadKind::Exhausted => "exhausted",
            DeadKind::Malformed => "malformed",
            DeadKind::DeliveryLimit => "delivery-limit",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Wait in tier `tier`, then come back as attempt `tier + 1`.
    Retry {
        tier: usize,
        delay: Duration,
    },
    Dead(DeadKind),
}

/// After a transient failure of attempt `attempt` (from 1): tier `attempt`
/// if it exists, else the dead queue.
pub fn after_transient(attempt: u32, delays: &RetryDelays) -> Route {
    let tier = attempt as usize;
    match delays.delay(tier) {
        Some(delay) => Route::Retry { tier, delay },
        None => Route::Dead(DeadKind::Exhausted),
    }
}

/// The per-message expiration in a tier: the tier's delay less up to 20%,
/// so that messages failing together do not come back together. Never more
/// than the tier's queue TTL, which stays the upper bound.
pub fn jittered(delay: Duration) -> Duration {
    let factor = rand::rng().random_range(0.8..=1.0);
    delay.mul_f64(factor).max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_transient_failure_goes_one_tier_further_then_dies_exhausted() {
        let delays: RetryDelays = "1s,5s".parse().expect("valid");
        assert_eq!(
            after_transient(1, &delays),
            Route::Retry {
                tier: 1,
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            after_transient(2, &delays),
            Route::Retry {
                tier: 2,
                delay: Duration::from_secs(5)
            }
        );
        assert_eq!(
            after_transient(3, &delays),
            Route::Dead(DeadKind::Exhausted)
        );
        let none: RetryDelays = "".parse().expect("valid");
        assert_eq!(after_transient(1, &none), Route::Dead(DeadKind::Exhausted));
    }

    #[test]
    fn jitter_stays_within_the_tier() {
        for _ in 0..1000 {
            let d = jittered(Duration::from_secs(10));
            assert!(d <= Duration::from_secs(10) && d >= Duration::from_secs(8));
        }
    }
}
