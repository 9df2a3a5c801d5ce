//! How the runtime connects to the real PostgreSQL.
#![allow(clippy::unwrap_used)]

use runtime::db;
use testkit::TestEnv;

async fn uses_tls(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_loopback_url_without_sslmode_connects_in_plain_text_and_an_explicit_sslmode_is_kept() {
    let env = TestEnv::new().await;
    let plain = db::connect(&env.database_url, 1, "db-test").await.unwrap();
    assert!(!uses_tls(&plain).await, "loopback without sslmode uses TLS");
    let server_tls: String = sqlx::query_scalar("SHOW ssl")
        .fetch_one(&plain)
        .await
        .unwrap();
    plain.close().await;

    let required = db::connect(
        &format!("{}?sslmode=require", env.database_url),
        1,
        "db-test",
    )
    .await;
    if server_tls == "on" {
        let required = required.unwrap();
        assert!(uses_tls(&required).await, "sslmode=require did not use TLS");
        required.close().await;
    } else {
        let err = required.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("cannot reach PostgreSQL"), "{err}");
    }
    env.cleanup().await;
}

#[tokio::test]
async fn the_autovacuum_setting_is_read_from_the_server_and_a_closed_pool_is_an_error() {
    let env = TestEnv::new().await;
    let pool = db::connect(&env.database_url, 1, "db-test").await.unwrap();
    let server_off: bool = sqlx::query_scalar("SELECT current_setting('autovacuum') = 'off'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(db::autovacuum_off(&pool).await.unwrap(), server_off);
    pool.close().await;
    assert!(db::autovacuum_off(&pool).await.is_err());
    env.cleanup().await;
}

#[tokio::test]
async fn the_server_sees_each_connection_under_its_process_name() {
    let env = TestEnv::new().await;
    let named = db::connect(&env.database_url, 1, "inventory-worker")
        .await
        .unwrap();
    let seen: String = sqlx::query_scalar(
        "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()",
    )
    .fetch_one(&named)
    .await
    .unwrap();
    assert_eq!(seen, "inventory-worker");
    named.close().await;

    let url = format!("{}?application_name=shop-eu-1", env.database_url);
    let chosen = db::connect(&url, 1, "inventory-worker").await.unwrap();
    let seen: String = sqlx::query_scalar("SHOW application_name")
        .fetch_one(&chosen)
        .await
        .unwrap();
    assert_eq!(seen, "shop-eu-1");
    chosen.close().await;
    env.cleanup().await;
}

#[tokio::test]
async fn connecting_before_the_database_is_up_waits_for_it() {
    let env = TestEnv::new().await;
    // A port nothing listens on yet: connections are refused.
    let port = testkit::free_port();
    let url = env
        .database_url
        .replacen("127.0.0.1:5432", &format!("127.0.0.1:{port}"), 1);
    assert_ne!(url, env.database_url, "{}", env.database_url);
    let connecting =
        tokio::spawn(async move { db::connect_when_reachable(&url, 1, "db-test").await });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(
        !connecting.is_finished(),
        "gave up on a database not up yet"
    );
    // The database comes up.
    let forwarder = testkit::Forwarder::on(port, "127.0.0.1:5432").await;
    let pool = tokio::time::timeout(std::time::Duration::from_secs(60), connecting)
        .await
        .expect("still waiting after the database came up")
        .unwrap()
        .unwrap();
    let one: i32 = sqlx::query_scalar("SELECT 1")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(one, 1);
    pool.close().await;
    forwarder.cut();
    env.cleanup().await;
}

#[tokio::test]
async fn a_database_that_answers_no_is_not_waited_for() {
    // A role the server does not know: an answer, not an absence.
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        db::connect_when_reachable(
            "postgres://no_such_role_orderflow@127.0.0.1:5432/postgres",
            1,
            "db-test",
        ),
    )
    .await
    .expect("waited for a server that had answered");
    let err = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(err.contains("no_such_role_orderflow"), "{err}");
}
