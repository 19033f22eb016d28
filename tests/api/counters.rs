//! `delivery_counts`: the per-(partition, broker) pending and dead counts that the gauges,
//! /brokers, `status` and the ledger sweep read instead of counting the backlog. They are kept
//! by triggers, so they must equal a real count after every kind of write.

use std::time::Duration;

use chrono::Utc;
use webhook_delivery::ledger::{
    BackfillOutcome, BackfillRequest, BrokerStatus, Ledger, ReplayOutcome, ReplaySelector,
};
use wiremock::ResponseTemplate;

use crate::helpers::*;

/// Pairs whose maintained counts, or newest dead-letter error, differ from the rows themselves,
/// read in one statement (one snapshot), so it holds while an instance is writing. (The kept
/// error is of the newest death while the pair has dead letters; the writes below never remove
/// only the newest dead letter, so it equals the newest dead row's error here.)
const MISMATCHES: &str = "
    WITH real AS (
        SELECT kafka_partition, broker_id,
               count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               (array_agg(last_error ORDER BY updated_at DESC)
                    FILTER (WHERE state = 'dead' AND last_error IS NOT NULL))[1] AS dead_error
        FROM deliveries GROUP BY kafka_partition, broker_id
    )
    SELECT COALESCE(r.kafka_partition, c.kafka_partition) || '/' || COALESCE(r.broker_id, c.broker_id)
           || ' real ' || COALESCE(r.pending, 0) || '+' || COALESCE(r.dead, 0) || ' ' || COALESCE(r.dead_error, '-')
           || ' kept ' || COALESCE(c.pending, 0) || '+' || COALESCE(c.dead, 0) || ' ' || COALESCE(c.last_dead_error, '-')
    FROM real r FULL JOIN delivery_counts c
         ON c.kafka_partition = r.kafka_partition AND c.broker_id = r.broker_id
    WHERE COALESCE(r.pending, 0) <> COALESCE(c.pending, 0) OR COALESCE(r.dead, 0) <> COALESCE(c.dead, 0)
       OR r.dead_error IS DISTINCT FROM c.last_dead_error";

