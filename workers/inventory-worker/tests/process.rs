//! The `inventory-worker` process from its first moments, as an
//! orchestrator probes it: alive while it still waits for its database,
//! ready only once it has reached it and consumes, and stopped by SIGTERM
//! with exit code 0.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use testkit::{Forwarder, TestEnv, eventually, free_port};

const WAIT: Duration = Duration::from_secs(60);

async fn get(http: &reqwest::Client, url: String) -> (u16, String) {
    // Refused (status 0) until the process has bound its port.
    match http.get(url).send().await {
        Ok(response) => (response.status().as_u16(), response.text().await.unwrap()),
        Err(_) => (0, String::new()),
    }
}

/// An `inventory-worker` process whose database address has nothing
/// listening on it yet, serving `METRICS_ADDR`: the process, the
/// database's port and the metrics port.
fn start_before_its_database(env: &TestEnv) -> (tokio::process::Child, u16, u16) {
    let database_port = free_port();
    let database_url =
        env.database_url
            .replacen("127.0.0.1:5432", &format!("127.0.0.1:{database_port}"), 1);
    assert_ne!(database_url, env.database_url);
    let metrics_port = free_port();
    let worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_inventory-worker"))
        .env("AMQP_URL", &env.amqp_url)
        .env("DATABASE_URL", &database_url)
        .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    (worker, database_port, metrics_port)
}

/// Sends SIGTERM and asserts that the process ends with 0.
async fn stop_with_sigterm(mut worker: tokio::process::Child) {
    let pid = worker.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(WAIT, worker.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_waiting_for_its_database_is_alive_and_ready_only_once_it_consumes() {
    let env = TestEnv::new().await;
    let (mut worker, database_port, metrics_port) = start_before_its_database(&env);
    let http = topology::https::client();
    let url = |path: &str| format!("http://127.0.0.1:{metrics_port}{path}");

    eventually(WAIT, "alive while the database is down", || async {
        get(&http, url("/healthz")).await == (200, "{\"status\":\"ok\"}\n".to_owned())
    })
    .await;
    for _ in 0..3 {
        assert_eq!(
            get(&http, url("/readyz")).await,
            (
                503,
                "{\"broker\":\"unavailable\",\"database\":\"unavailable\",\"consumer\":\"ok\",\"breakers\":{}}\n".to_owned()
            )
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        worker.try_wait().unwrap().is_none(),
        "gave up on the database"
    );

    // The database comes up at its address.
    let database = Forwarder::on(database_port, "127.0.0.1:5432").await;
    eventually(WAIT, "ready once it consumes", || async {
        get(&http, url("/readyz")).await
            == (
                200,
                "{\"broker\":\"ok\",\"database\":\"ok\",\"consumer\":\"ok\",\"breakers\":{}}\n"
                    .to_owned(),
            )
    })
    .await;

    stop_with_sigterm(worker).await;
    assert_eq!(get(&http, url("/healthz")).await.0, 0, "port still open");
    database.cut();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_the_database_ends_the_worker_with_zero() {
    let env = TestEnv::new().await;
    let (worker, _, metrics_port) = start_before_its_database(&env);
    let http = topology::https::client();
    // Alive: the process is up and waiting.
    eventually(WAIT, "alive while the database is down", || async {
        get(&http, format!("http://127.0.0.1:{metrics_port}/healthz"))
            .await
            .0
            == 200
    })
    .await;
    stop_with_sigterm(worker).await;
    env.cleanup().await;
}
