//! The payment worker's own settings: garbage stops it at start, naming
//! the variable, before it connects to anything.
#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn a_garbage_gateway_setting_stops_the_worker_at_start_with_the_variable_named() {
    for (name, value) in [
        ("PAYMENT_GATEWAY_MAX_IN_FLIGHT", "0"),
        ("PAYMENT_GATEWAY_MAX_IN_FLIGHT", "many"),
        ("PAYMENT_GATEWAY_TIMEOUT", "soon"),
        ("PAYMENT_GATEWAY_URL", "ftp://127.0.0.1:1"),
    ] {
        // Nothing listens at these addresses: a worker that accepted the
        // value would try them and keep retrying instead of exiting.
        let out = Command::new(env!("CARGO_BIN_EXE_payment-worker"))
            .env("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f")
            .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
            .env(name, value)
            .env("RUST_LOG", "off")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}={value} was accepted");
        assert!(
            stderr.contains(name) && stderr.contains(value),
            "{name}={value}: {stderr}"
        );
    }
}
