//! A handler's outside work (`Handler::prepare`) against the real broker
//! and database: the deliveries that wait together are prepared at once,
//! each is then handled in the shared transaction, and a failure while
//! preparing routes the message like a handler's failure would. A chunk is
//! prepared in one call (`Handler::prepare_many`); when that call panics,
//! its messages are prepared alone and only the one that panics again is
//! condemned.
#![allow(clippy::unwrap_used)]

mod support;

use contract::headers;
use runtime::{Context, Failure, Handler, Worker};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use support::probe::{Probe, ProbeMessage, probe_spec};
use support::{apply_topology, count, header_text, prepare, run, send, settings};
use testkit::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    most: AtomicUsize,
}

/// Prepares slowly (a gateway call stand-in), counting how many prepare at
/// once; `fail: "prepare"` refuses while preparing. Handling records the
/// effect in the transaction.
struct SlowOutside {
    preparing: Arc<Gauge>,
}

impl Handler for SlowOutside {
    type Message = ProbeMessage;

    async fn prepare(
        &self,
        _db: &sqlx::PgPool,
        message: ProbeMessage,
    ) -> Result<ProbeMessage, Failure> {
        let ProbeMessage::Probe(probe) = &message;
        let now = self.preparing.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.preparing.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.preparing.now.fetch_sub(1, Ordering::SeqCst);
        if probe.fail.as_deref() == Some("prepare") {
            return Err(Failure::permanent(format!(
                "probe {} refused while preparing",
                probe.id
            )));
        }
        Ok(message)
    }

    async fn handle(&self, ctx: &mut Context, message: ProbeMessage) -> Result<(), Failure> {
        record_effect(ctx, message).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_waiting_together_prepare_at_once_and_a_refusal_is_dead_lettered() {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms").await;
    let pool = prepare(&env).await;
    let mut probes: Vec<Probe> = (0..7)
        .map(|i| Probe {
            id: format!("p{i}"),
            ..Probe::default()
        })
        .collect();
    probes.push(Probe {
        id: "refused".into(),
        fail: Some("prepare".into()),
        ..Probe::default()
    });
    let preparing = Arc::new(Gauge::default());
    let handler = SlowOutside {
        preparing: preparing.clone(),
    };
    run_one_chunk(&env, &pool, &probes, handler, 7, "refused while preparing").await;

    let most = preparing.most.load(Ordering::SeqCst);
    assert!(most > 1, "prepared one at a time ({most} at most)");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE id = 'refused'"
        )
        .await,
        0
    );
    env.cleanup().await;
}

/// Prepares a chunk with one call (`prepare_many`), recording its size,
/// and panics there if any message of it says `fail: "panic"`; `prepare`
/// alone panics only for that message.
struct ChunkPrepared {
    chunks: Arc<std::sync::Mutex<Vec<usize>>>,
}

fn panics(message: &ProbeMessage) -> bool {
    let ProbeMessage::Probe(probe) = message;
    probe.fail.as_deref() == Some("panic")
}

impl Handler for ChunkPrepared {
    type Message = ProbeMessage;

    async fn prepare(
        &self,
        _db: &sqlx::PgPool,
        message: ProbeMessage,
    ) -> Result<ProbeMessage, Failure> {
        assert!(!panics(&message), "this probe cannot be prepared");
        Ok(message)
    }

    async fn prepare_many(
        &self,
        _db: &sqlx::PgPool,
        messages: Vec<ProbeMessage>,
    ) -> Vec<Result<ProbeMessage, Failure>> {
        self.chunks.lock().unwrap().push(messages.len());
        assert!(
            !messages.iter().any(panics),
            "this chunk cannot be prepared"
        );
        messages.into_iter().map(Ok).collect()
    }

    async fn handle(&self, ctx: &mut Context, message: ProbeMessage) -> Result<(), Failure> {
        record_effect(ctx, message).await
    }
}

/// Handling: the effect recorded in the transaction.
async fn record_effect(ctx: &mut Context, message: ProbeMessage) -> Result<(), Failure> {
    let ProbeMessage::Probe(probe) = message;
    let message_id = ctx.envelope().message_id;
    sqlx::query("INSERT INTO probe_effects (id, message_id) VALUES ($1, $2)")
        .bind(&probe.id)
        .bind(message_id)
        .execute(ctx.db())
        .await?;
    Ok(())
}

/// Sends `probes`, then runs `handler` over them as one chunk (gathered
/// before its transaction starts) until `effects` are recorded and one
/// message is dead, and checks that that one died `permanent` with an
/// error containing `why`.
async fn run_one_chunk<H: Handler<Message = ProbeMessage>>(
    env: &TestEnv,
    pool: &sqlx::PgPool,
    probes: &[Probe],
    handler: H,
    effects: i64,
    why: &str,
) {
    for probe in probes {
        send(env, probe).await;
    }
    let mut settings = settings(env, "100ms");
    settings.batch_size = 8;
    settings.batch_linger = Duration::from_millis(500);
    let worker = run(Worker::with_pool(
        probe_spec(),
        settings,
        env.pool().await,
        handler,
    ));
    eventually(WAIT, "the effects and one dead message", || async {
        count(pool, "SELECT count(*) FROM probe_effects").await == effects
            && env.depth("inventory.dead").await == 1
    })
    .await;
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    assert_eq!(header_text(&dead[0].0, headers::ERROR_KIND), "permanent");
    assert!(header_text(&dead[0].0, headers::ERROR).contains(why));
    assert_eq!(env.depth("inventory").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_is_prepared_in_one_call_and_if_that_panics_each_message_is_prepared_alone() {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms").await;
    let pool = prepare(&env).await;
    let probes: Vec<Probe> = (0..7)
        .map(|i| Probe {
            id: format!("p{i}"),
            fail: (i == 3).then(|| "panic".to_owned()),
            ..Probe::default()
        })
        .collect();
    let chunks = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handler = ChunkPrepared {
        chunks: chunks.clone(),
    };
    run_one_chunk(&env, &pool, &probes, handler, 6, "panicked preparing").await;

    assert_eq!(*chunks.lock().unwrap(), [7], "one call for the chunk");
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_effects WHERE id = 'p3'").await,
        0
    );
    env.cleanup().await;
}
