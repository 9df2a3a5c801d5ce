//! How the command-line tools (`topology`, `dlq`) print an error: the
//! AMQP client's errors repeat their cause in their own text, which
//! `{:#}` would print twice.

/// `e` and its causes on one line, each said once.
pub fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[derive(Debug, thiserror::Error)]
    #[error("IO error: {0}")]
    struct Repeats(#[source] std::io::Error);

    #[test]
    fn a_cause_repeated_in_its_parent_is_said_once() {
        let io = std::io::Error::other("AMQP_URL is not an AMQP URI: invalid port number");
        let e = anyhow::Error::new(Repeats(io)).context("cannot connect to the broker at AMQP_URL");
        assert_eq!(
            describe(&e),
            "cannot connect to the broker at AMQP_URL: IO error: AMQP_URL is not an AMQP URI: invalid port number"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(describe(&plain), "outer: inner");
    }
}
