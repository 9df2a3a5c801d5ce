//! The consumer loop against the real broker and database: retries, dead
//! letters, malformed input, duplicates, the outbox and lost connections.
#![allow(clippy::unwrap_used)]

mod support;

use contract::headers;
use lapin::BasicProperties;
use runtime::Outgoing;
use std::time::Duration;
use support::probe::Probe;
use support::*;
use testkit::{TestEnv, eventually};

// A bound, not a timing: under the full parallel suite on 2 cores one wait
// can take tens of seconds.
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failure_is_retried_through_the_tiers_then_succeeds() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms,200ms,300ms").await;
    let pool = env.pool().await;

    send(
        &env,
        &Probe {
            fail: Some("transient".into()),
            succeed_at_attempt: Some(3),
            ..probe("p1")
        },
    )
    .await;

    eventually(WAIT, "the third attempt commits", || async {
        count(&pool, "SELECT count(*) FROM probe_effects WHERE id = 'p1'").await == 1
    })
    .await;
    let attempts: Vec<i32> =
        sqlx::query_scalar("SELECT attempt FROM probe_invocations ORDER BY at")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!(env.depth("inventory.dead").await, 0);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_attempts_end_in_the_dead_queue_with_the_contract_headers() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms,200ms").await;

    let sent = send(
        &env,
        &Probe {
            fail: Some("transient".into()),
            ..probe("p2")
        },
    )
    .await;

    eventually(WAIT, "the message is dead", || async {
        env.depth("inventory.dead").await == 1
    })
    .await;
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    let (props, body) = &dead[0];
    assert_eq!(body, &sent.body);
    assert_eq!(
        props.message_id().as_ref().unwrap().as_str(),
        sent.message_id.to_string()
    );
    assert_eq!(header_text(props, headers::ERROR_KIND), "exhausted");
    assert_eq!(header_number(props, headers::ATTEMPTS), Some(3));
    assert_eq!(header_text(props, headers::ORIGINAL_EXCHANGE), "commands");
    assert_eq!(
        header_text(props, headers::ORIGINAL_ROUTING_KEY),
        "inventory.probe"
    );
    assert!(header_text(props, headers::ERROR).contains("fails at attempt 3"));
    assert!(
        chrono::DateTime::parse_from_rfc3339(&header_text(props, headers::FIRST_FAILED_AT)).is_ok()
    );
    for tier in 1..=2 {
        assert_eq!(env.depth(&format!("inventory.retry.{tier}")).await, 0);
    }
    let pool = env.pool().await;
    assert_eq!(count(&pool, "SELECT count(*) FROM probe_effects").await, 0);
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_invocations").await,
        3
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permanent_failure_goes_to_the_dead_queue_at_once() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms,200ms").await;

    send(
        &env,
        &Probe {
            fail: Some("permanent".into()),
            ..probe("p3")
        },
    )
    .await;

    eventually(WAIT, "the message is dead", || async {
        env.depth("inventory.dead").await == 1
    })
    .await;
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    assert_eq!(header_text(&dead[0].0, headers::ERROR_KIND), "permanent");
    assert_eq!(header_number(&dead[0].0, headers::ATTEMPTS), Some(1));
    assert_eq!(
        header_text(&dead[0].0, headers::ERROR),
        "probe p3 is refused"
    );
    let pool = env.pool().await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_invocations").await,
        1
    );
    env.cleanup().await;
}

