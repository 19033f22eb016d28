//! Bounded growth (src/retention.rs): what the cleaner removes, what it keeps, that one instance
//! cleans at a time, and that every statement is bounded by `batch_rows`.

use std::time::Duration;

use webhook_delivery::config::RetentionSettings;
use webhook_delivery::ledger::Ledger;
use webhook_delivery::metrics::Metrics;
use webhook_delivery::retention::clean_once;

use crate::helpers::*;

const DAY_MS: u64 = 86_400_000;

/// The shipped windows (7 and 30 days), no pause: rows are seeded with old timestamps.
fn shipped_windows() -> RetentionSettings {
    RetentionSettings {
        enabled: true,
        delivered_ms: 7 * DAY_MS,
        dead_ms: 30 * DAY_MS,
        rejected_ms: 30 * DAY_MS,
        interval_ms: 60_000,
        batch_rows: 5_000,
        batch_pause_ms: 0,
    }
}

fn ledger(env: &TestEnv) -> Ledger {
    Ledger::connect_lazy(&env.db_url, 2).unwrap()
}

/// One event per case, each with the deliveries (and one attempt each) that make the case.
const SEED: &str = "
    INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition,
                        kafka_offset, payload, consumed_at)
    SELECT key, key, 'L1', 'matched', 't', 0, offs, '\\x7b7d', now() - age
    FROM (VALUES ('k-delivered', 1, interval '10 days'),
                 ('k-dead-old', 2, interval '40 days'),
                 ('k-dead-recent', 3, interval '10 days'),
                 ('k-pending', 4, interval '10 days'),
                 ('k-mixed', 5, interval '10 days'),
                 ('k-recent', 6, interval '1 minute'),
                 ('k-lonely', 7, interval '10 days')) AS c(key, offs, age);
    INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset,
                            state, created_at, updated_at, delivered_at)
    SELECT key, broker, 'L1', 0, offs, state, now() - age, now() - age,
           CASE WHEN state = 'delivered' THEN now() - age END
    FROM (VALUES ('k-delivered', 'b1', 1, 'delivered', interval '10 days'),
                 ('k-dead-old', 'b1', 2, 'dead', interval '40 days'),
                 ('k-dead-recent', 'b1', 3, 'dead', interval '10 days'),
                 ('k-pending', 'b1', 4, 'pending', interval '10 days'),
                 ('k-mixed', 'b1', 5, 'delivered', interval '10 days'),
                 ('k-mixed', 'b2', 5, 'pending', interval '10 days'),
                 ('k-recent', 'b1', 6, 'delivered', interval '1 minute')) AS c(key, broker, offs, state, age)
    ORDER BY offs, broker;
    INSERT INTO delivery_attempts (delivery_id, broker_id, attempt, started_at, latency_ms, outcome)
    SELECT delivery_id, broker_id, 1, created_at, 5,
           CASE state WHEN 'pending' THEN 'retry' ELSE state END
    FROM deliveries;
    INSERT INTO rejected_messages (topic, kafka_partition, kafka_offset, value_bytes, error, rejected_at)
    VALUES ('t', 0, 100, 0, 'not json', now() - interval '40 days'),
           ('t', 0, 101, 0, 'not json', now() - interval '1 day');
";

