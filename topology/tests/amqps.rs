//! `amqps://` against the local broker's TLS listener (opened by
//! `scripts/services.sh`): the connection is encrypted, and a broker whose
//! certificate no trusted CA signed is refused.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use testkit::{TestCertificate, TestEnv};
use topology::addresses::BrokerAddresses;

const TIMEOUT: Duration = Duration::from_secs(10);

/// The management API's view of the connection named `name`.
async fn connection_named(env: &TestEnv, name: &str) -> serde_json::Value {
    for _ in 0..100 {
        let all = env.management.get("connections").await.unwrap();
        if let Some(found) = all
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["client_properties"]["connection_name"].as_str() == Some(name))
        {
            return found.clone();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection named {name} in the management API");
}

#[tokio::test]
async fn an_amqps_url_with_the_deployments_ca_connects_over_tls() {
    let env = TestEnv::new().await;
    let name = format!("{}-amqps", env.vhost);
    let addresses = BrokerAddresses::parse(&env.amqps_url()).unwrap();
    let connection = addresses.connect(&name, None, TIMEOUT).await.unwrap();
    let seen = connection_named(&env, &name).await;
    // Encrypted, on the TLS listener: never a plain connection to 5671's
    // neighbour that a URL's `s` was silently dropped for.
    assert_eq!(seen["ssl"], true, "{seen}");
    assert_eq!(seen["port"], 5671, "{seen}");
    assert!(
        seen["ssl_protocol"].as_str().unwrap().starts_with("tlsv1."),
        "{seen}"
    );
    connection.close(200, "done".into()).await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_broker_certificate_no_trusted_ca_signed_is_refused() {
    let env = TestEnv::new().await;
    // The platform's roots alone: the test CA is not among them.
    let untrusted = env.amqps_url().split('?').next().unwrap().to_owned();
    let refused = BrokerAddresses::parse(&untrusted)
        .unwrap()
        .connect("amqps-untrusted", None, TIMEOUT)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("certificate"), "{refused}");

    // Another CA than the one that signed the broker's certificate.
    let other = TestCertificate::make(&format!("{}-other-ca", env.vhost));
    let wrong_ca = format!("{untrusted}?cacertfile={}", other.ca.display());
    let refused = BrokerAddresses::parse(&wrong_ca)
        .unwrap()
        .connect("amqps-wrong-ca", None, TIMEOUT)
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("certificate"), "{refused}");
    other.remove();
    env.cleanup().await;
}

#[tokio::test]
async fn a_ca_file_that_cannot_be_read_is_bad_configuration_at_start() {
    let env = TestEnv::new().await;
    let url = env
        .amqps_url()
        .replace(testkit::BROKER_TLS_CA, "/nonexistent/ca.pem");
    let source = settings::Source::from_pairs([("AMQP_URL", url.as_str())]);
    let refused = topology::addresses::amqp_url(&source)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("/nonexistent/ca.pem"), "{refused}");
    assert!(
        !refused.contains("guest:guest"),
        "password shown: {refused}"
    );
    let not_pem = env
        .amqps_url()
        .replace(testkit::BROKER_TLS_CA, "/etc/hostname");
    let source = settings::Source::from_pairs([("AMQP_URL", not_pem.as_str())]);
    let refused = topology::addresses::amqp_url(&source)
        .unwrap_err()
        .to_string();
    assert!(refused.contains("no PEM certificate"), "{refused}");
    env.cleanup().await;
}
