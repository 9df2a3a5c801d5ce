//! The publisher's settings: garbage stops it at start, naming the
//! variable, rather than serving 503s for ever.
#![allow(clippy::unwrap_used)]

#[tokio::test]
async fn a_garbage_setting_stops_the_publisher_at_start_with_the_variable_named() {
    for (name, value) in [
        ("AMQP_URL", "garbage"),
        ("AMQP_URL", "amqp://127.0.0.1:99999/%2f"),
        ("AMQP_URL", "amqp://127.0.0.1:5672,,127.0.0.1:5673/%2f"),
        ("HTTP_ADDR", "nowhere"),
        ("METRICS_ADDR", "nowhere"),
        ("JWT_JWKS_URL", "ftp://id.example.com/keys"),
        ("REQUEST_TIMEOUT_MS", "10s"),
        ("LOG_FORMAT", "yaml"),
        ("RUST_LOG", "orderflow=loud"),
    ] {
        testkit::assert_setting_refused(env!("CARGO_BIN_EXE_publisher"), name, value).await;
    }
}

/// A publisher is never open by accident: without keys it refuses to start
/// unless `AUTH=off` says so; a bad key is refused with its secret masked.
#[tokio::test]
async fn a_publisher_without_keys_refuses_to_start_unless_auth_is_off() {
    let publisher = env!("CARGO_BIN_EXE_publisher");
    testkit::assert_setting_refused(publisher, "API_KEYS", "").await;
    testkit::assert_setting_refused(publisher, "AUTH", "maybe").await;
    let run = tokio::process::Command::new(publisher)
        .env("API_KEYS", "shop:orders:short-secret")
        .env("RUST_LOG", "off")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), run)
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(r#"API_KEYS="shop:orders:***" is not valid: "#),
        "{stderr}"
    );
    assert!(
        !stderr.contains("short-secret"),
        "the secret was shown: {stderr}"
    );
}