async fn keys(env: &TestEnv, sql: &str) -> Vec<String> {
    env.db
        .query(sql, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_finished_rows_go_while_pending_and_recent_ones_stay() {
    let env = TestEnv::new(1).await;
    env.db.batch_execute(SEED).await.unwrap();
    let metrics = Metrics::new();

    let report = clean_once(&ledger(&env), &shipped_windows(), &metrics)
        .await
        .unwrap()
        .expect("nobody else is cleaning");

    assert_eq!(
        (
            report.deliveries,
            report.attempts,
            report.events,
            report.rejected
        ),
        (3, 3, 3, 1),
        "{report:?}"
    );
    assert!(report.skipped.is_empty(), "{report:?}");
    assert_eq!(
        keys(
            &env,
            "SELECT idempotency_key || '/' || broker_id FROM deliveries ORDER BY 1"
        )
        .await,
        [
            "k-dead-recent/b1",
            "k-mixed/b2",
            "k-pending/b1",
            "k-recent/b1"
        ],
        "delivered > 7 days and dead > 30 days go; pending, dead < 30 days and recent stay"
    );
    assert_eq!(
        keys(&env, "SELECT idempotency_key FROM events ORDER BY 1").await,
        ["k-dead-recent", "k-mixed", "k-pending", "k-recent"],
        "an event goes once none of its deliveries is left (k-mixed keeps its pending one)"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM delivery_attempts a
             WHERE NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.delivery_id = a.delivery_id)"
        )
        .await,
        0,
        "attempts leave with their delivery"
    );
    assert_eq!(env.count("SELECT count(*) FROM delivery_attempts").await, 4);
    assert_eq!(
        env.count(
            "SELECT count(*) FROM deliveries d
             WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.idempotency_key = d.idempotency_key)"
        )
        .await,
        0,
        "no delivery is left without its event"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM rejected_messages WHERE kafka_offset = 101")
            .await,
        1
    );
    let text = metrics.render();
    for (table, removed) in [
        ("deliveries", 3),
        ("delivery_attempts", 3),
        ("events", 3),
        ("rejected_messages", 1),
    ] {
        let line =
            format!("webhook_delivery_retention_removed_total{{table=\"{table}\"}} {removed}");
        assert!(text.contains(&line), "{line} in\n{text}");
    }

    let again = clean_once(&ledger(&env), &shipped_windows(), &metrics)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            again.deliveries,
            again.attempts,
            again.events,
            again.rejected
        ),
        (0, 0, 0, 0),
        "a second pass finds nothing more to remove"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_is_not_removed() {
    let env = TestEnv::new(1).await;
    env.db.batch_execute(SEED).await.unwrap();
    // Replayed just before the pass: pending again, so it stays whatever its age.
    env.db
        .batch_execute(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(),
                                   dead_reason = NULL, updated_at = now()
             WHERE idempotency_key = 'k-dead-old'",
        )
        .await
        .unwrap();
    clean_once(&ledger(&env), &shipped_windows(), &Metrics::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE idempotency_key = 'k-dead-old'")
            .await,
        1
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE idempotency_key = 'k-dead-old'")
            .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_never_clean_at_once() {
    let env = TestEnv::new(1).await;
    env.db.batch_execute(SEED).await.unwrap();
    let (first, second) = (ledger(&env), ledger(&env));
    // A pass of at least three paced statements: long enough to overlap.
    let paced = RetentionSettings {
        batch_pause_ms: 300,
        ..shipped_windows()
    };
    let (metrics_first, metrics_second) = (Metrics::new(), Metrics::new());
    let (a, b) = tokio::join!(
        clean_once(&first, &paced, &metrics_first),
        clean_once(&second, &paced, &metrics_second)
    );
    let reports: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(reports.len(), 1, "exactly one of two concurrent passes ran");
    assert_eq!(reports[0].deliveries, 3);

    // While one session holds the lock, another instance skips its pass.
    let held = first.try_retention_session().await.unwrap().expect("free");
    assert!(clean_once(&second, &paced, &metrics_second)
        .await
        .unwrap()
        .is_none());
    // A holder that goes away without releasing (a crash, a shutdown mid-pass) closes its
    // connection, and the lock goes with it.
    drop(held);
    assert!(
        eventually(Duration::from_secs(10), || async {
            matches!(
                clean_once(&second, &shipped_windows(), &metrics_second).await,
                Ok(Some(_))
            )
        })
        .await,
        "the lock is free again once its holder is gone"
    );
    // A released lock is free at once.
    first
        .try_retention_session()
        .await
        .unwrap()
        .expect("free")
        .release()
        .await
        .unwrap();
    assert!(clean_once(&second, &shipped_windows(), &metrics_second)
        .await
        .unwrap()
        .is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cleaning_statement_removes_at_most_batch_rows() {
    let env = TestEnv::new(1).await;
    env.db
        .batch_execute(
            "INSERT INTO events (idempotency_key, load_id, status, topic, kafka_partition,
                                 kafka_offset, payload, consumed_at)
             SELECT 'k-' || g, 'L1', 'delivered', 't', 0, g, '\\x7b7d', now() - interval '10 days'
             FROM generate_series(1, 1000) g;
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition,
                                     kafka_offset, state, created_at, updated_at, delivered_at)
             SELECT 'k-' || g, 'b1', 'L1', 0, g, 'delivered', now() - interval '10 days',
                    now() - interval '10 days', now() - interval '10 days'
             FROM generate_series(1, 1000) g;
             INSERT INTO delivery_attempts (delivery_id, broker_id, attempt, started_at, latency_ms, outcome)
             SELECT delivery_id, broker_id, 1, created_at, 5, 'delivered' FROM deliveries;",
        )
        .await
        .unwrap();
    let ledger = ledger(&env);
    let windows = shipped_windows();
    let session = ledger.try_retention_session().await.unwrap().unwrap();

    let mut after = i64::MIN;
    let mut removed_per_statement = Vec::new();
    loop {
        let batch = session
            .remove_finished_deliveries(after, windows.delivered(), windows.dead(), 100)
            .await
            .unwrap();
        assert!(batch.scanned <= 100);
        assert_eq!(batch.attempts_removed, batch.deliveries_removed);
        removed_per_statement.push(batch.deliveries_removed);
        match batch.last_id {
            Some(last) if batch.scanned == 100 => after = last,
            _ => break,
        }
    }
    assert_eq!(removed_per_statement, [[100; 10].as_slice(), &[0]].concat());

    let mut after = webhook_delivery::ledger::EVENT_WALK_START;
    let mut events_per_statement = Vec::new();
    loop {
        let batch = session
            .remove_unreferenced_events(after, windows.delivered(), 100)
            .await
            .unwrap();
        events_per_statement.push(batch.events_removed);
        match batch.last {
            Some(last) if batch.scanned == 100 => after = last,
            _ => break,
        }
    }
    assert_eq!(events_per_statement, [[100; 10].as_slice(), &[0]].concat());
    session.release().await.unwrap();
    assert_eq!(env.count("SELECT count(*) FROM deliveries").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM delivery_attempts").await, 0);
    assert_eq!(env.count("SELECT count(*) FROM events").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_removes_delivered_rows_after_a_window_in_milliseconds() {
    let env = TestEnv::new(1).await;
    let healthy = ok_receiver().await;
    let failing = receiver(wiremock::ResponseTemplate::new(503)).await;
    env.add_broker("b-ok", &healthy.uri()).await;
    env.add_broker("b-down", &failing.uri()).await;
    env.subscribe("b-ok", "L-shared").await;
    env.subscribe("b-down", "L-shared").await;
    env.subscribe("b-ok", "L-alone").await;
    env.produce_event(Some("e-shared"), "L-shared", "matched")
        .await;
    env.produce_event(Some("e-alone"), "L-alone", "matched")
        .await;

    let mut settings = env.settings();
    settings.retention.delivered_ms = 1_500;
    settings.retention.interval_ms = 300;
    settings.retention.batch_pause_ms = 10;
    let app = spawn_app(settings);

    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&healthy).await.len() == 2
        })
        .await,
        "both events were delivered to b-ok"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE broker_id = 'b-ok'",
            0,
            Duration::from_secs(15)
        )
        .await,
        "b-ok's delivered deliveries are removed 1.5 s after delivery"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM events WHERE event_id = 'e-alone'",
            0,
            Duration::from_secs(10)
        )
        .await,
        "an event whose deliveries are all gone goes too"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'b-down'")
            .await,
        1,
        "b-down's delivery is pending (or dead, kept 30 days)"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE event_id = 'e-shared'")
            .await,
        1,
        "e-shared keeps its event while b-down's delivery is there"
    );
    let text = app.admin_get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains("webhook_delivery_retention_removed_total{table=\"deliveries\"} 2"),
        "{text}"
    );
    assert!(
        !text.contains("webhook_delivery_retention_passes_total{result=\"cleaned\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("webhook_delivery_retention_passes_total{result=\"failed\"} 0"),
        "{text}"
    );
    assert!(!logged("retention pass finished", "deliveries_removed").is_empty());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_and_dead_letters_state_what_retention_keeps() {
    let env = TestEnv::new(1).await;
    for args in [
        &["report", "deliveries", "--help"][..],
        &["report", "duplicates", "--help"],
        &["dead-letters", "list", "--help"],
        &["dead-letters", "replay", "--help"],
        &["backfill", "--help"],
    ] {
        let help = run_cli(&env, args);
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(text.contains("[retention]"), "{args:?}: {text}");
    }
    let list = run_cli(&env, &["dead-letters", "list", "--json"]);
    assert!(list.status.success());
    let note = String::from_utf8_lossy(&list.stderr);
    assert!(
        note.contains("delivered deliveries for 7 days, dead ones for 30 days"),
        "{note}"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&list.stdout).unwrap(),
        serde_json::json!([]),
        "stdout stays pure JSON"
    );
    let unknown = run_cli(&env, &["report", "deliveries", "--event-id", "gone"]);
    assert!(!unknown.status.success());
    let error = String::from_utf8_lossy(&unknown.stderr);
    assert!(error.contains("retention removed it"), "{error}");
    let duplicates = run_cli(
        &env,
        &["report", "duplicates", "--since", "2020-01-01T00:00:00Z"],
    );
    assert!(duplicates.status.success());
    let note = String::from_utf8_lossy(&duplicates.stderr);
    assert!(note.contains("no longer counted"), "{note}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_claim_or_backfill_is_adding_a_delivery_to_is_not_removed_under_it() {
    let env = TestEnv::new(1).await;
    env.db.batch_execute(SEED).await.unwrap();
    let (other, connection) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    // The old event without deliveries is consumed again: the claim's conflict clause locks it
    // and the claim adds a delivery, not committed yet (for a broker whose delivery_counts row
    // the cleaner does not touch: a claim and the cleaner on the same (partition, broker) row
    // queue for a moment, which an open transaction here would turn into a timeout). Another old
    // one is read by a backfill.
    other
        .batch_execute(
            "BEGIN;
             INSERT INTO events (idempotency_key, load_id, status, topic, kafka_partition, kafka_offset, payload)
             VALUES ('k-lonely', 'L1', 'matched', 't', 0, 7, '\\x7b7d')
             ON CONFLICT (idempotency_key) DO UPDATE SET kafka_offset = events.kafka_offset WHERE false;
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
             VALUES ('k-lonely', 'b-claiming', 'L1', 0, 7);
             SELECT 1 FROM events WHERE idempotency_key = 'k-delivered' FOR KEY SHARE;",
        )
        .await
        .unwrap();
    let report = clean_once(&ledger(&env), &shipped_windows(), &Metrics::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(report.events, 1, "only k-dead-old's event: {report:?}");
    other.batch_execute("COMMIT").await.unwrap();
    clean_once(&ledger(&env), &shipped_windows(), &Metrics::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE idempotency_key = 'k-lonely'")
            .await,
        1,
        "the event keeps the delivery the claim added"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM events WHERE idempotency_key = 'k-delivered'")
            .await,
        0,
        "skipped while locked, removed by the next pass"
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM deliveries d
             WHERE NOT EXISTS (SELECT 1 FROM events e WHERE e.idempotency_key = d.idempotency_key)"
        )
        .await,
        0
    );
}
