#![allow(dead_code, clippy::unwrap_used)]

pub use runtime::testing::probe;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use probe::{PROBE_TABLES, Probe, ProbeHandler, probe_spec};
use runtime::{Handler, Outgoing, Worker, WorkerSettings};
use std::time::Duration;
use testkit::TestEnv;
use tokio::sync::oneshot;

pub fn settings(env: &TestEnv, retry_delays: &str) -> WorkerSettings {
    WorkerSettings {
        amqp_url: runtime::SecretUrl::new(env.amqp_url.clone()),
        database_url: runtime::SecretUrl::new(env.database_url.clone()),
        retry_delays: retry_delays.parse().unwrap(),
        prefetch: 16,
        concurrency: 4,
        batch_size: 8,
        batch_linger: Duration::ZERO,
        database_pool_size: 10,
        outbox_sweep_after: Duration::from_millis(500),
        inbox_retention: Duration::from_secs(30 * 86_400),
        metrics_addr: None,
        handler_timeout: Duration::from_secs(60),
        breaker: runtime::BreakerSettings::default(),
    }
}

/// Migrates the test database and creates the probe tables.
pub async fn prepare(env: &TestEnv) -> sqlx::PgPool {
    let pool = env.pool().await;
    runtime::db::migrate(&pool).await.unwrap();
    sqlx::raw_sql(PROBE_TABLES).execute(&pool).await.unwrap();
    pool
}

/// A worker running in this process until the returned sender fires.
pub struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Declares the whole topology, as `topology apply` does before a deployment.
pub async fn apply_topology(env: &TestEnv, retry_delays: &str) {
    env.declare_topology(retry_delays).await;
}

pub async fn start_worker(env: &TestEnv, retry_delays: &str) -> Running {
    start_probe::<true>(env, settings(env, retry_delays)).await
}

/// A worker with settings of the test's choosing.
pub async fn start_worker_with(env: &TestEnv, settings: WorkerSettings) -> Running {
    start_probe::<true>(env, settings).await
}

/// A worker whose handler declares no effect outside the database.
pub async fn start_database_only_worker(env: &TestEnv, retry_delays: &str) -> Running {
    start_probe::<false>(env, settings(env, retry_delays)).await
}

async fn start_probe<const OUTSIDE_EFFECTS: bool>(
    env: &TestEnv,
    settings: WorkerSettings,
) -> Running {
    runtime::telemetry::init().ok();
    apply_topology(env, &settings.retry_delays.to_string()).await;
    let pool = prepare(env).await;
    // The probe records invocations outside the handler's transaction: on
    // a pool of its own, so it never waits for the transactions to end.
    let handler = ProbeHandler::<OUTSIDE_EFFECTS> {
        pool: env.pool().await,
    };
    run(Worker::with_pool(probe_spec(), settings, pool, handler))
}

/// Runs `worker` in this process until [`Running::stop`].
pub fn run<H: Handler>(worker: Worker<H>) -> Running {
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    Running { stop, task }
}

/// A probe message that succeeds, named `id`.
pub fn probe(id: &str) -> Probe {
    Probe {
        id: id.into(),
        ..Probe::default()
    }
}

pub async fn send(env: &TestEnv, probe: &Probe) -> Outgoing {
    let out = Outgoing::of(probe).correlated(&probe.id);
    env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
        .await;
    out
}

/// Sends many probes on one channel, each confirmed.
pub async fn send_many(env: &TestEnv, probes: impl IntoIterator<Item = Probe>) {
    let conn = env.connection().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .confirm_select(lapin::options::ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::new();
    for probe in probes {
        let out = Outgoing::of(&probe).correlated(&probe.id);
        confirms.push(
            channel
                .basic_publish(
                    out.exchange.as_str().into(),
                    out.routing_key.as_str().into(),
                    lapin::options::BasicPublishOptions::default(),
                    &out.body,
                    out.properties(),
                )
                .await
                .unwrap(),
        );
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack(), "publish not confirmed");
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Commits, in a transaction of its own, what a handler transaction writes
/// to the outbox: deletes the `relayed` rows and writes `messages`; returns
/// the new rows' ids.
pub async fn commit_outbox(
    pool: &sqlx::PgPool,
    store: &runtime::store::Store,
    relayed: &[i64],
    messages: &[Outgoing],
) -> Vec<i64> {
    let mut tx = pool.begin().await.unwrap();
    let ids = store
        .write_outbox(&mut tx, relayed, messages)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    ids
}

pub async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
        .fetch_one(pool)
        .await
        .unwrap()
}

pub fn header(props: &BasicProperties, name: &str) -> Option<AMQPValue> {
    props
        .headers()
        .as_ref()
        .and_then(|h: &FieldTable| h.inner().get(name).cloned())
}

pub fn header_text(props: &BasicProperties, name: &str) -> String {
    match header(props, name) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

pub fn header_number(props: &BasicProperties, name: &str) -> Option<i64> {
    props
        .headers()
        .as_ref()
        .and_then(|h| runtime::envelope::header_int(h, name))
}

/// The value of the sample of `metric` whose labels include `label`, in a
/// worker's `/metrics` text; 0 when there is none.
pub fn sample(text: &str, metric: &str, label: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse().unwrap())
}