/// A message published with a TTL (`expiration`) would take it into the
/// dead queue and expire out of it unseen; the dead copy keeps the TTL
/// only as a header.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_copy_does_not_expire_out_of_the_dead_queue() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;
    let mortal = Outgoing::of(&Probe {
        fail: Some("permanent".into()),
        ..probe("mortal")
    });
    let properties = mortal.properties().with_expiration("1500".into());
    env.publish(
        &mortal.exchange,
        &mortal.routing_key,
        properties,
        &mortal.body,
    )
    .await;
    eventually(WAIT, "the message is dead", || async {
        env.depth("inventory.dead").await == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        env.depth("inventory.dead").await,
        1,
        "the dead copy expired with the message's TTL"
    );
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    assert_eq!(dead[0].0.expiration(), &None);
    assert_eq!(
        header_text(&dead[0].0, headers::ORIGINAL_EXPIRATION),
        "1500"
    );
    assert_eq!(header_text(&dead[0].0, headers::ERROR_KIND), "permanent");
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_is_dead_lettered_as_malformed_while_valid_messages_keep_flowing() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;
    let good = Outgoing::of(&probe("template"));
    let props = good.properties();
    let garbage: Vec<(BasicProperties, Vec<u8>)> = vec![
        (
            props
                .clone()
                .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into()),
            b"{not json".to_vec(),
        ),
        (
            props
                .clone()
                .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into()),
            vec![0xff, 0x00, 0xfe, 0x12],
        ),
        (
            props
                .clone()
                .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into()),
            br#"{"no_id": true}"#.to_vec(),
        ),
        (
            props
                .clone()
                .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
                .with_type("inventory.unknown".into()),
            br#"{"id": "x"}"#.to_vec(),
        ),
        (
            props
                .clone()
                .with_message_id(uuid::Uuid::new_v4().to_string().as_str().into())
                .with_content_type("text/plain".into()),
            br#"{"id": "x"}"#.to_vec(),
        ),
        (
            props.clone().with_message_id("not-a-uuid".into()),
            br#"{"id": "x"}"#.to_vec(),
        ),
        (BasicProperties::default(), b"".to_vec()),
    ];
    for (i, (p, body)) in garbage.iter().enumerate() {
        env.publish("commands", "inventory.probe", p.clone(), body)
            .await;
        send(&env, &probe(&format!("good-{i}"))).await;
    }

    let pool = env.pool().await;
    eventually(WAIT, "all valid messages applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == 7
    })
    .await;
    eventually(WAIT, "all garbage dead", || async {
        env.depth("inventory.dead").await == 7
    })
    .await;
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    assert!(
        dead.iter()
            .all(|(p, _)| header_text(p, headers::ERROR_KIND) == "malformed")
    );
    let errors: Vec<String> = dead
        .iter()
        .map(|(p, _)| header_text(p, headers::ERROR))
        .collect();
    for expected in [
        "is not valid",
        "unknown message type",
        "content_type",
        "not a UUID",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(expected)),
            "{expected} in {errors:?}"
        );
    }
    // The garbage bodies are kept as they were, for `dlq show`.
    assert!(dead.iter().any(|(_, b)| b == &vec![0xff, 0x00, 0xfe, 0x12]));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn headers_that_are_not_text_neither_stop_the_consumer_nor_change_on_the_way_to_the_dead_queue()
 {
    // AMQP's long strings are bytes; a client may put anything in one. A
    // consumer that insisted on UTF-8 would drop its connection on such a
    // message, and get it back, again and again.
    use lapin::types::{AMQPValue, LongString};
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;
    let binary = || AMQPValue::LongString(LongString::from(vec![0xff_u8, 0x00, 0xfe]));
    let with_binary_headers = |out: &Outgoing| {
        let props = out.properties();
        let mut table = props.headers().clone().unwrap_or_default();
        table.insert("x-binary".into(), binary());
        table.insert(headers::TRACEPARENT.into(), binary());
        props.with_headers(table)
    };
    for probe in [
        probe("binary-ok"),
        Probe {
            fail: Some("permanent".into()),
            ..probe("binary-refused")
        },
    ] {
        let out = Outgoing::of(&probe).correlated(&probe.id);
        env.publish(
            &out.exchange,
            &out.routing_key,
            with_binary_headers(&out),
            &out.body,
        )
        .await;
    }
    send(&env, &probe("after")).await;

    let pool = env.pool().await;
    eventually(WAIT, "both valid messages applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == 2
    })
    .await;
    eventually(WAIT, "the refused one is dead", || async {
        env.depth("inventory.dead").await == 1
    })
    .await;
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    assert_eq!(header_text(&dead[0].0, headers::ERROR_KIND), "permanent");
    assert_eq!(header(&dead[0].0, "x-binary"), Some(binary()));
    pool.close().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_message_id_delivered_twice_has_one_effect() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;
    let out = Outgoing::of(&probe("dup"));

    env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
        .await;
    env.publish(&out.exchange, &out.routing_key, out.properties(), &out.body)
        .await;
    send(&env, &probe("marker")).await;

    let pool = env.pool().await;
    eventually(WAIT, "both copies consumed", || async {
        count(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE id = 'marker'",
        )
        .await
            == 1
            && env.depth("inventory").await == 0
    })
    .await;
    worker.stop().await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_effects WHERE id = 'dup'").await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM inventory.inbox").await,
        2
    );
    env.cleanup().await;
}

