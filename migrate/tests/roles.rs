//! `migrate --roles` against the real PostgreSQL: each binary's role does
//! its own work, and is refused (SQLSTATE 42501) what belongs to another
//! binary and any change to the schema.
#![allow(clippy::unwrap_used)]

use migrate::Cli;
use runtime::db::DbError;
use runtime::db::roles::roles;
use settings::Source;
use sqlx::PgPool;
use testkit::TestEnv;

const PASSWORD: &str = "a-test-password-of-some-length";

fn prefix(env: &TestEnv) -> String {
    format!("{}_", env.database)
}

fn source<'a>(env: &'a TestEnv, passwords: &[(&'a str, &'a str)]) -> Source {
    let mut pairs = vec![("DATABASE_URL", env.database_url.as_str())];
    pairs.extend_from_slice(passwords);
    Source::from_pairs(pairs)
}

fn all_passwords() -> Vec<(&'static str, &'static str)> {
    roles().iter().map(|r| (r.password_var, PASSWORD)).collect()
}

async fn apply_roles(env: &TestEnv) -> anyhow::Result<()> {
    let cli = Cli {
        roles: true,
        role_prefix: prefix(env),
    };
    migrate::run(cli, &source(env, &all_passwords())).await
}

/// A pool connected as `binary`'s role.
async fn connect_as(env: &TestEnv, binary: &str) -> PgPool {
    let role = roles().into_iter().find(|r| r.binary == binary).unwrap();
    let url = format!(
        "postgres://{}:{PASSWORD}@127.0.0.1:5432/{}",
        role.name(&prefix(env)),
        env.database
    );
    runtime::db::connect(&url, 2, binary).await.unwrap()
}

async fn allowed(pool: &PgPool, sql: &str) {
    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await {
        panic!("{sql}: {e}");
    }
}

/// Refused for want of a privilege (or, for the publisher's writes, by its
/// read-only transactions: 25006).
async fn refused(pool: &PgPool, sql: &str) {
    match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await {
        Ok(_) => panic!("{sql}: allowed"),
        Err(sqlx::Error::Database(db)) => {
            let code = db.code().unwrap_or_default().into_owned();
            assert!(
                code == "42501" || code == "25006",
                "{sql}: {code} {}",
                db.message()
            );
        }
        Err(e) => panic!("{sql}: {e}"),
    }
}

async fn remove_roles(env: TestEnv) {
    let prefix = prefix(&env);
    let names: Vec<String> = roles().iter().map(|r| r.name(&prefix)).collect();
    env.cleanup().await;
    testkit::drop_database_roles(&names).await;
}

#[tokio::test]
async fn each_binary_may_do_its_own_work_and_nothing_of_another() {
    let env = TestEnv::new().await;
    apply_roles(&env).await.unwrap();

    let order = connect_as(&env, "order-worker").await;
    allowed(
        &order,
        "INSERT INTO orders.inbox (consumer, message_id) VALUES ('t', gen_random_uuid())",
    )
    .await;
    allowed(&order, "INSERT INTO orders.outbox (message_id, exchange, routing_key, kind, body) VALUES (gen_random_uuid(), 'e', 'k', 'command', '\\x00')").await;
    allowed(&order, "INSERT INTO orders.products (sku, unit_price_cents, currency) VALUES ('SKU-1', 100, 'EUR')").await;
    refused(&order, "SELECT 1 FROM inventory.stock").await;
    refused(&order, "SELECT 1 FROM payments.payments").await;
    refused(&order, "SELECT 1 FROM dlq.archive").await;
    refused(&order, "CREATE TABLE orders.extra (i int)").await;
    refused(&order, "DROP TABLE orders.inbox").await;
    refused(&order, "CREATE TABLE public.extra (i int)").await;

    let inventory = connect_as(&env, "inventory-worker").await;
    allowed(
        &inventory,
        "INSERT INTO inventory.stock (sku, available) VALUES ('SKU-1', 5)",
    )
    .await;
    refused(&inventory, "SELECT 1 FROM orders.orders").await;
    refused(&inventory, "UPDATE payments.payments SET status = status").await;

    let payment = connect_as(&env, "payment-worker").await;
    allowed(&payment, "SELECT 1 FROM payments.payments").await;
    refused(&payment, "UPDATE inventory.stock SET available = 1000").await;

    let notification = connect_as(&env, "notification-worker").await;
    allowed(&notification, "SELECT 1 FROM notifications.sent").await;
    refused(&notification, "SELECT customer_email FROM orders.orders").await;

    // The publisher reads what the API shows, and writes nothing.
    let publisher = connect_as(&env, "publisher").await;
    allowed(
        &publisher,
        "SELECT 1 FROM orders.orders JOIN orders.order_items ON id = order_id",
    )
    .await;
    allowed(&publisher, "SELECT unit_price_cents FROM orders.products").await;
    allowed(&publisher, "SELECT available FROM inventory.stock").await;
    refused(
        &publisher,
        "UPDATE orders.products SET unit_price_cents = 1",
    )
    .await;
    refused(
        &publisher,
        "INSERT INTO inventory.stock (sku, available) VALUES ('FREE', 1000)",
    )
    .await;
    refused(&publisher, "SELECT 1 FROM orders.outbox").await;
    refused(&publisher, "SELECT 1 FROM payments.payments").await;

    // dlq reads each inbox (applied or not) and writes its own schema.
    let dlq = connect_as(&env, "dlq").await;
    allowed(&dlq, "SELECT 1 FROM payments.inbox").await;
    allowed(&dlq, "INSERT INTO dlq.audit (operator, action, queue, message_id, detail) VALUES ('t', 'replay', 'order.dead', gen_random_uuid(), '{}')").await;
    refused(
        &dlq,
        "INSERT INTO orders.inbox (consumer, message_id) VALUES ('t', gen_random_uuid())",
    )
    .await;
    refused(&dlq, "SELECT 1 FROM orders.orders").await;

    // Each checks the schema at start, which needs no right to change it.
    for pool in [
        &order,
        &inventory,
        &payment,
        &notification,
        &publisher,
        &dlq,
    ] {
        runtime::db::migrate(pool).await.unwrap();
        pool.close().await;
    }
    remove_roles(env).await;
}

