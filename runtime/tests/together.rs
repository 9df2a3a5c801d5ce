//! Messages applied together (`Handler::handle_together`) against the real
//! broker and database: what the handler takes is applied in one statement,
//! what it leaves is handled one by one in the same transaction, what it
//! emits is relayed with its cause's correlation, and a failure rolls the
//! whole transaction back so that every message runs again alone.
#![allow(clippy::unwrap_used)]

mod support;

use runtime::{Context, Failure, Fresh, Handler, Outgoing, Together, Worker};
use std::time::Duration;
use support::probe::{Probe, ProbeMessage, Probed, probe_spec};
use support::{apply_topology, count, prepare, run, send, settings};
use testkit::{TestEnv, eventually};

const WAIT: Duration = Duration::from_secs(20);

/// Takes the probes whose id ends in an even digit and records them in one
/// statement (`how = 'together'`); the rest is left to `handle`
/// (`how = 'alone'`), returned in reverse (the runtime restores chunk order). A probe with `fail: "together"` in the chunk makes the
/// statement fail. With `OUTSIDE_EFFECTS` chosen by the test.
struct TakesEven<const OUTSIDE_EFFECTS: bool>;

const TABLE: &str = "CREATE TABLE IF NOT EXISTS together_effects (seq bigserial, id text NOT NULL, \
                     how text NOT NULL, txid bigint NOT NULL DEFAULT txid_current())";

impl<const OUTSIDE_EFFECTS: bool> Handler for TakesEven<OUTSIDE_EFFECTS> {
    type Message = ProbeMessage;
    const OUTSIDE_EFFECTS: bool = OUTSIDE_EFFECTS;

    async fn handle(&self, ctx: &mut Context, message: ProbeMessage) -> Result<(), Failure> {
        let ProbeMessage::Probe(probe) = message;
        sqlx::query("INSERT INTO together_effects (id, how) VALUES ($1, 'alone')")
            .bind(&probe.id)
            .execute(ctx.db())
            .await?;
        Ok(())
    }

    async fn handle_together(
        &self,
        ctx: &mut Together,
        messages: Vec<Fresh<ProbeMessage>>,
    ) -> Result<Vec<Fresh<ProbeMessage>>, Failure> {
        let (taken, left): (Vec<_>, Vec<_>) = messages.into_iter().partition(|fresh| {
            let ProbeMessage::Probe(probe) = &fresh.message;
            probe.id.ends_with(['0', '2', '4', '6', '8'])
        });
        let ids: Vec<String> = taken
            .iter()
            .map(|fresh| {
                let ProbeMessage::Probe(probe) = &fresh.message;
                probe.id.clone()
            })
            .collect();
        let poisoned = taken
            .iter()
            .any(|fresh| matches!(&fresh.message, ProbeMessage::Probe(p) if p.fail.as_deref() == Some("together")));
        let sql = if poisoned {
            "INSERT INTO together_effects (id, how) SELECT id, 'together' FROM UNNEST($1::text[]) AS id WHERE 1 / 0 = 1"
        } else {
            "INSERT INTO together_effects (id, how) SELECT id, 'together' FROM UNNEST($1::text[]) AS id"
        };
        sqlx::query(sql).bind(&ids).execute(ctx.db()).await?;
        for fresh in &taken {
            let ProbeMessage::Probe(probe) = &fresh.message;
            ctx.emit(
                &fresh.envelope,
                Outgoing::of(&Probed {
                    id: probe.id.clone(),
                }),
            );
        }
        Ok(left.into_iter().rev().collect())
    }
}

