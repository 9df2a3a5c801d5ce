//! The payment worker's own settings: garbage stops it at start, naming
//! the variable, before it connects to anything.

#[tokio::test]
async fn a_garbage_gateway_setting_stops_the_worker_at_start_with_the_variable_named() {
    for (name, value) in [
        ("PAYMENT_GATEWAY_MAX_IN_FLIGHT", "0"),
        ("PAYMENT_GATEWAY_MAX_IN_FLIGHT", "many"),
        ("PAYMENT_GATEWAY_TIMEOUT", "soon"),
        ("PAYMENT_GATEWAY_URL", "ftp://127.0.0.1:1"),
        ("PAYMENT_GATEWAY_CA_FILE", "/nonexistent/ca.pem"),
        ("PAYMENT_GATEWAY_CA_FILE", "/etc/hostname"),
    ] {
        testkit::assert_setting_refused(env!("CARGO_BIN_EXE_payment-worker"), name, value).await;
    }
}
