//! The gateway client against the simulator, where idempotency matters: a
//! charge asked again while the first request is still being processed is
//! answered `409` by the provider, which is a reason to ask later (transient),
//! never a refusal, and never a second charge.
#![allow(clippy::unwrap_used)]

use payment_gateway_sim::{Gateway, Trouble};
use payment_worker::GatewaySettings;
use payment_worker::gateway::{ChargeOutcome, GatewayClient, GatewayError};
use std::time::Duration;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_charge_asked_again_while_the_first_is_in_flight_is_transient_and_charges_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let router = Gateway::new(Trouble {
        late_charge_ms: 800,
        ..Trouble::default()
    })
    .router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = GatewayClient::new(&GatewaySettings {
        url,
        timeout: Duration::from_secs(5),
        max_in_flight: 4,
        ca_file: None,
    })
    .unwrap();
    let order = Uuid::new_v4();

    let first = {
        let client = client.clone();
        tokio::spawn(async move { client.charge(order, 700, "EUR", "pm_card_visa").await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let again = client.charge(order, 700, "EUR", "pm_card_visa").await;
    match again {
        Err(e @ GatewayError::InFlight(_)) => {
            assert!(e.to_string().contains("409"), "{e}");
            // Transient, and not the provider's unavailability: its breaker
            // does not count it.
            assert!(matches!(
                runtime::Failure::from(e),
                runtime::Failure::Transient(_)
            ));
        }
        Err(other) => panic!("a 409 was taken as a refusal: {other}"),
        Ok(_) => panic!("charged while the first request was in flight"),
    }
    let first_id = match first.await.unwrap().unwrap() {
        ChargeOutcome::Charged { charge_id } => charge_id,
        ChargeOutcome::Declined { reason } => panic!("declined: {reason}"),
    };
    let later = match client
        .charge(order, 700, "EUR", "pm_card_visa")
        .await
        .unwrap()
    {
        ChargeOutcome::Charged { charge_id } => charge_id,
        ChargeOutcome::Declined { reason } => panic!("declined: {reason}"),
    };
    assert_eq!(later, first_id, "the first request's answer, again");
    assert_eq!(client.charges_of(order).await.unwrap().len(), 1);
}