async fn assert_counts_exact(env: &TestEnv, after: &str) {
    let mismatches: Vec<String> = env
        .db
        .query(MISMATCHES, &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(
        mismatches.is_empty(),
        "after {after}: delivery_counts differs from count(*): {mismatches:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_stay_exact_through_claims_outcomes_replay_backfill_and_direct_sql() {
    let env = TestEnv::new(3).await;
    let ok = ok_receiver().await;
    let refusing = receiver(ResponseTemplate::new(400)).await; // dead at once
    let failing = receiver(ResponseTemplate::new(503)).await; // retried: stays pending
    let late = ok_receiver().await; // subscribes after the events: backfilled
    env.add_broker("ok", &ok.uri()).await;
    env.add_broker("refusing", &refusing.uri()).await;
    env.add_broker("failing", &failing.uri()).await;
    env.add_broker("late", &late.uri()).await;
    let loads: Vec<String> = (0..6).map(|i| format!("L{i}")).collect();
    for load in &loads {
        for broker in ["ok", "refusing", "failing"] {
            env.subscribe(broker, load).await;
        }
    }
    let events = 30;
    for i in 0..events {
        env.produce_event(
            Some(&format!("e{i}")),
            &loads[i % loads.len()],
            "in_transit",
        )
        .await;
    }

    let mut settings = env.settings();
    settings.retry.max_attempts = 100;
    let app = spawn_app(settings);
    // Claims, 2xx, 4xx (dead) and 5xx (retry) outcomes.
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'ok' AND state = 'delivered'")
                .await
                == events as i64
                && env
                    .count("SELECT count(*) FROM deliveries WHERE broker_id = 'refusing' AND state = 'dead'")
                    .await
                    == events as i64
                // Its breaker opens after a few failures: some retried, the rest wait.
                && env
                    .count("SELECT count(*) FROM deliveries WHERE broker_id = 'failing' AND attempts > 0")
                    .await
                    > 0
        })
        .await,
        "every delivery has an outcome"
    );
    assert_counts_exact(&env, "claims and outcomes").await;
    assert_eq!(
        env.count("SELECT COALESCE(sum(pending), 0)::int8 FROM delivery_counts WHERE broker_id = 'failing'")
            .await,
        events as i64
    );

    // Replay: dead to pending, and dead again once the broker refuses them a second time.
    let ledger = Ledger::connect_lazy(&env.db_url, 2).unwrap();
    let ReplayOutcome::Requeued(requeued) = ledger
        .replay(&ReplaySelector::Broker {
            broker_id: "refusing".into(),
            since: None,
        })
        .await
        .unwrap()
    else {
        panic!("the broker's dead letters are requeued");
    };
    assert_eq!(requeued.len(), events);
    assert_counts_exact(&env, "a replay").await;

    // Backfill: a broker that subscribed after the events gets their deliveries.
    for load in &loads {
        env.subscribe("late", load).await;
    }
    let backfilled = ledger
        .backfill(&BackfillRequest {
            broker_id: "late".into(),
            since: Utc::now() - chrono::Duration::hours(1),
            until: None,
            load_id: None,
            dry_run: false,
        })
        .await
        .unwrap();
    let BackfillOutcome::Done(summary) = backfilled else {
        panic!("backfill runs: {backfilled:?}");
    };
    assert_eq!(summary.deliveries_created, events as i64);
    assert_counts_exact(&env, "a backfill").await;
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'late' AND state = 'delivered'")
                .await
                == events as i64
                && env
                    .count("SELECT count(*) FROM deliveries WHERE broker_id = 'refusing' AND state = 'dead' AND attempts > 0")
                    .await
                    == events as i64
        })
        .await,
        "backfilled deliveries are delivered and replayed ones refused again"
    );
    assert_counts_exact(&env, "outcomes of replayed and backfilled deliveries").await;
    app.stop().await;

    // Writes nobody planned for: a cleanup, a manual fix moving rows between brokers and
    // partitions, an insert of a dead row, a truncate.
    env.db
        .batch_execute(
            "DELETE FROM deliveries WHERE broker_id = 'refusing' AND kafka_offset % 2 = 0;
             UPDATE deliveries SET broker_id = 'moved', kafka_partition = (kafka_partition + 1) % 3
                 WHERE broker_id = 'failing' AND kafka_offset % 3 = 0;
             UPDATE deliveries SET state = 'dead', dead_reason = 'given up by hand'
                 WHERE broker_id = 'failing' AND kafka_offset % 3 = 1;
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset, state)
                 VALUES ('evt:by-hand', 'nobody', 'L-hand', 2, 7, 'dead')",
        )
        .await
        .unwrap();
    assert_counts_exact(&env, "direct SQL").await;
    let statuses = ledger.broker_statuses().await.unwrap();
    let nobody = statuses
        .iter()
        .find(|status| status.broker_id == "nobody")
        .expect("a broker with dead rows but no brokers row is listed");
    assert_eq!((nobody.pending, nobody.dead), (0, 1));
    let (pending, dead, _) = ledger.delivery_totals().await.unwrap();
    assert_eq!(
        (pending, dead),
        (
            env.count("SELECT count(*) FROM deliveries WHERE state = 'pending'")
                .await,
            env.count("SELECT count(*) FROM deliveries WHERE state = 'dead'")
                .await
        )
    );

    env.db.batch_execute("TRUNCATE deliveries").await.unwrap();
    assert_counts_exact(&env, "a truncate").await;
    assert_eq!(
        ledger.delivery_totals().await.unwrap(),
        (0, 0, 0.0),
        "nothing pending or dead after a truncate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweep_gauges_and_statuses_answer_from_counts_and_index_probes() {
    let env = TestEnv::new(1).await;
    env.add_broker("b1", "https://b1.example").await;
    env.add_broker("b2", "https://b2.example").await;
    env.add_broker("idle", "https://idle.example").await;
    // b1: overdue work in partition 0 only; b2: pending in partitions 0 and 1, due in the
    // future; partition 2 has overdue work of b2 (not asked about); dead rows with errors.
    env.db
        .batch_execute(
            "INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset,
                                     next_attempt_at, created_at, state, last_error, updated_at)
             VALUES ('evt:1', 'b1', 'L1', 0, 1, now() - interval '1 minute', now() - interval '2 hours', 'pending', NULL, now()),
                    ('evt:2', 'b1', 'L1', 0, 2, now() + interval '1 minute', now() - interval '1 hour', 'pending', NULL, now()),
                    ('evt:3', 'b2', 'L2', 0, 3, now() + interval '1 minute', now() - interval '3 hours', 'pending', NULL, now()),
                    ('evt:4', 'b2', 'L3', 1, 1, now() + interval '1 minute', now() - interval '1 minute', 'pending', NULL, now()),
                    ('evt:5', 'b2', 'L4', 2, 1, now() - interval '1 minute', now() - interval '1 minute', 'pending', NULL, now()),
                    ('evt:6', 'b1', 'L1', 0, 0, now(), now(), 'delivered', NULL, now()),
                    ('evt:7', 'b2', 'L5', 1, 0, now(), now(), 'dead', 'HTTP 400 old', now() - interval '1 hour')",
        )
        .await
        .unwrap();
    // An outcome write: a retry with a newer error for b2.
    env.db
        .batch_execute(
            "UPDATE deliveries SET attempts = 1, last_error = 'HTTP 503 newest', updated_at = now()
             WHERE idempotency_key = 'evt:4'",
        )
        .await
        .unwrap();
    let ledger = Ledger::connect_lazy(&env.db_url, 1).unwrap();

    let mut overdue = ledger
        .brokers_with_overdue_work(&[0, 1], Duration::from_secs(5))
        .await
        .unwrap();
    overdue.sort();
    assert_eq!(overdue, vec!["b1".to_owned()]);
    let mut overdue = ledger
        .brokers_with_overdue_work(&[0, 1, 2], Duration::from_secs(5))
        .await
        .unwrap();
    overdue.sort();
    assert_eq!(overdue, vec!["b1".to_owned(), "b2".to_owned()]);
    assert!(ledger
        .brokers_with_overdue_work(&[0], Duration::from_secs(3600))
        .await
        .unwrap()
        .is_empty());

    // The age counts from when a delivery became due: evt:3 was created 3 hours ago but waits
    // for a retry a minute ahead; evt:1 and evt:5 have been due for a minute.
    let (pending, dead, overdue_age) = ledger.delivery_totals().await.unwrap();
    assert_eq!((pending, dead), (5, 1));
    assert!(
        (50.0..120.0).contains(&overdue_age),
        "the most overdue delivery has been due for a minute, not {overdue_age} s"
    );

    let statuses = ledger.broker_statuses().await.unwrap();
    let find = |id: &str| statuses.iter().find(|s| s.broker_id == id).unwrap();
    let (b1, b2, idle) = (find("b1"), find("b2"), find("idle"));
    assert_eq!(
        (b1.pending, b1.dead, b1.last_error.as_deref()),
        (2, 0, None)
    );
    let b1_age = b1.oldest_pending_age_ms.unwrap();
    assert!(
        (50_000..120_000).contains(&b1_age),
        "b1's evt:1 is a minute overdue, not {b1_age} ms"
    );
    assert_eq!((b2.pending, b2.dead), (3, 1));
    assert_eq!(b2.last_error.as_deref(), Some("HTTP 503 newest"));
    assert_eq!(
        (idle.pending, idle.dead, idle.oldest_pending_age_ms),
        (0, 0, None)
    );

    // A death newer than the last retry error is the broker's newest error.
    env.db
        .batch_execute(
            "UPDATE deliveries SET state = 'dead', last_error = 'HTTP 410 gone', updated_at = now() + interval '1 second'
             WHERE idempotency_key = 'evt:3'",
        )
        .await
        .unwrap();
    let b2_status = |statuses: Vec<BrokerStatus>| {
        let b2 = statuses.into_iter().find(|s| s.broker_id == "b2").unwrap();
        (b2.pending, b2.dead, b2.last_error)
    };
    assert_eq!(
        b2_status(ledger.broker_statuses().await.unwrap()),
        (2, 2, Some("HTTP 410 gone".to_owned()))
    );

    // Once nothing of a pair is pending or dead, its errors are history.
    env.db
        .batch_execute(
            "UPDATE deliveries SET state = 'delivered', updated_at = now() WHERE idempotency_key = 'evt:4';
             DELETE FROM deliveries WHERE idempotency_key = 'evt:7'",
        )
        .await
        .unwrap();
    assert_eq!(
        b2_status(ledger.broker_statuses().await.unwrap()),
        (1, 1, Some("HTTP 410 gone".to_owned()))
    );
    env.db
        .batch_execute("DELETE FROM deliveries WHERE idempotency_key = 'evt:3'")
        .await
        .unwrap();
    assert_eq!(
        b2_status(ledger.broker_statuses().await.unwrap()),
        (1, 0, None)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrating_a_ledger_with_history_starts_the_counts_and_dead_errors_exact() {
    // The schema before the counts existed, with pending, dead and delivered rows in it.
    let env = TestEnv::with_schema(1, MigrationScope::UpTo(12)).await;
    env.db
        .batch_execute(
            "INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset, state)
             SELECT 'evt:' || g, 'b' || (g % 7), 'L' || (g % 50), g % 4, g,
                    CASE g % 5 WHEN 0 THEN 'dead' WHEN 1 THEN 'pending' ELSE 'delivered' END
             FROM generate_series(1, 5000) g;
             -- Dead letters with errors of different ages: migration 21 copies each pair's newest.
             UPDATE deliveries SET last_error = 'HTTP 400 #' || kafka_offset,
                                   updated_at = now() - kafka_offset * interval '1 second'
             WHERE state = 'dead' AND kafka_offset % 3 <> 0",
        )
        .await
        .unwrap();
    let applied = Ledger::connect_lazy(&env.db_url, 1)
        .unwrap()
        .migrate()
        .await
        .unwrap();
    assert!(
        applied.contains(&16) && applied.contains(&21),
        "applied {applied:?}"
    );
    assert_counts_exact(&env, "migrations 16 and 21: the initial counts and errors").await;
    assert_eq!(
        env.count("SELECT sum(pending)::int8 + sum(dead)::int8 FROM delivery_counts")
            .await,
        2000
    );
}
