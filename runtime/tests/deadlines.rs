//! Deadline scans against the real broker and database: two replicas scan
//! the same rows, each deadline is acted on once, a failed scan takes back
//! what it did and the next one does it again, and what a scan emits is
//! relayed like a handler's messages.
#![allow(clippy::unwrap_used)]

mod support;

use runtime::{Context, Failure, Handler, Outgoing, Worker};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use support::probe::{ProbeMessage, Probed, probe_spec};
use support::{Running, apply_topology, count, prepare, run, settings};
use testkit::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(20);

const DEADLINE_TABLE: &str = "CREATE TABLE probe_deadlines \
    (id text PRIMARY KEY, due_at timestamptz NOT NULL, done boolean NOT NULL DEFAULT false)";

/// Keeps no messages of its own; its deadlines are the rows of
/// `probe_deadlines`, two per scan, each announced by a `Probed` event.
struct Deadlines {
    /// The first scan that takes `fails-once` fails after emitting.
    fail_once: Arc<AtomicBool>,
}

impl Handler for Deadlines {
    type Message = ProbeMessage;

    async fn handle(&self, _ctx: &mut Context, _message: ProbeMessage) -> Result<(), Failure> {
        Ok(())
    }

    fn deadline_scan_every(&self) -> Option<Duration> {
        Some(Duration::from_millis(50))
    }

    async fn expire_deadlines(&self, ctx: &mut Context) -> Result<usize, Failure> {
        let due: Vec<String> = sqlx::query_scalar(
            "UPDATE probe_deadlines SET done = true WHERE id IN \
             (SELECT id FROM probe_deadlines WHERE NOT done AND due_at <= now() \
              ORDER BY id LIMIT 2 FOR UPDATE SKIP LOCKED) RETURNING id",
        )
        .fetch_all(ctx.db())
        .await?;
        for id in &due {
            ctx.emit(Outgoing::of(&Probed { id: id.clone() }).correlated(id));
        }
        if due.iter().any(|id| id == "fails-once") && self.fail_once.swap(false, Ordering::SeqCst) {
            // Everything this scan did must be taken back, this too.
            ctx.emit(
                Outgoing::of(&Probed {
                    id: "rolled-back".into(),
                })
                .correlated("rolled-back"),
            );
            return Err(Failure::transient("the scan fails once"));
        }
        Ok(due.len())
    }
}

async fn start(env: &TestEnv, fail_once: Arc<AtomicBool>) -> Running {
    run(Worker::with_pool(
        probe_spec(),
        settings(env, "100ms"),
        env.pool().await,
        Deadlines { fail_once },
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_act_on_each_passed_deadline_once_and_a_failed_scan_is_repeated() {
    runtime::telemetry::init().ok();
    let env = TestEnv::new().await;
    apply_topology(&env, "100ms").await;
    let pool = prepare(&env).await;
    sqlx::raw_sql(DEADLINE_TABLE).execute(&pool).await.unwrap();
    sqlx::query(
        "INSERT INTO probe_deadlines (id, due_at) VALUES \
         ('a', now() - interval '1 minute'), ('b', now()), ('c', now()), ('d', now()), \
         ('fails-once', now()), ('later', now() + interval '1 hour')",
    )
    .execute(&pool)
    .await
    .unwrap();

    let fail_once = Arc::new(AtomicBool::new(true));
    let replicas = vec![
        start(&env, fail_once.clone()).await,
        start(&env, fail_once.clone()).await,
    ];

    // `inventory.probed` on `events` is routed to the order queue.
    eventually(WAIT, "the five passed deadlines announced", || async {
        env.depth("order").await >= 5
    })
    .await;
    assert!(!fail_once.load(Ordering::SeqCst), "the failing scan ran");
    // A deadline not yet due is left alone until it is.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM probe_deadlines WHERE id = 'later' AND NOT done"
        )
        .await,
        1
    );
    sqlx::query("UPDATE probe_deadlines SET due_at = now() WHERE id = 'later'")
        .execute(&pool)
        .await
        .unwrap();
    eventually(WAIT, "the later deadline announced", || async {
        env.depth("order").await >= 6
    })
    .await;
    // Give a stray second announcement time to arrive before counting them.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for replica in replicas {
        replica.stop().await;
    }

    // Acted on once = one announcement (one message id) per deadline. The
    // relay is at least once: a replica's sweeper may send a row the other
    // replica is still relaying, a copy with the same id that consumers'
    // inboxes drop. A scan that was rolled back but still sent would show
    // as a second id.
    let mut announced: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (props, _) in env.drain("order").await {
        let id = props.correlation_id().as_ref().unwrap().to_string();
        let message_id = props.message_id().as_ref().unwrap().to_string();
        announced.entry(id).or_default().insert(message_id);
    }
    let acts: BTreeMap<String, usize> = announced
        .iter()
        .map(|(id, ids)| (id.clone(), ids.len()))
        .collect();
    let once = |ids: &[&str]| {
        ids.iter()
            .map(|id| (id.to_string(), 1))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(acts, once(&["a", "b", "c", "d", "fails-once", "later"]));
    assert_eq!(
        count(&pool, "SELECT count(*) FROM inventory.outbox").await,
        0
    );
    env.cleanup().await;
}
