//! The PostgreSQL pool and migrations.

pub mod roles;

use backon::Retryable;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;
use tracing::{info, warn};

/// The migrations of every domain schema, embedded in each binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot reach PostgreSQL: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot create database {name:?}: {source}")]
    Create {
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "{count} migration(s) pending, from version {first}, and this role may not apply them: run `migrate` with the database owner's DATABASE_URL first"
    )]
    Pending { count: usize, first: i64 },
}

/// Reads `DATABASE_URL` as libpq would, with one difference: a URL that
/// names a loopback host (or a Unix socket) and sets no `sslmode` (nor
/// `PGSSLMODE`) connects without TLS instead of libpq's `prefer`. Nothing
/// on loopback can be overheard by anyone who could not also read the
/// database's memory, and TLS there costs both sides CPU on every message
/// (decision 0006). An explicit `sslmode` is always kept.
///
/// Each connection names its process to the server as `application` (what
/// `pg_stat_activity` and the server's log show an operator, so that a
/// lock or a long query points at `order-worker` rather than at an unnamed
/// client), unless the URL's `application_name` or `PGAPPNAME` names it.
pub fn connect_options(url: &str, application: &str) -> Result<PgConnectOptions, DbError> {
    let mut options = PgConnectOptions::from_str(url).map_err(DbError::BadUrl)?;
    if options.get_application_name().is_none() {
        options = options.application_name(application);
    }
    let explicit = std::env::var_os("PGSSLMODE").is_some()
        || url::Url::parse(url).is_ok_and(|u| {
            u.query_pairs()
                .any(|(k, _)| k == "sslmode" || k == "ssl-mode")
        });
    if !explicit && is_loopback(&options) {
        return Ok(options.ssl_mode(PgSslMode::Disable));
    }
    Ok(options)
}

fn is_loopback(options: &PgConnectOptions) -> bool {
    if options.get_socket().is_some() {
        return true;
    }
    let host = options.get_host();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.starts_with('/')
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Connects a pool to `url` as `application`, creating the database if it
/// does not exist.
pub async fn connect(
    url: &str,
    max_connections: u32,
    application: &str,
) -> Result<PgPool, DbError> {
    let options = connect_options(url, application)?;
    create_database_if_missing(&options).await?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        // No ping before each use: it is a round trip per message, and a
        // connection that died fails the statement instead, which the
        // handler classifies as transient and the consumer retries.
        .test_before_acquire(false)
        .connect_with(options)
        .await
        .map_err(DbError::Connect)
}

/// [`connect`], waiting for a server that cannot be reached yet (not
/// listening, starting up, out of connection slots): retried with backoff,
/// capped at 5 s, each attempt logged, so a worker started before its
/// database (a host booting, a compose file without health checks) comes
/// up when the database does. A URL that cannot be read, a password the
/// server refuses, a database that cannot be created: returned at once.
pub async fn connect_when_reachable(
    url: &str,
    max_connections: u32,
    application: &str,
) -> Result<PgPool, DbError> {
    (|| connect(url, max_connections, application))
        .retry(crate::broker::until_reachable())
        .when(|e| matches!(e, DbError::Connect(e) if unreachable(e)))
        .notify(|e, delay| warn!(error = %e, retry_in = ?delay, "Database unreachable"))
        .await
}

/// Whether connecting failed for want of a server that answers, which
/// time may mend: the connection refused or cut, the server starting up
/// or shutting down (class 57), out of connection slots (class 53).
fn unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|code| code.starts_with("57") || code.starts_with("53")),
        _ => false,
    }
}

async fn create_database_if_missing(options: &PgConnectOptions) -> Result<(), DbError> {
    let name = options.get_database().unwrap_or("postgres").to_owned();
    let mut admin = options
        .clone()
        .database("postgres")
        .connect()
        .await
        .map_err(DbError::Connect)?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut admin)
            .await
            .map_err(DbError::Connect)?;
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        let result = sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {quoted}")))
            .execute(&mut admin)
            .await;
        match result {
            Ok(_) => info!(database = %name, "Created database"),
            // Another replica created it between our check and our create.
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P04") => {}
            Err(source) => return Err(DbError::Create { name, source }),
        }
    }
    let _ = admin.close().await;
    Ok(())
}