/// Sends `ids` one after the other, `gap` apart, and returns how many
/// transactions the worker applied them in.
async fn transactions_for(env: &TestEnv, ids: &[&str], gap: Duration) -> i64 {
    for id in ids {
        send(env, &probe(id)).await;
        tokio::time::sleep(gap).await;
    }
    let pool = env.pool().await;
    let ids: Vec<String> = ids.iter().map(|id| (*id).to_owned()).collect();
    let n = i64::try_from(ids.len()).unwrap();
    eventually(WAIT, "every message applied", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM probe_effects WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_one(&pool)
            .await
            .unwrap()
            == n
    })
    .await;
    sqlx::query_scalar("SELECT count(DISTINCT txid) FROM probe_effects WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_one(&pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_a_linger_a_busy_worker_gathers_deliveries_arriving_apart_and_an_idle_one_does_not_wait()
 {
    let env = TestEnv::new().await;
    let mut lingering = settings(&env, "100ms");
    // Far longer than sending four messages takes, even on a loaded machine.
    lingering.batch_linger = Duration::from_secs(1);
    let worker = start_worker_with(&env, lingering).await;
    // The session's first chunk waits for a backlog; then the worker is idle.
    assert_eq!(transactions_for(&env, &["first"], Duration::ZERO).await, 1);
    // Idle: each arrives, longer than the linger after the one before, to
    // a worker with nothing in flight and goes at once. Had the first
    // waited for company, the second would have joined it.
    assert_eq!(
        transactions_for(&env, &["i1", "i2"], Duration::from_millis(1500)).await,
        2
    );
    // Busy: while a slow one is in flight, the next chunk waits for company.
    send(
        &env,
        &Probe {
            id: "slow".into(),
            sleep_ms: 3000,
            ..Probe::default()
        },
    )
    .await;
    let pool = env.pool().await;
    eventually(WAIT, "the slow one in flight", || async {
        count(
            &pool,
            "SELECT count(*) FROM probe_invocations WHERE id = 'slow'",
        )
        .await
            == 1
    })
    .await;
    assert_eq!(
        transactions_for(&env, &["b1", "b2", "b3", "b4"], Duration::from_millis(50)).await,
        1
    );
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_linger_deliveries_arriving_apart_are_handled_on_arrival() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;
    let ids = ["a1", "a2", "a3", "a4"];
    // Each arrives to an idle worker; all four in one transaction would mean
    // the worker waited for company.
    assert!(transactions_for(&env, &ids, Duration::from_millis(300)).await >= 2);
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_backlog_is_handled_in_shared_transactions_where_a_failure_takes_back_only_its_own_message()
 {
    waiting_backlog_with_failures(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_only_handler_shares_transactions_without_savepoints_and_a_failure_reruns_its_batch_alone()
 {
    waiting_backlog_with_failures(false).await;
}

/// 140 waiting messages, among them a refusal after a write, a failing SQL
/// statement, a transient failure and a duplicate: each good one applied
/// once, the refused ones dead with nothing of theirs left behind.
async fn waiting_backlog_with_failures(outside_effects: bool) {
    let env = TestEnv::new().await;
    let delays = "100ms,200ms";
    // The backlog is in the queue before the worker starts, so deliveries
    // arrive together and share transactions.
    apply_topology(&env, delays).await;
    let mut duplicate = None;
    for i in 0..120 {
        let p = match i {
            10 => Probe {
                fail: Some("write-then-permanent".into()),
                ..probe("b10")
            },
            20 => Probe {
                fail: Some("sql-error".into()),
                ..probe("b20")
            },
            30 => Probe {
                fail: Some("transient".into()),
                succeed_at_attempt: Some(2),
                ..probe("b30")
            },
            40 => Probe {
                emit: true,
                ..probe("b40")
            },
            _ => probe(&format!("b{i}")),
        };
        let sent = send(&env, &p).await;
        if i == 5 {
            duplicate = Some(sent);
        }
    }
    // The same message again, inside the backlog.
    let dup = duplicate.unwrap();
    env.publish(&dup.exchange, &dup.routing_key, dup.properties(), &dup.body)
        .await;
    for i in 120..140 {
        send(&env, &probe(&format!("b{i}"))).await;
    }
    let worker = if outside_effects {
        start_worker(&env, delays).await
    } else {
        start_database_only_worker(&env, delays).await
    };
    let pool = env.pool().await;
    eventually(
        WAIT,
        "every good message applied, both refused ones dead",
        || async {
            count(&pool, "SELECT count(*) FROM probe_effects").await == 138
                && env.depth("inventory.dead").await == 2
        },
    )
    .await;
    worker.stop().await;

    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM (SELECT id FROM probe_effects GROUP BY id HAVING count(*) > 1) d"
        )
        .await,
        0,
        "a message applied twice"
    );
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE id IN ('b10', 'b20')"
        )
        .await,
        0,
        "a refused message's write survived"
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM probe_effects WHERE id = 'b30'").await,
        1
    );
    // Inbox rows of one transaction share its start time: several messages
    // were committed together.
    assert!(
        count(
            &pool,
            "SELECT count(*) - count(DISTINCT processed_at) FROM inventory.inbox"
        )
        .await
            > 0,
        "no two messages shared a transaction"
    );
    // The refused messages are not in the inbox, so a replay applies them.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM inventory.inbox").await,
        138
    );
    let dead = env.drain("inventory.dead").await;
    let mut errors: Vec<String> = dead
        .iter()
        .map(|(p, _)| header_text(p, headers::ERROR))
        .collect();
    errors.sort();
    assert!(errors[0].contains("division by zero"), "{errors:?}");
    assert_eq!(errors[1], "probe b10 wrote, then refused");
    assert!(
        dead.iter()
            .all(|(p, _)| header_text(p, headers::ERROR_KIND) == "permanent")
    );
    assert_eq!(env.depth("inventory").await, 0);
    // b40's event was relayed, once.
    eventually(WAIT, "b40's event relayed", || async {
        env.depth("order").await == 1
    })
    .await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn emitted_messages_are_relayed_after_commit_with_trace_and_correlation() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;

    let sent = send(
        &env,
        &Probe {
            emit: true,
            ..probe("emitter")
        },
    )
    .await;

    // `inventory.probed` on `events` is routed to the order queue.
    eventually(WAIT, "the event reaches the order queue", || async {
        env.depth("order").await == 1
    })
    .await;
    worker.stop().await;
    let (props, body) = env.drain("order").await.remove(0);
    assert_eq!(props.kind().as_ref().unwrap().as_str(), "inventory.probed");
    assert_eq!(props.correlation_id().as_ref().unwrap().as_str(), "emitter");
    assert_eq!(body, br#"{"id":"emitter"}"#);
    let trace = |t: &str| t.split('-').nth(1).map(str::to_owned);
    let received = header_text(&props, headers::TRACEPARENT);
    let sent_trace = sent.traceparent.clone().unwrap();
    assert_eq!(
        trace(&received),
        trace(&sent_trace),
        "the event continues the trace"
    );
    assert_ne!(received, sent_trace, "the event is a new span");
    assert_eq!(props.delivery_mode(), &Some(2));
    let pool = env.pool().await;
    assert_eq!(
        count(&pool, "SELECT count(*) FROM inventory.outbox").await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_rows_and_start_counts_older_than_the_retention_are_pruned_and_recent_ones_kept() {
    let env = TestEnv::new().await;
    let pool = prepare(&env).await;
    let old = uuid::Uuid::new_v4();
    let recent = uuid::Uuid::new_v4();
    let other_consumer = uuid::Uuid::new_v4();
    sqlx::query(
        "INSERT INTO inventory.inbox (consumer, message_id, processed_at) VALUES \
         ('probe-worker', $1, now() - interval '40 days'), ('probe-worker', $2, now() - interval '1 day'), \
         ('someone-else', $3, now() - interval '40 days')",
    )
    .bind(old)
    .bind(recent)
    .bind(other_consumer)
    .execute(&pool)
    .await
    .unwrap();
    // Start counts of messages that never came back go the same way.
    sqlx::query(
        "INSERT INTO inventory.handler_starts (consumer, message_id, starts, last_started_at) VALUES \
         ('probe-worker', $1, 2, now() - interval '40 days'), ('probe-worker', $2, 1, now() - interval '1 day')",
    )
    .bind(old)
    .bind(recent)
    .execute(&pool)
    .await
    .unwrap();

    let worker = start_worker(&env, "100ms").await;

    eventually(WAIT, "the old rows are pruned", || async {
        count(&pool, "SELECT count(*) FROM inventory.inbox").await == 2
            && count(&pool, "SELECT count(*) FROM inventory.handler_starts").await == 1
    })
    .await;
    assert_eq!(
        count(
            &pool,
            &format!("SELECT count(*) FROM inventory.handler_starts WHERE message_id = '{recent}'")
        )
        .await,
        1
    );
    worker.stop().await;
    let kept: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT message_id FROM inventory.inbox ORDER BY processed_at")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert!(kept.contains(&recent) && kept.contains(&other_consumer) && !kept.contains(&old));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sweeper_relays_outbox_rows_that_a_crash_left_behind() {
    let env = TestEnv::new().await;
    let pool = prepare(&env).await;
    // Rows committed by a handler whose process died before relaying them.
    let store = runtime::store::Store::new("inventory", "probe-worker");
    let left = vec![
        Outgoing::of(&support::probe::Probed { id: "a".into() }).correlated("a"),
        Outgoing::of(&support::probe::Probed { id: "b".into() }).correlated("b"),
    ];
    commit_outbox(&pool, &store, &[], &left).await;
    let worker = start_worker(&env, "100ms").await;

    eventually(WAIT, "both rows relayed", || async {
        env.depth("order").await == 2
    })
    .await;
    eventually(WAIT, "the outbox is empty", || async {
        count(&pool, "SELECT count(*) FROM inventory.outbox").await == 0
    })
    .await;
    worker.stop().await;
    let ids: Vec<String> = env
        .drain("order")
        .await
        .iter()
        .map(|(p, _)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert!(left.iter().all(|m| ids.contains(&m.message_id.to_string())));
    env.cleanup().await;
}

/// One outbox row no queue binds (a rolling deploy that emits a new type
/// before its consumer is there) neither stops the sweeper nor makes it
/// send its neighbours again at every tick: they go out once, it is kept,
/// counted and tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unroutable_outbox_row_is_kept_and_its_neighbours_go_out_once() {
    let env = TestEnv::new().await;
    let pool = prepare(&env).await;
    let store = runtime::store::Store::new("inventory", "probe-worker");
    let mut left: Vec<Outgoing> = (0..10)
        .map(|i| {
            let id = format!("good-{i}");
            Outgoing::of(&support::probe::Probed { id: id.clone() }).correlated(&id)
        })
        .collect();
    let mut nowhere = Outgoing::of(&support::probe::Probed { id: "lost".into() });
    nowhere.routing_key = "nowhere.x".into();
    left.insert(5, nowhere);
    commit_outbox(&pool, &store, &[], &left).await;
    let metrics_port = testkit::free_port();
    let mut settings = settings(&env, "100ms");
    settings.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    let worker = start_worker_with(&env, settings).await;

    eventually(WAIT, "the good rows relayed", || async {
        env.depth("order").await >= 10
    })
    .await;
    // Several sweeps (every 250 ms) go by.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(env.depth("order").await, 10, "good rows were sent again");
    let kept: Vec<String> = sqlx::query_scalar("SELECT routing_key FROM inventory.outbox")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(kept, ["nowhere.x"]);
    let metrics = topology::https::client()
        .get(format!("http://127.0.0.1:{metrics_port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let unroutable = sample(
        &metrics,
        "orderflow_worker_outbox_unroutable_total",
        "worker=\"probe-worker\"",
    );
    assert!(unroutable >= 2.0, "{metrics}");
    worker.stop().await;
    env.cleanup().await;
}

/// A message that cannot be moved to its retry tier (the tier deleted by
/// hand) goes back to its queue, again and again: those returns are not
/// crashes, so it is never dead-lettered as `delivery-limit`, and once the
/// tier is back it goes through it as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_returned_for_want_of_its_retry_tier_is_not_counted_as_a_crash() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms").await;
    let conn = env.connection().await;
    let channel = conn.create_channel().await.unwrap();
    channel
        .queue_delete("inventory.retry.1".into(), Default::default())
        .await
        .unwrap();
    send(
        &env,
        &Probe {
            fail: Some("transient".into()),
            succeed_at_attempt: Some(2),
            ..probe("homeless")
        },
    )
    .await;
    let pool = env.pool().await;
    // Each return takes about a second: more than `MAX_STARTS` of them.
    eventually(WAIT, "several attempts", || async {
        count(&pool, "SELECT count(*) FROM probe_invocations").await >= 6
    })
    .await;
    assert_eq!(
        env.depth("inventory.dead").await,
        0,
        "dead-lettered as a crash"
    );
    env.declare_topology("100ms").await;
    eventually(WAIT, "applied once its tier is back", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == 1
    })
    .await;
    assert_eq!(env.depth("inventory.dead").await, 0);
    worker.stop().await;
    let _ = conn.close(200, "done".into()).await;
    env.cleanup().await;
}

/// A handler that never returns for one message among fifty: the fifty
/// apply, the one is given up on at each attempt (`HANDLER_TIMEOUT`) and
/// ends in the dead queue with the reason, and the worker keeps consuming.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_handler_that_never_returns_is_given_up_on_and_the_worker_keeps_consuming() {
    let env = TestEnv::new().await;
    let mut settings = settings(&env, "100ms,100ms");
    settings.handler_timeout = Duration::from_millis(800);
    let worker = start_worker_with(&env, settings).await;
    let mut probes: Vec<Probe> = (0..50).map(|i| probe(&format!("fine-{i}"))).collect();
    probes.insert(
        17,
        Probe {
            // An hour: for this test, for ever.
            sleep_ms: 3_600_000,
            ..probe("stuck")
        },
    );
    send_many(&env, probes).await;
    let pool = env.pool().await;
    eventually(WAIT, "the fifty applied", || async {
        count(&pool, "SELECT count(*) FROM probe_effects").await == 50
    })
    .await;
    eventually(WAIT, "the stuck one dead", || async {
        env.depth("inventory.dead").await == 1
    })
    .await;
    send(&env, &probe("after")).await;
    eventually(WAIT, "still consuming", || async {
        count(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE id = 'after'",
        )
        .await
            == 1
    })
    .await;
    worker.stop().await;
    let dead = env.drain("inventory.dead").await;
    assert_eq!(header_text(&dead[0].0, headers::ERROR_KIND), "exhausted");
    let error = header_text(&dead[0].0, headers::ERROR);
    assert!(error.contains("HANDLER_TIMEOUT"), "{error}");
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM probe_effects WHERE id = 'stuck'"
        )
        .await,
        0
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_force_closed_broker_connection_loses_nothing_and_applies_each_message_once() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms,200ms").await;
    let pool = env.pool().await;
    send_sixty_and_wait_for_progress(&env, &pool, "m").await;

    // The management API lists a connection once its stats are collected.
    eventually(WAIT, "the worker's connections are cut", || async {
        env.close_connections("probe-worker").await >= 2
    })
    .await;

    settle_applied_once_and_relayed(&env, &pool, worker, 60, 60).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_whose_broker_node_goes_moves_to_the_next_and_loses_nothing() {
    let env = TestEnv::new().await;
    // Two addresses of one broker: a cluster of two nodes, as the worker sees it.
    let a = testkit::Forwarder::start(testkit::BROKER).await;
    let b = testkit::Forwarder::start(testkit::BROKER).await;
    let mut settings = settings(&env, "100ms,200ms");
    settings.amqp_url = runtime::SecretUrl::new(env.amqp_url_with_nodes(&[
        format!("127.0.0.1:{}", a.port),
        format!("127.0.0.1:{}", b.port),
    ]));
    let worker = start_worker_with(&env, settings).await;
    let pool = env.pool().await;
    send_sixty_and_wait_for_progress(&env, &pool, "n").await;

    // The node the worker reached goes down, connections and all.
    let (gone, other) = if a.carried() > 0 { (a, b) } else { (b, a) };
    let before = other.carried();
    gone.cut();
    eventually(
        WAIT,
        "the worker reconnects through the other node",
        || async { other.carried() > before },
    )
    .await;

    settle_applied_once_and_relayed(&env, &pool, worker, 60, 60).await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_database_connections_lose_nothing_and_apply_each_message_once() {
    let env = TestEnv::new().await;
    let worker = start_worker(&env, "100ms,200ms,400ms,800ms,1600ms").await;
    let pool = env.pool().await;
    for i in 0..200 {
        send(
            &env,
            &Probe {
                sleep_ms: 5,
                emit: i % 2 == 0,
                ..probe(&format!("d{i}"))
            },
        )
        .await;
    }
    // Every server process of this test's database but the one asking
    // (other tests' databases are left alone), three times under load.
    let admin = sqlx::PgPool::connect(&env.database_url.replace(&env.database, "postgres"))
        .await
        .unwrap();
    for round in 1..=3 {
        eventually(WAIT, "progress before the cut", || async {
            count(&pool, "SELECT count(*) FROM probe_effects").await >= round * 40
        })
        .await;
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&env.database)
        .fetch_all(&admin)
        .await
        .unwrap();
        assert!(!cut.is_empty(), "no connection was cut");
    }
    admin.close().await;
    let pool = env.pool().await;
    settle_applied_once_and_relayed(&env, &pool, worker, 200, 100).await;
    env.cleanup().await;
}

