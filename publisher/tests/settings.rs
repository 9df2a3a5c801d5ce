//! The publisher's settings: garbage stops it at start, naming the
//! variable, rather than serving 503s for ever.

#[tokio::test]
async fn a_garbage_setting_stops_the_publisher_at_start_with_the_variable_named() {
    for (name, value) in [
        ("AMQP_URL", "garbage"),
        ("AMQP_URL", "amqp://127.0.0.1:99999/%2f"),
        ("AMQP_URL", "amqp://127.0.0.1:5672,,127.0.0.1:5673/%2f"),
        ("HTTP_ADDR", "nowhere"),
        ("REQUEST_TIMEOUT_MS", "10s"),
        ("LOG_FORMAT", "yaml"),
        ("RUST_LOG", "orderflow=loud"),
    ] {
        testkit::assert_setting_refused(env!("CARGO_BIN_EXE_publisher"), name, value).await;
    }
}