/// Applies pending migrations. The migrator holds a PostgreSQL advisory lock
/// while it runs, so replicas starting together apply each migration once.
/// A schema already current is only checked, which a role without the
/// right to change it (`roles`) may do; such a role finding migrations
/// pending is told to run `migrate` as the owner.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let pending = pending_migrations(pool).await;
    let Some(&first) = pending.first() else {
        return Ok(());
    };
    // On a connection of its own, closed after: the migrator holds a
    // session-level advisory lock that it does not release when a migration
    // fails, and a pooled connection keeping it would block every later
    // run (another replica's, or this worker's next try) for ever.
    let own = PgPoolOptions::new()
        .max_connections(1)
        .connect_with((*pool.connect_options()).clone())
        .await
        .map_err(DbError::Connect)?;
    let result = MIGRATOR.run(&own).await;
    own.close().await;
    match result {
        Ok(()) => Ok(()),
        Err(sqlx::migrate::MigrateError::Execute(sqlx::Error::Database(db)))
            if db.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) =>
        {
            Err(DbError::Pending {
                count: pending.len(),
                first,
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// [`migrate`], waiting (with backoff, each wait logged) while migrations
/// are pending that this role may not apply: a worker started beside the
/// owner's `migrate` (a Kubernetes Job, a compose service) comes up once
/// the schema is current, instead of failing and being restarted.
pub async fn migrate_when_current(pool: &PgPool) -> Result<(), DbError> {
    (|| migrate(pool))
        .retry(crate::broker::until_reachable())
        .when(|e| matches!(e, DbError::Pending { .. }))
        .notify(|e, delay| warn!(error = %e, retry_in = ?delay, "Database schema not current yet"))
        .await
}

/// SQLSTATE 42501: the role lacks a privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// The versions of the migrations this binary carries that the database's
/// ledger does not hold as applied, with the same checksum. All of them
/// when the ledger cannot be read (a new database).
async fn pending_migrations(pool: &PgPool) -> Vec<i64> {
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .filter(|m| {
            !applied
                .iter()
                .any(|(version, checksum)| *version == m.version && **checksum == *m.checksum)
        })
        .map(|m| m.version)
        .collect()
}

/// Warns when the server runs without autovacuum. Every message leaves a
/// dead outbox row and non-HOT row versions behind, and each connection
/// keeps the plans it made while the tables were small until an `ANALYZE`
/// invalidates them: without autovacuum, a worker that ran at 1,200
/// orders/s fell to 76 within 100,000 orders (`docs/BENCHMARKS.md`).
pub async fn warn_if_autovacuum_off(pool: &PgPool) {
    match autovacuum_off(pool).await {
        Ok(true) => tracing::warn!(
            "PostgreSQL runs with autovacuum off: the inbox, outbox and domain tables bloat \
             and statements keep plans made while they were empty; turn it on or vacuum and \
             analyze by hand"
        ),
        Ok(false) => {}
        Err(e) => tracing::debug!(error = %e, "autovacuum setting not read"),
    }
}

/// Whether the server runs without autovacuum.
pub async fn autovacuum_off(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let setting: String = sqlx::query_scalar("SHOW autovacuum")
        .fetch_one(pool)
        .await?;
    Ok(autovacuum_is_off(&setting))
}

/// `SHOW` prints a boolean setting as `on` or `off`.
fn autovacuum_is_off(setting: &str) -> bool {
    setting.trim().eq_ignore_ascii_case("off")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(url: &str) -> PgSslMode {
        connect_options(url, "test")
            .expect("valid URL")
            .get_ssl_mode()
    }

    #[test]
    fn autovacuum_is_off_only_when_shown_off() {
        for off in ["off", "OFF", " off\n"] {
            assert!(autovacuum_is_off(off), "{off:?}");
        }
        for on in ["on", "ON", ""] {
            assert!(!autovacuum_is_off(on), "{on:?}");
        }
    }

    #[test]
    fn loopback_without_sslmode_connects_without_tls() {
        for url in [
            "postgres://postgres@127.0.0.1:5432/orderflow",
            "postgres://postgres@127.0.0.2/orderflow",
            "postgres://postgres@localhost/orderflow",
            "postgres://postgres@[::1]:5432/orderflow",
            "postgres://postgres@%2Fvar%2Frun%2Fpostgresql/orderflow",
        ] {
            assert!(matches!(mode(url), PgSslMode::Disable), "{url}");
        }
    }

    #[test]
    fn an_explicit_sslmode_or_a_remote_host_keeps_libpq_behaviour() {
        assert!(matches!(
            mode("postgres://postgres@127.0.0.1/orderflow?sslmode=require"),
            PgSslMode::Require
        ));
        assert!(matches!(
            mode("postgres://postgres@localhost/orderflow?sslmode=prefer"),
            PgSslMode::Prefer
        ));
        assert!(!matches!(
            mode("postgres://postgres@db.internal:5432/orderflow"),
            PgSslMode::Disable
        ));
        assert!(!matches!(
            mode("postgres://postgres@10.0.0.5/orderflow"),
            PgSslMode::Disable
        ));
    }

    #[test]
    fn a_connection_names_its_process_unless_the_url_names_it() {
        let name = |url: &str| {
            connect_options(url, "order-worker")
                .expect("valid URL")
                .get_application_name()
                .map(str::to_owned)
        };
        // A `PGAPPNAME` in the environment of the test run names it
        // instead, as it would for libpq.
        if std::env::var_os("PGAPPNAME").is_none() {
            assert_eq!(
                name("postgres://postgres@127.0.0.1/orderflow").as_deref(),
                Some("order-worker")
            );
        }
        assert_eq!(
            name("postgres://postgres@127.0.0.1/orderflow?application_name=shop-eu-1").as_deref(),
            Some("shop-eu-1")
        );
    }

    #[test]
    fn a_garbage_url_is_a_clear_error() {
        let err = connect_options("not a url", "test")
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("DATABASE_URL is not a valid")),
            "{err:?}"
        );
    }
}
