//! Values that hold secrets, masked wherever they are printed.

use std::fmt;

/// A value that must never reach a log line in clear, such as a URL with a
/// password in it. `Debug` and `Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL itself, for the one place that connects with it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&mask_password(&self.0))
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:****@host/…`.
pub fn mask_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    // Several URLs where one is expected (refused, but printed): each masked.
    if let Some(next) = rest.find("://").and_then(|i| rest[..i].rfind(',')) {
        let split = scheme_end + 3 + next;
        return format!(
            "{}{}",
            mask_password(&url[..split]),
            mask_password(&url[split..])
        );
    }
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    let Some(at) = authority.rfind('@') else {
        return url.to_owned();
    };
    match authority[..at].find(':') {
        Some(colon) => format!(
            "{}{}:****{}",
            &url[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_the_rest_is_kept() {
        assert_eq!(
            mask_password("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:****@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            mask_password("postgres://postgres@127.0.0.1:5432/orderflow"),
            "postgres://postgres@127.0.0.1:5432/orderflow"
        );
        assert_eq!(
            mask_password("postgres://u:p@ss@db/x"),
            "postgres://u:****@db/x"
        );
        assert_eq!(mask_password("not a url"), "not a url");
        assert_eq!(
            mask_password("amqp://a:one@h1/%2f,amqp://b:two@h2/%2f"),
            "amqp://a:****@h1/%2f,amqp://b:****@h2/%2f"
        );
        let s = SecretUrl::new("amqp://a:b@h/");
        assert_eq!(format!("{s:?}"), "\"amqp://a:****@h/\"");
    }
}
