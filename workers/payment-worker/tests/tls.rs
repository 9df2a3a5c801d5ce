//! The payment worker against the gateway simulator served over HTTPS, as
//! every real provider is: a charge goes through the broker, the worker
//! and TLS to the gateway, trusting a CA given in `PAYMENT_GATEWAY_CA_FILE`;
//! without that CA the gateway is refused, and nothing is charged.
#![allow(clippy::unwrap_used)]

use contract::{ChargePayment, PaymentCharged};
use payment_gateway_sim::Gateway;
use payment_gateway_sim::tls::{TlsFiles, serve};
use payment_worker::gateway::GatewayClient;
use payment_worker::{GatewaySettings, Payments, SPEC};
use runtime::testing::{one_chunk_settings, run_until};
use runtime::{Message, Outgoing, Worker};
use std::time::Duration;
use testkit::{TestCertificate, TestEnv, eventually};
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

/// The simulator over HTTPS on a free port; its URL.
async fn start_gateway(certificate: &TestCertificate) -> String {
    let files = TlsFiles {
        cert: certificate.cert.clone(),
        key: certificate.key.clone(),
    };
    let config = files.server_config().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let router = Gateway::new(Default::default()).router();
    tokio::spawn(serve(listener, router, config, std::future::pending()));
    url
}

fn gateway_settings(url: &str, ca_file: Option<std::path::PathBuf>) -> GatewaySettings {
    GatewaySettings {
        url: url.to_owned(),
        timeout: Duration::from_secs(5),
        max_in_flight: 4,
        ca_file,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_goes_to_the_gateway_over_https_trusting_the_configured_ca() {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    env.declare_topology("100ms").await;
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    let certificate = TestCertificate::make(&env.database);
    let url = start_gateway(&certificate).await;

    let order_id = Uuid::new_v4();
    let out = Outgoing::of(&ChargePayment {
        order_id,
        amount_cents: 1999,
        currency: "EUR".into(),
        payment_method: "pm_card_visa".into(),
    })
    .correlated(order_id);
    env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
        .await;
    let gateway = gateway_settings(&url, Some(certificate.ca.clone()));
    let handler = Payments {
        gateway: GatewayClient::new(&gateway).unwrap(),
    };
    let settings = one_chunk_settings(&env.amqp_url, &env.database_url);
    let worker = Worker::with_pool(SPEC, settings, env.pool().await, handler);
    run_until(
        worker,
        eventually(WAIT, "the charge answered", || async {
            env.depth("order").await == 1
        }),
    )
    .await;
    let (props, _) = env.drain("order").await.remove(0);
    assert_eq!(
        props.kind().as_ref().unwrap().as_str(),
        PaymentCharged::KIND
    );
    let charges = GatewayClient::new(&gateway)
        .unwrap()
        .charges_of(order_id)
        .await
        .unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(env.depth("payment.dead").await, 0);
    certificate.remove();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_whose_certificate_is_not_trusted_is_refused_and_charges_nothing() {
    let certificate = TestCertificate::make(&format!("untrusted-{}", Uuid::new_v4().simple()));
    let url = start_gateway(&certificate).await;
    let untrusting = GatewayClient::new(&gateway_settings(&url, None)).unwrap();
    let refused = untrusting
        .charge(Uuid::new_v4(), 500, "EUR", "pm_card_visa")
        .await;
    assert!(
        refused.is_err(),
        "a certificate of an unknown CA was accepted"
    );
    let trusting =
        GatewayClient::new(&gateway_settings(&url, Some(certificate.ca.clone()))).unwrap();
    let listed = trusting.charges_of(Uuid::new_v4()).await.unwrap();
    assert!(listed.is_empty());
    certificate.remove();
}
