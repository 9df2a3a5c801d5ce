//! How every orderflow binary reads its configuration.
//!
//! Each binary has one typed settings tree, built by one function from a
//! [`Source`] (the process environment, or a table in tests). Each
//! variable is declared once, as a [`Var`] with its default, beside the
//! settings that use it; every bad value is refused at start with the same
//! wording, `NAME="value" is not valid: reason`, secrets masked.
#![forbid(unsafe_code)]

mod secret;

pub use secret::{SecretUrl, mask_password};

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A configuration variable and the value it takes when unset or empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
}

impl Var {
    pub const fn new(name: &'static str, default: &'static str) -> Self {
        Self { name, default }
    }

    /// A variable with no default: unset means "not configured".
    pub const fn optional(name: &'static str) -> Self {
        Self { name, default: "" }
    }
}

/// A variable's value that cannot be used. The one wording of every
/// configuration error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}={value:?} is not valid: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    /// As given, or masked when it holds a secret.
    pub value: String,
    pub reason: String,
}

/// Where values come from: a snapshot of the process environment, or a
/// table. Flags of a command line are laid over it with [`Source::with`],
/// so that they are read, checked and refused like the variables they
/// stand for.
#[derive(Debug, Clone, Default)]
pub struct Source {
    values: HashMap<String, String>,
}

/// The shortest password [`Source::password`] accepts.
pub const MIN_PASSWORD_LEN: usize = 16;

impl Source {
    /// The process environment, as it is now.
    pub fn environment() -> Self {
        Self {
            values: std::env::vars().collect(),
        }
    }

    /// Only these values (tests).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// This source with `var` set to `value` when it is `Some` (a flag given).
    pub fn with(mut self, var: Var, value: Option<impl Into<String>>) -> Self {
        if let Some(value) = value {
            self.values.insert(var.name.to_owned(), value.into());
        }
        self
    }

    /// The value of `var`, trimmed, or its default when unset or empty.
    pub fn raw(&self, var: Var) -> &str {
        self.values
            .get(var.name)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .unwrap_or(var.default)
    }

    /// `var` parsed by its type's `FromStr`.
    pub fn get<T>(&self, var: Var) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        self.parse(var, |raw| raw.parse::<T>().map_err(|e| e.to_string()))
    }

    /// `var` parsed by `parse`, whose error is the reason given.
    pub fn parse<T>(
        &self,
        var: Var,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        let raw = self.raw(var);
        parse(raw).map_err(|reason| invalid(var, raw, reason))
    }

    /// `var` parsed by `parse`, or `None` when it is unset and has no default.
    pub fn optional<T>(
        &self,
        var: Var,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.raw(var) {
            "" => Ok(None),
            _ => self.parse(var, parse).map(Some),
        }
    }

    /// `var` as a URL holding a secret: checked by `check`, and masked in
    /// the error when refused.
    pub fn secret_url(
        &self,
        var: Var,
        check: impl FnOnce(&str) -> Result<(), String>,
    ) -> Result<SecretUrl, ConfigError> {
        let raw = self.raw(var);
        match check(raw) {
            Ok(()) => Ok(SecretUrl::new(raw)),
            Err(reason) => Err(invalid(var, &mask_password(raw), reason)),
        }
    }

    /// `var` holding secrets, parsed by `parse`, or `None` when unset and
    /// without a default; when refused, the error shows the value as
    /// `mask` writes it, never the secrets.
    /// A password that must be set, of `MIN_PASSWORD_LEN` characters or
    /// more, never shown in an error; `needed_by` says who needs it when
    /// it is missing.
    pub fn password(&self, var: Var, needed_by: &str) -> Result<String, ConfigError> {
        let password = self.secret(
            var,
            |_| "***".to_owned(),
            |raw| {
                if raw.len() < MIN_PASSWORD_LEN {
                    Err(format!("must be at least {MIN_PASSWORD_LEN} characters"))
                } else {
                    Ok(raw.to_owned())
                }
            },
        )?;
        password.ok_or_else(|| invalid(var, "", format!("not set: {needed_by}")))
    }

    pub fn secret<T>(
        &self,
        var: Var,
        mask: impl FnOnce(&str) -> String,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        match self.raw(var) {
            "" => Ok(None),
            raw => parse(raw)
                .map(Some)
                .map_err(|reason| invalid(var, &mask(raw), reason)),
        }
    }

    /// `var` as a duration such as `500ms`, `30s`, `2m` or `1h`.
    pub fn duration(&self, var: Var) -> Result<Duration, ConfigError> {
        self.parse(var, |raw| parse_duration(raw).map_err(|e| e.to_string()))
    }
}