#[tokio::test]
async fn applying_again_takes_back_a_right_granted_by_hand() {
    let env = TestEnv::new().await;
    apply_roles(&env).await.unwrap();
    let admin = env.pool().await;
    let role = format!("{}order_worker", prefix(&env));
    allowed(
        &admin,
        &format!("GRANT USAGE ON SCHEMA inventory TO {role}"),
    )
    .await;
    allowed(
        &admin,
        &format!("GRANT SELECT ON inventory.stock TO {role}"),
    )
    .await;
    let order = connect_as(&env, "order-worker").await;
    allowed(&order, "SELECT 1 FROM inventory.stock").await;
    apply_roles(&env).await.unwrap();
    refused(&order, "SELECT 1 FROM inventory.stock").await;
    order.close().await;
    admin.close().await;
    remove_roles(env).await;
}

#[tokio::test]
async fn a_role_that_finds_migrations_pending_says_to_run_migrate_or_waits_for_it() {
    let env = TestEnv::new().await;
    apply_roles(&env).await.unwrap();
    let admin = env.pool().await;
    // The ledger's last row, kept aside: the schema looks one migration behind.
    allowed(&admin, "CREATE TABLE public.kept AS SELECT * FROM _sqlx_migrations WHERE version = (SELECT max(version) FROM _sqlx_migrations)").await;
    let last: i64 = sqlx::query_scalar("DELETE FROM _sqlx_migrations WHERE version = (SELECT version FROM public.kept) RETURNING version")
        .fetch_one(&admin)
        .await
        .unwrap();
    let order = connect_as(&env, "order-worker").await;
    match runtime::db::migrate(&order).await {
        Err(DbError::Pending { count, first }) => {
            assert_eq!((count, first), (1, last));
            let said = DbError::Pending { count, first }.to_string();
            assert!(said.contains("run `migrate`"), "{said}");
        }
        other => panic!("{other:?}"),
    }
    // The migrator's advisory lock goes with the connection that failed (its
    // server process ends a moment after the close): a pooled session
    // keeping it would block every later run for ever.
    let role = format!("{}order_worker", prefix(&env));
    testkit::eventually(
        std::time::Duration::from_secs(10),
        "no session of the role holding the migrator's lock",
        || async {
            let held: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND a.usename = $1",
            )
            .bind(&role)
            .fetch_one(&admin)
            .await
            .unwrap();
            held == 0
        },
    )
    .await;
    // A worker waits for the owner's `migrate` instead of failing.
    let waiting = tokio::spawn({
        let order = order.clone();
        async move { runtime::db::migrate_when_current(&order).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!waiting.is_finished(), "did not wait for the schema");
    allowed(
        &admin,
        "INSERT INTO _sqlx_migrations SELECT * FROM public.kept",
    )
    .await;
    tokio::time::timeout(std::time::Duration::from_secs(15), waiting)
        .await
        .expect("still waiting once the schema is current")
        .unwrap()
        .unwrap();
    order.close().await;
    admin.close().await;
    remove_roles(env).await;
}

#[tokio::test]
async fn missing_or_weak_passwords_and_a_bad_prefix_change_nothing() {
    let env = TestEnv::new().await;
    let cli = |prefix: &str| Cli {
        roles: true,
        role_prefix: prefix.to_owned(),
    };
    let mut passwords = all_passwords();
    passwords.pop();
    let missing = migrate::run(cli(&prefix(&env)), &source(&env, &passwords))
        .await
        .unwrap_err()
        .to_string();
    assert!(missing.contains("DATABASE_PASSWORD_DLQ"), "{missing}");
    let mut weak = all_passwords();
    weak[0].1 = "short";
    let refused = migrate::run(cli(&prefix(&env)), &source(&env, &weak))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("at least 16"), "{refused}");
    assert!(!refused.contains("short\""), "password shown: {refused}");
    let bad = migrate::run(cli("Bad-Prefix"), &source(&env, &all_passwords()))
        .await
        .unwrap_err()
        .to_string();
    assert!(bad.contains("--role-prefix"), "{bad}");
    // Nothing was created: not even the migrations ran.
    let admin = env.pool().await;
    let ledger: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('public._sqlx_migrations')::text")
            .fetch_one(&admin)
            .await
            .unwrap();
    assert_eq!(ledger, None);
    let made: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_roles WHERE rolname LIKE $1")
        .bind(format!("{}%", prefix(&env)))
        .fetch_one(&admin)
        .await
        .unwrap();
    assert_eq!(made, 0);
    admin.close().await;
    env.cleanup().await;
}
