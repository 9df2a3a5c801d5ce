//! The outbox statements against the real database: what the sweeper may
//! take, and the relayed rows the next write removes.
#![allow(clippy::unwrap_used)]

mod support;

use runtime::Outgoing;
use runtime::store::Store;
use std::time::Duration;
use support::probe::Probed;
use support::{commit_outbox, prepare};
use testkit::TestEnv;

fn probed(id: &str) -> Outgoing {
    Outgoing::of(&Probed { id: id.into() }).correlated(id)
}

async fn outbox_ids(pool: &sqlx::PgPool) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM inventory.outbox ORDER BY id")
        .fetch_all(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_sweeper_skips_rows_in_relay_and_rows_another_sweeper_holds() {
    let env = TestEnv::new().await;
    let pool = prepare(&env).await;
    let store = Store::new("inventory", "probe-worker");
    let ids = commit_outbox(&pool, &store, &[], &[probed("a"), probed("b"), probed("c")]).await;
    let (a, b, c) = (ids[0], ids[1], ids[2]);

    // Younger than the age asked for: not stale yet.
    let mut young = pool.begin().await.unwrap();
    let none = store
        .lock_stale_outbox(&mut young, Duration::from_secs(3600), 10, &[])
        .await
        .unwrap();
    assert!(none.is_empty());
    young.rollback().await.unwrap();

    // `b` is being relayed by this process: the sweeper leaves it.
    let mut first = pool.begin().await.unwrap();
    let taken: Vec<i64> = store
        .lock_stale_outbox(&mut first, Duration::ZERO, 10, &[b])
        .await
        .unwrap()
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(taken, vec![a, c]);

    // A second sweeper (another replica) meanwhile gets only what the first
    // does not hold.
    let mut second = pool.begin().await.unwrap();
    let rows = store
        .lock_stale_outbox(&mut second, Duration::ZERO, 10, &[])
        .await
        .unwrap();
    let taken: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    assert_eq!(taken, vec![b]);
    let (_, message) = &rows[0];
    assert_eq!(message.correlation_id.as_deref(), Some("b"));
    assert_eq!(message.body, probed("b").body);
    second.rollback().await.unwrap();
    first.rollback().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn writing_the_outbox_deletes_the_rows_relayed_since_the_last_write() {
    let env = TestEnv::new().await;
    let pool = prepare(&env).await;
    let store = Store::new("inventory", "probe-worker");
    let first = commit_outbox(&pool, &store, &[], &[probed("a"), probed("b")]).await;

    // `a` was relayed; the next handler transaction takes its row along.
    let second = commit_outbox(&pool, &store, &[first[0]], &[probed("c")]).await;
    assert_eq!(outbox_ids(&pool).await, vec![first[1], second[0]]);

    // Nothing new to write: the relayed rows still go.
    let none = commit_outbox(&pool, &store, &[first[1], second[0]], &[]).await;
    assert!(none.is_empty());
    assert!(outbox_ids(&pool).await.is_empty());
    env.cleanup().await;
}