/// Waits until `messages` probes are applied and the outbox is empty, stops
/// the worker, then asserts that each was applied once, that nothing died
/// or stayed queued, and that `events` distinct events reached the order
/// queue. Events may be relayed twice (sweeper and relay racing a lost
/// confirm), never lost; the consumer's inbox removes such duplicates.
/// Sends 60 probes (ids `{prefix}0`…, 20 ms each, each emitting an event)
/// and waits until the worker has applied some.
async fn send_sixty_and_wait_for_progress(env: &TestEnv, pool: &sqlx::PgPool, prefix: &str) {
    for i in 0..60 {
        send(
            env,
            &Probe {
                sleep_ms: 20,
                emit: true,
                ..probe(&format!("{prefix}{i}"))
            },
        )
        .await;
    }
    eventually(WAIT, "some progress", || async {
        count(pool, "SELECT count(*) FROM probe_effects").await >= 10
    })
    .await;
}

async fn settle_applied_once_and_relayed(
    env: &TestEnv,
    pool: &sqlx::PgPool,
    worker: Running,
    messages: i64,
    events: usize,
) {
    eventually(WAIT, "every message applied", || async {
        count(pool, "SELECT count(DISTINCT id) FROM probe_effects").await == messages
    })
    .await;
    eventually(WAIT, "every event relayed", || async {
        count(pool, "SELECT count(*) FROM inventory.outbox").await == 0
    })
    .await;
    // A message whose ack died with the connection is back in the queue
    // though it was applied; the reconnected worker must take it (and
    // recognise it as a duplicate) before it stops.
    eventually(WAIT, "the queue drained", || async {
        env.depth("inventory").await == 0
    })
    .await;
    worker.stop().await;
    assert_eq!(
        count(pool, "SELECT count(*) FROM probe_effects").await,
        messages,
        "a message applied twice"
    );
    assert_eq!(env.depth("inventory.dead").await, 0, "a message died");
    assert_eq!(env.depth("inventory").await, 0);
    let mut ids: Vec<String> = env
        .drain("order")
        .await
        .iter()
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events);
}