async fn bound_probed_queue(env: &TestEnv) {
    let conn = env.connection().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_declare(
            "probed".into(),
            lapin::options::QueueDeclareOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            "probed".into(),
            contract::EVENTS.into(),
            support::probe::PROBED_KIND.into(),
            lapin::options::QueueBindOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}

/// Sends `n` probes (`p0`…), the one named `poison` failing together, and
/// runs a worker that gathers them into one chunk until all are recorded.
async fn run_chunk<const OUTSIDE_EFFECTS: bool>(env: &TestEnv, n: usize, poison: Option<&str>) {
    apply_topology(env, "100ms").await;
    bound_probed_queue(env).await;
    let pool = prepare(env).await;
    sqlx::raw_sql(TABLE).execute(&pool).await.unwrap();
    for i in 0..n {
        let id = format!("p{i}");
        let fail = (poison == Some(id.as_str())).then(|| "together".to_owned());
        send(
            env,
            &Probe {
                id,
                fail,
                ..Probe::default()
            },
        )
        .await;
    }
    // One chunk, gathered before its transaction starts.
    let mut settings = settings(env, "100ms");
    settings.batch_size = n;
    settings.batch_linger = Duration::from_millis(500);
    let worker = run(Worker::with_pool(
        probe_spec(),
        settings,
        env.pool().await,
        TakesEven::<OUTSIDE_EFFECTS>,
    ));
    let expected = i64::try_from(n).unwrap();
    eventually(WAIT, "every probe recorded", || async {
        count(&pool, "SELECT count(*) FROM together_effects").await == expected
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chunk_applies_what_the_handler_takes_together_and_the_rest_alone_in_one_transaction() {
    for outside_effects in [false, true] {
        let env = TestEnv::new().await;
        if outside_effects {
            run_chunk::<true>(&env, 8, None).await;
        } else {
            run_chunk::<false>(&env, 8, None).await;
        }
        let pool = env.pool().await;
        assert_eq!(
            count(
                &pool,
                "SELECT count(*) FROM together_effects WHERE how = 'together'"
            )
            .await,
            4,
            "outside effects: {outside_effects}"
        );
        assert_eq!(
            count(
                &pool,
                "SELECT count(*) FROM together_effects WHERE how = 'alone' AND id ~ '[13579]$'"
            )
            .await,
            4
        );
        assert_eq!(
            count(&pool, "SELECT count(DISTINCT txid) FROM together_effects").await,
            1,
            "one transaction for the chunk"
        );
        let alone: Vec<String> =
            sqlx::query_scalar("SELECT id FROM together_effects WHERE how = 'alone' ORDER BY seq")
                .fetch_all(&pool)
                .await
                .unwrap();
        assert_eq!(
            alone,
            ["p1", "p3", "p5", "p7"],
            "left ones run in chunk order"
        );
        assert_eq!(
            count(&pool, "SELECT count(*) FROM inventory.inbox").await,
            8
        );
        // What was emitted together is relayed once per message taken,
        // correlated like a message emitted by `handle`.
        eventually(WAIT, "four events relayed", || async {
            env.depth("probed").await == 4
        })
        .await;
        let mut correlated: Vec<String> = env
            .drain("probed")
            .await
            .iter()
            .map(|(props, _)| props.correlation_id().as_ref().unwrap().to_string())
            .collect();
        correlated.sort();
        assert_eq!(correlated, ["p0", "p2", "p4", "p6"]);
        assert_eq!(env.depth("inventory").await, 0);
        assert_eq!(
            count(&pool, "SELECT count(*) FROM inventory.outbox").await,
            0
        );
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failure_applying_together_rolls_the_chunk_back_and_every_message_runs_alone() {
    let env = TestEnv::new().await;
    run_chunk::<false>(&env, 6, Some("p2")).await;
    let pool = env.pool().await;
    // Nothing of the failed statement stands; each probe was then handled
    // alone, in a transaction of its own, exactly once.
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM together_effects WHERE how = 'together'"
        )
        .await,
        0
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(DISTINCT id) FROM together_effects WHERE how = 'alone'"
        )
        .await,
        6
    );
    assert_eq!(
        count(&pool, "SELECT count(DISTINCT txid) FROM together_effects").await,
        6
    );
    assert_eq!(env.depth("inventory").await, 0);
    assert_eq!(env.depth("inventory.dead").await, 0);
    // Only the messages taken emit; run alone, none is.
    assert_eq!(env.depth("probed").await, 0);
    env.cleanup().await;
}