/// The error for `var` holding `shown`.
pub fn invalid(var: Var, shown: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        name: var.name,
        value: shown.to_owned(),
        reason: reason.into(),
    }
}

/// Refuses a value outside `range`, naming it.
pub fn at_least<T: PartialOrd + fmt::Display>(value: T, min: T) -> Result<T, String> {
    if value < min {
        Err(format!("must be at least {min}"))
    } else {
        Ok(value)
    }
}

/// A `HOST:PORT` to listen on or connect to: a name or address, and a port.
pub fn host_port(raw: &str) -> Result<String, String> {
    let expected = "expected HOST:PORT such as 127.0.0.1:8080";
    match raw.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(raw.to_owned()),
        _ => Err(expected.to_owned()),
    }
}

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("{0:?} is not a duration such as 500ms, 1s, 2m or 1h")]
    NotADuration(String),
    #[error("{0:?} must be longer than zero")]
    Zero(String),
}

/// `500ms`, `30s`, `2m` or `1h`: a number and its unit, longer than zero.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let not_a_duration = || DurationError::NotADuration(s.to_owned());
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(not_a_duration)?;
    let (number, unit) = s.split_at(split);
    let n: u64 = number.parse().map_err(|_| not_a_duration())?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(not_a_duration)?;
    if millis == 0 {
        return Err(DurationError::Zero(s.to_owned()));
    }
    Ok(Duration::from_millis(millis))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORT: Var = Var::new("PORT", "8080");
    const URL: Var = Var::new("SOME_URL", "amqp://guest:guest@127.0.0.1/%2f");

    #[test]
    fn unset_or_empty_takes_the_default_and_set_values_are_trimmed() {
        let source = Source::from_pairs([("PORT", "  ")]);
        assert_eq!(source.get::<u16>(PORT), Ok(8080));
        let source = Source::from_pairs([("PORT", " 9000 ")]);
        assert_eq!(source.get::<u16>(PORT), Ok(9000));
    }

    #[test]
    fn every_bad_value_is_refused_with_one_wording() {
        let source = Source::from_pairs([("PORT", "eighty"), ("SOME_URL", "amqp://u:s3cret@h/")]);
        let e = source.get::<u16>(PORT).expect_err("eighty");
        assert_eq!(
            e.to_string(),
            "PORT=\"eighty\" is not valid: invalid digit found in string"
        );
        let e = source
            .secret_url(URL, |_| Err("no".into()))
            .expect_err("refused");
        assert_eq!(
            e.to_string(),
            "SOME_URL=\"amqp://u:****@h/\" is not valid: no"
        );
    }

    #[test]
    fn a_flag_is_read_like_the_variable_it_stands_for() {
        let source = Source::from_pairs([("PORT", "9000")]).with(PORT, Some("7000"));
        assert_eq!(source.get::<u16>(PORT), Ok(7000));
        let source = Source::from_pairs([("PORT", "9000")]).with(PORT, None::<String>);
        assert_eq!(source.get::<u16>(PORT), Ok(9000));
    }

    #[test]
    fn optional_variables_are_none_when_unset() {
        let var = Var::optional("METRICS_ADDR");
        let none = Source::default().optional(var, |s| Ok(s.to_owned()));
        assert_eq!(none, Ok(None));
        let some = Source::from_pairs([("METRICS_ADDR", "x")]).optional(var, |s| Ok(s.to_owned()));
        assert_eq!(some, Ok(Some("x".to_owned())));
    }

    #[test]
    fn addresses_need_a_host_and_a_port() {
        assert_eq!(host_port("0.0.0.0:8080"), Ok("0.0.0.0:8080".to_owned()));
        assert_eq!(host_port("localhost:0"), Ok("localhost:0".to_owned()));
        assert!(host_port("[::1]:9100").is_ok());
        for bad in ["nowhere", ":8080", "host:", "host:99999", "host:http"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("7").is_err());
        assert_eq!(parse_duration("0s"), Err(DurationError::Zero("0s".into())));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("99999999999999999999h").is_err());
    }
}
