//! How the runtime connects to the real RabbitMQ.
#![allow(clippy::unwrap_used)]

use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use runtime::broker::{self, FRAME_MAX, Publisher};
use std::time::Duration;
use testkit::{TestEnv, eventually};

/// The `frame_max` the broker agreed with the connection named `name`.
async fn negotiated_frame_max(env: &TestEnv, name: &str) -> Option<u64> {
    env.frame_max_by_connection()
        .await
        .into_iter()
        .find_map(|(n, frame_max)| (n == name).then_some(frame_max))
}

#[tokio::test]
async fn a_publisher_of_its_own_messages_proposes_a_32_kib_frame_and_others_take_the_brokers() {
    let env = TestEnv::new().await;
    let own = Publisher::lazy(&env.amqp_url, "frame-own").own_messages_only();
    own.ensure_connected().await.unwrap();
    let named = Publisher::lazy(&format!("{}?frame_max=65536", env.amqp_url), "frame-named")
        .own_messages_only();
    named.ensure_connected().await.unwrap();
    let republishing = Publisher::lazy(&env.amqp_url, "frame-republishing");
    republishing.ensure_connected().await.unwrap();
    let consuming = broker::connect(&env.amqp_url, "frame-consuming")
        .await
        .unwrap();
    // The broker's own default: a consumer must take whatever another
    // client could publish.
    let brokers = 131_072;
    for (name, expected) in [
        ("frame-own", u64::from(FRAME_MAX)),
        ("frame-named", 65_536),
        ("frame-republishing", brokers),
        ("frame-consuming", brokers),
    ] {
        eventually(
            Duration::from_secs(10),
            &format!("{name} agreed frame_max {expected}"),
            || async { negotiated_frame_max(&env, name).await == Some(expected) },
        )
        .await;
    }
    for publisher in [own, named, republishing] {
        publisher.close().await;
    }
    let _ = consuming.close(200, "done".into()).await;
    env.cleanup().await;
}

#[tokio::test]
async fn a_url_that_is_not_an_amqp_uri_is_a_clear_error() {
    for url in [
        "",
        "not a url",
        "http://127.0.0.1:5672/",
        "amqp://127.0.0.1:5672/?frame_max=x",
    ] {
        let err = broker::connect(url, "garbage").await.err().unwrap();
        assert!(
            err.to_string().contains("AMQP_URL is not an AMQP URI"),
            "{url:?}: {err}"
        );
    }
}

#[tokio::test]
async fn a_message_larger_than_a_frame_goes_out_and_comes_back_whole() {
    let env = TestEnv::new().await;
    let queue = "frames";
    let admin = env.connection().await;
    admin
        .create_channel()
        .await
        .unwrap()
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // A body of ten frames, and headers of half a frame.
    let body: Vec<u8> = (0..10 * FRAME_MAX).map(|i| (i % 251) as u8).collect();
    let header = "h".repeat(FRAME_MAX as usize / 2);
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from("x-big"),
        AMQPValue::LongString(LongString::from(header.clone())),
    );
    let publisher = Publisher::lazy(&env.amqp_url, "frames-out").own_messages_only();
    publisher
        .publish_raw(
            "",
            queue,
            &body,
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    publisher.close().await;

    // Read back over a connection proposing the small frame too: the
    // broker splits the body to the frame each connection agreed.
    let reader = broker::connect(
        &format!("{}?frame_max={FRAME_MAX}", env.amqp_url),
        "frames-in",
    )
    .await
    .unwrap();
    let message = reader
        .create_channel()
        .await
        .unwrap()
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(message.delivery.data, body);
    let got = message
        .delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-big").cloned());
    assert_eq!(got, Some(AMQPValue::LongString(LongString::from(header))));
    let _ = reader.close(200, "done".into()).await;
    let _ = admin.close(200, "done".into()).await;
    env.cleanup().await;
}

/// `AMQP_URL` with the nodes of a cluster: `127.0.0.1:<port>` for each.
fn cluster_url(env: &TestEnv, ports: &[u16]) -> String {
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    env.amqp_url_with_nodes(&nodes)
}

#[tokio::test]
async fn a_node_that_refuses_is_passed_over_for_the_next() {
    let env = TestEnv::new().await;
    let gone = testkit::free_port();
    let live = testkit::Forwarder::start(testkit::BROKER).await;
    // Whichever node this process prefers first, each is tried.
    for ports in [[gone, live.port], [live.port, gone]] {
        let url = cluster_url(&env, &ports);
        let connection = broker::connect(&url, "cluster-consuming").await.unwrap();
        assert!(connection.status().connected());
        let publisher = Publisher::connect(&url, "cluster-publishing")
            .await
            .unwrap();
        assert!(publisher.is_connected().await);
        publisher.close().await;
        let _ = connection.close(200, "done".into()).await;
    }
    assert!(live.carried() >= 4, "{}", live.carried());
    env.cleanup().await;
}

#[tokio::test]
async fn no_node_answering_names_every_node() {
    let env = TestEnv::new().await;
    let (a, b) = (testkit::free_port(), testkit::free_port());
    let err = broker::connect(&cluster_url(&env, &[a, b]), "cluster-none")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("no broker node answered"), "{err}");
    for port in [a, b] {
        assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    }
    assert!(!err.contains("guest:guest"), "{err}");
    env.cleanup().await;
}

#[tokio::test]
async fn a_list_of_nodes_that_is_garbage_is_a_clear_error() {
    for url in [
        "amqp://guest:guest@127.0.0.1:5672,,127.0.0.1:5673/%2f",
        "amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f",
        "amqp://guest:guest@127.0.0.1:5672,127.0.0.1:99999/%2f",
    ] {
        let err = broker::connect(url, "garbage").await.err().unwrap();
        assert!(
            err.to_string().contains("AMQP_URL is not an AMQP URI"),
            "{url:?}: {err}"
        );
    }
}

#[tokio::test]
async fn a_publish_on_a_connection_that_broke_since_its_last_use_goes_out_on_a_new_one() {
    let env = TestEnv::new().await;
    let declaring = env.connection().await;
    let channel = declaring.create_channel().await.unwrap();
    channel
        .queue_declare(
            "broke".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let broker = testkit::Forwarder::start(testkit::BROKER).await;
    let url = cluster_url(&env, &[broker.port]);
    let publisher = Publisher::connect(&url, "broke-publisher").await.unwrap();
    let publisher = &publisher;
    let one = |i: u8| async move {
        publisher
            .publish_raw("", "broke", &[i], BasicProperties::default())
            .await
    };
    one(1).await.unwrap();
    for i in 2..12 {
        // The broker restarts at the same address between two publishes.
        broker.drop_connections();
        one(i).await.unwrap();
    }
    assert!(broker.carried() >= 11, "{}", broker.carried());
    eventually(
        Duration::from_secs(20),
        "every message in the queue",
        || async { env.depth("broke").await >= 11 },
    )
    .await;
    publisher.close().await;
    let _ = declaring.close(200, "done".into()).await;
    env.cleanup().await;
}
