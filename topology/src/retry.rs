//! `RETRY_DELAYS`: the retry tiers of every work queue.

use settings::{DurationError, Var};
use std::{fmt, str::FromStr, time::Duration};

/// `RETRY_DELAYS`, and the contract's example tiers used when it is unset.
pub const RETRY_DELAYS: Var = Var::new("RETRY_DELAYS", "1s,5s,30s,2m,10m");

/// The delays of the retry tiers, in order: tier 1 holds a message before its
/// second attempt, tier N before attempt N + 1. After the last tier a further
/// transient failure sends the message to the dead queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryDelays(Vec<Duration>);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetryDelaysError {
    #[error("retry delay {0:?} is not a duration such as 500ms, 1s, 2m or 1h")]
    NotADuration(String),
    #[error("retry delay {0:?} must be longer than zero")]
    Zero(String),
    #[error("retry delays must grow: {later:?} comes after the longer {earlier:?}")]
    NotIncreasing { earlier: String, later: String },
    #[error("at most 20 retry tiers are supported, got {0}")]
    TooMany(usize),
}

impl RetryDelays {
    pub fn new(delays: Vec<Duration>) -> Self {
        Self(delays)
    }

    /// The contract's example tiers, used when `RETRY_DELAYS` is unset
    /// (a test holds the default text to parsing).
    pub fn contract_default() -> Self {
        RETRY_DELAYS
            .default
            .parse()
            .unwrap_or_else(|_| Self(Vec::new()))
    }

    pub fn tiers(&self) -> usize {
        self.0.len()
    }

    /// The delay of tier `n` (1-based).
    pub fn delay(&self, tier: usize) -> Option<Duration> {
        tier.checked_sub(1).and_then(|i| self.0.get(i)).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (usize, Duration)> + '_ {
        self.0.iter().enumerate().map(|(i, d)| (i + 1, *d))
    }
}

impl FromStr for RetryDelays {
    type Err = RetryDelaysError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut delays: Vec<Duration> = Vec::new();
        let mut previous: Option<&str> = None;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let delay = parse_duration(part)?;
            if let (Some(prev), Some(last)) = (previous, delays.last())
                && delay < *last
            {
                return Err(RetryDelaysError::NotIncreasing {
                    earlier: prev.to_owned(),
                    later: part.to_owned(),
                });
            }
            delays.push(delay);
            previous = Some(part);
        }
        if delays.len() > 20 {
            return Err(RetryDelaysError::TooMany(delays.len()));
        }
        Ok(Self(delays))
    }
}

impl fmt::Display for RetryDelays {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|d| format_duration(*d)).collect();
        f.write_str(&parts.join(","))
    }
}

/// Parses `500ms`, `30s`, `2m` or `1h`.
fn parse_duration(s: &str) -> Result<Duration, RetryDelaysError> {
    settings::parse_duration(s).map_err(|e| match e {
        DurationError::NotADuration(s) => RetryDelaysError::NotADuration(s),
        DurationError::Zero(s) => RetryDelaysError::Zero(s),
    })
}

fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    match ms {
        ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
        ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
        ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
        ms => format!("{ms}ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_example() {
        let d: RetryDelays = "1s,5s,30s,2m,10m".parse().expect("valid");
        assert_eq!(d, RetryDelays::contract_default());
        assert_eq!(d.tiers(), 5);
        assert_eq!(d.delay(1), Some(Duration::from_secs(1)));
        assert_eq!(d.delay(5), Some(Duration::from_secs(600)));
        assert_eq!(d.delay(6), None);
        assert_eq!(d.delay(0), None);
        assert_eq!(d.to_string(), "1s,5s,30s,2m,10m");
    }

    #[test]
    fn accepts_milliseconds_hours_spaces_and_no_tiers() {
        let d: RetryDelays = " 200ms, 1h ".parse().expect("valid");
        assert_eq!(d.delay(1), Some(Duration::from_millis(200)));
        assert_eq!(d.delay(2), Some(Duration::from_secs(3600)));
        assert_eq!("".parse::<RetryDelays>().expect("valid").tiers(), 0);
    }

    #[test]
    fn rejects_garbage_with_a_clear_reason() {
        for bad in [
            "1",
            "s",
            "1d",
            "-1s",
            "1.5s",
            "ten",
            "1s,x",
            "99999999999999999h",
        ] {
            let err = bad.parse::<RetryDelays>().expect_err(bad);
            assert!(
                matches!(err, RetryDelaysError::NotADuration(_)),
                "{bad}: {err}"
            );
        }
        assert_eq!(
            "0s".parse::<RetryDelays>(),
            Err(RetryDelaysError::Zero("0s".into()))
        );
        assert!(matches!(
            "5s,1s".parse::<RetryDelays>(),
            Err(RetryDelaysError::NotIncreasing { .. })
        ));
    }
}
