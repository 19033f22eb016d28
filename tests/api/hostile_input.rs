//! Hostile input at either end costs one message or one delivery (issue 9, docs/design.md 9):
//! unstorable event fields, values the database refuses, garbage response bodies, a table lock
//! held for 30 s. Real Kafka, real Postgres, real HTTP receivers.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use webhook_delivery::core::event::{check_storable_text, parse_event, EventLimits, RejectReason};
use webhook_delivery::core::storable::StorableText;
use webhook_delivery::ledger::Ledger;
use wiremock::ResponseTemplate;

use crate::helpers::*;

/// The `eventId` of every webhook `server` received, in arrival order, per load.
async fn received_by_load(server: &wiremock::MockServer) -> HashMap<String, Vec<String>> {
    let mut by_load: HashMap<String, Vec<String>> = HashMap::new();
    for request in received(server).await {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        by_load
            .entry(body["loadId"].as_str().unwrap().to_owned())
            .or_default()
            .push(body["eventId"].as_str().unwrap().to_owned());
    }
    by_load
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_fields_cost_one_message_each_and_the_partition_moves_on() {
    let env = TestEnv::new(1).await;
    let server = ok_receiver().await;
    env.add_broker("b1", &server.uri()).await;
    env.subscribe("b1", "L1").await;
    env.subscribe("b1", "L2").await;
    let long_id = "x".repeat(4000);
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (
            br#"{"eventId":"nul-\u0000-id","loadId":"L1","status":"matched"}"#.to_vec(),
            "`eventId` cannot be stored: it holds a NUL",
        ),
        (
            br#"{"eventId":"bad-load","loadId":"L1\u0000","status":"matched"}"#.to_vec(),
            "`loadId` cannot be stored: it holds a NUL",
        ),
        (
            br#"{"eventId":"bad-status","loadId":"L2","status":"in\u0000transit"}"#.to_vec(),
            "`status` cannot be stored: it holds a NUL",
        ),
        (
            format!(r#"{{"eventId":"{long_id}","loadId":"L2","status":"matched"}}"#).into_bytes(),
            "`eventId` cannot be stored: 4000 bytes, above the limit of 256",
        ),
    ];
    let mut expected: HashMap<String, Vec<String>> = HashMap::new();
    let mut bad_offsets = Vec::new();
    let mut offset = 0;
    for (i, (value, _)) in bad.iter().enumerate() {
        for load in ["L1", "L2"] {
            let id = format!("good-{i}-{load}");
            env.produce_event(Some(&id), load, "matched").await;
            expected.entry(load.to_owned()).or_default().push(id);
            offset += 1;
        }
        env.produce(Some("L1"), value).await;
        bad_offsets.push(offset);
        offset += 1;
    }
    env.produce_event(Some("good-last"), "L1", "delivered")
        .await;
    expected
        .entry("L1".to_owned())
        .or_default()
        .push("good-last".to_owned());
    let total = offset + 1;

    let app = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&server).await.len() == 9
        })
        .await,
        "every good event is delivered around the unstorable ones (got {})",
        received(&server).await.len()
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.committed_offsets(1) == vec![total]
        })
        .await,
        "the committed offset moves past every message: {:?}",
        env.committed_offsets(1)
    );
    app.stop().await;

    assert_eq!(received_by_load(&server).await, expected, "per-load order");
    let rows = env
        .db
        .query(
            "SELECT kafka_offset, error, raw_value FROM rejected_messages ORDER BY kafka_offset",
            &[],
        )
        .await
        .unwrap();
    let offsets: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(offsets, bad_offsets);
    for (row, (value, reason)) in rows.iter().zip(&bad) {
        let error: String = row.get(1);
        assert!(error.contains(reason), "{error:?} should say {reason:?}");
        assert_eq!(&row.get::<_, Vec<u8>>(2), value, "the raw value is kept");
    }
    assert_eq!(
        env.count("SELECT count(*) FROM events").await,
        9,
        "only good events are in the ledger"
    );
}

/// A value that passes parsing but that the database refuses (here: a CHECK constraint the test
/// adds) is found by splitting the batch; the rest of the batch is claimed in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_the_database_refuses_is_split_out_of_its_batch() {
    let env = TestEnv::new(1).await;
    env.db
        .batch_execute(
            "ALTER TABLE events ADD CONSTRAINT test_refuses_poison CHECK (status <> 'poison')",
        )
        .await
        .unwrap();
    let server = ok_receiver().await;
    env.add_broker("b1", &server.uri()).await;
    env.subscribe("b1", "L1").await;
    let mut expected = Vec::new();
    for i in 0..12 {
        let poison = i % 5 == 2;
        let id = format!("e{i}");
        env.produce_event(Some(&id), "L1", if poison { "poison" } else { "matched" })
            .await;
        if !poison {
            expected.push(id);
        }
    }
    // All twelve are in the topic before the service starts: they arrive as one batch.
    let app = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&server).await.len() == expected.len()
        })
        .await,
        "good events delivered"
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.committed_offsets(1) == vec![12]
        })
        .await
    );
    let data_errors = app
        .metric_value(
            "webhook_delivery_ledger_errors_total",
            &["kind=\"data\"", "operation=\"claim\""],
        )
        .await;
    app.stop().await;
    assert!(data_errors.unwrap_or(0.0) >= 2.0, "{data_errors:?}");

    let order = received_by_load(&server).await.remove("L1").unwrap();
    assert_eq!(order, expected);
    let rows = env
        .db
        .query(
            "SELECT kafka_offset, error FROM rejected_messages ORDER BY kafka_offset",
            &[],
        )
        .await
        .unwrap();
    let rejected: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(rejected, vec![2, 7]);
    for row in rows {
        let error: String = row.get(1);
        assert!(
            error.contains("the ledger refused this event") && error.contains("23514"),
            "{error}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_response_bodies_cost_nothing_beyond_their_own_deliveries() {
    let env = TestEnv::new(1).await;
    let mut utf16_page: Vec<u8> = "<h1>Internal error</h1>"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    utf16_page.extend_from_slice(&[0xff, 0xfe, 0xc3, 0x28, 0x00]);
    let brokers = [
        (
            unique("nul-500"),
            ResponseTemplate::new(500).set_body_bytes(b"boom\0\0\0".to_vec()),
        ),
        (
            unique("utf16-500"),
            ResponseTemplate::new(500).set_body_bytes(utf16_page),
        ),
        (
            unique("binary-200"),
            ResponseTemplate::new(200).set_body_bytes(vec![0u8, 159, 146, 150, 0, 27, 1]),
        ),
        (
            unique("huge-503"),
            ResponseTemplate::new(503).set_body_bytes(vec![0u8; 2 * 1024 * 1024]),
        ),
        (unique("healthy"), ResponseTemplate::new(200)),
    ];
    let mut servers = Vec::new();
    for (broker, response) in &brokers {
        let server = receiver(response.clone()).await;
        env.add_broker(broker, &server.uri()).await;
        for load in ["L1", "L2", "L3"] {
            env.subscribe(broker, load).await;
        }
        servers.push(server);
    }
    let events = 30;
    for i in 0..events {
        let load = ["L1", "L2", "L3"][i % 3];
        env.produce_event(Some(&format!("e{i}")), load, "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.retry.max_attempts = 3;
    settings.retry.base_delay_ms = 100;
    settings.retry.max_delay_ms = 200;
    // The breaker would only slow the 5xx brokers down; attempts are what is checked here.
    settings.circuit_breaker.failure_threshold = 10_000;
    settings.circuit_breaker.min_requests = 10_000;
    let app = spawn_app(settings);

    for index in [2, 4] {
        let server = &servers[index];
        assert!(
            eventually(Duration::from_secs(30), || async {
                received(server).await.len() == events
            })
            .await,
            "{} gets every event promptly (got {})",
            brokers[index].0,
            received(server).await.len()
        );
    }
    assert!(
        eventually(Duration::from_secs(60), || async {
            env.count("SELECT count(*) FROM deliveries WHERE state = 'pending'")
                .await
                == 0
        })
        .await,
        "every delivery reaches a final state"
    );
    app.stop().await;

    for (index, (broker, _)) in brokers.iter().enumerate() {
        let requests = received(&servers[index]).await.len();
        let (final_state, attempts_each) = if index == 2 || index == 4 {
            ("delivered", 1)
        } else {
            ("dead", 3)
        };
        if attempts_each == 1 {
            assert_eq!(requests, events, "{broker}: each event once");
        } else {
            assert!(
                requests <= events * attempts_each,
                "{broker}: {requests} requests"
            );
        }
        let in_state = env
            .db
            .query_one(
                "SELECT count(*) FROM deliveries WHERE broker_id = $1 AND state = $2 AND attempts = $3",
                &[broker, &final_state, &(attempts_each as i32)],
            )
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(
            in_state, events as i64,
            "{broker}: {final_state} after {attempts_each}"
        );
        assert!(
            logged("could not save delivery outcomes; retrying in 1 s", broker).is_empty(),
            "{broker}: every outcome was saved the first time"
        );
    }
    let stored: String = env
        .db
        .query_one(
            "SELECT last_error FROM deliveries WHERE broker_id = $1 LIMIT 1",
            &[&brokers[0].0],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.contains("boom\\u{0}"), "{stored:?}");
    let longest: i32 = env
        .db
        .query_one(
            "SELECT max(octet_length(error_message)) FROM delivery_attempts WHERE broker_id = $1",
            &[&brokers[3].0],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        longest <= 4096 + 64,
        "the 2 MB body is kept within max_response_bytes: {longest}"
    );
}

/// An outcome row the database refuses (here: a CHECK constraint the test adds on the error
/// text) is stored without its text; the other broker sharing the group commit is not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_row_the_database_refuses_costs_only_its_own_text() {
    let env = TestEnv::new(1).await;
    env.db
        .batch_execute(
            "ALTER TABLE delivery_attempts ADD CONSTRAINT test_refuses_text
                 CHECK (error_message IS NULL OR error_message NOT LIKE '%refuse-me%')",
        )
        .await
        .unwrap();
    let refused = receiver(ResponseTemplate::new(500).set_body_string("refuse-me")).await;
    let healthy = ok_receiver().await;
    let (refused_id, healthy_id) = (unique("refused"), unique("healthy"));
    for (broker, server) in [(&refused_id, &refused), (&healthy_id, &healthy)] {
        env.add_broker(broker, &server.uri()).await;
        env.subscribe(broker, "L1").await;
        env.subscribe(broker, "L2").await;
    }
    for i in 0..10 {
        env.produce_event(Some(&format!("e{i}")), ["L1", "L2"][i % 2], "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.retry.max_attempts = 2;
    settings.retry.base_delay_ms = 100;
    settings.retry.max_delay_ms = 100;
    settings.circuit_breaker.failure_threshold = 10_000;
    settings.circuit_breaker.min_requests = 10_000;
    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&healthy).await.len() == 10
        })
        .await
    );
    assert!(
        env.count_reaches(
            &format!("SELECT count(*) FROM deliveries WHERE broker_id = '{refused_id}' AND state = 'dead'"),
            10,
            Duration::from_secs(30),
        )
        .await,
        "the refused broker's deliveries end dead after their attempts, never stuck"
    );
    app.stop().await;
    assert_eq!(
        received(&refused).await.len(),
        20,
        "two attempts each, no more"
    );
    assert_eq!(
        env.count(&format!(
            "SELECT count(*) FROM delivery_attempts WHERE broker_id = '{refused_id}'
             AND error_message LIKE 'the outcome''s text could not be stored%'"
        ))
        .await,
        20,
        "each attempt is recorded, without the text the database refused"
    );
}

/// Another session holds `LOCK TABLE deliveries` for 30 s mid-stream: claims and outcome writes
/// time out and retry; the stall is reported (ERROR line, gauge, /readyz) and clears by itself
/// once the lock is gone; every event is delivered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_lock_held_for_30_s_is_reported_and_then_recovered_from() {
    let env = TestEnv::new(1).await;
    let receiver = ScriptedReceiver::start(&[200]).await;
    env.add_broker("b1", &receiver.server.uri()).await;
    env.subscribe("b1", "L1").await;
    let mut settings = env.settings();
    settings.kafka.stall_after_ms = 5_000;
    settings.postgres.statement_timeout_ms = 1_500;
    settings.postgres.call_timeout_ms = 3_000;
    let app = spawn_app(settings);
    for i in 0..5 {
        env.produce_event(Some(&format!("before-{i}")), "L1", "matched")
            .await;
    }
    assert!(
        eventually(Duration::from_secs(30), || async {
            receiver.requests().len() == 5
        })
        .await
    );

    let lock = TableLock::take(&env, "deliveries").await;
    let locked_at = std::time::Instant::now();
    for i in 0..5 {
        env.produce_event(Some(&format!("during-{i}")), "L1", "matched")
            .await;
    }
    let stalled_line = || {
        logged(
        "partition stalled: it has lag and its committed offset has not moved (RUNBOOK: stalled partition)",
        &env.topic,
    )
    };
    assert!(
        eventually(Duration::from_secs(25), || async {
            !stalled_line().is_empty()
        })
        .await,
        "the stall is reported in an ERROR line"
    );
    let line = &stalled_line()[0];
    assert_eq!(line["level"], 50, "{line}");
    assert_eq!(line["partition"], 0, "{line}");
    assert!(line["error.message"].as_str().is_some(), "{line}");
    assert_eq!(
        app.metric_value("webhook_delivery_partition_stalled", &["partition=\"0\""])
            .await,
        Some(1.0)
    );
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status(), 503);
    let reason = ready.text().await.unwrap();
    assert!(reason.contains("partition 0 stalled"), "{reason}");
    assert_eq!(
        receiver.requests().len(),
        5,
        "nothing new is sent while the lock holds"
    );
    // The claim has been stuck for longer than the lease (8 s): the lease is renewed anyway.
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(locked_at.elapsed())).await;
    let lease_left: f64 = env
        .db
        .query_one(
            "SELECT EXTRACT(EPOCH FROM (expires_at - now()))::float8 FROM partition_leases",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        lease_left > 3.0,
        "the lease is renewed while a claim waits ({lease_left} s left)"
    );

    // Hold it for 30 s in all, then let go.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(locked_at.elapsed())).await;
    lock.release().await;
    for i in 0..5 {
        env.produce_event(Some(&format!("after-{i}")), "L1", "matched")
            .await;
    }
    assert!(
        eventually(Duration::from_secs(45), || async {
            receiver.requests().len() >= 15
        })
        .await,
        "the service recovers by itself (got {})",
        receiver.requests().len()
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.admin_get("/readyz").await.status() == 200
        })
        .await,
        "/readyz is green again"
    );
    assert_eq!(
        app.metric_value("webhook_delivery_partition_stalled", &["partition=\"0\""])
            .await,
        Some(0.0)
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    app.stop().await;

    let ids: Vec<String> = receiver.requests().into_iter().map(|(_, id)| id).collect();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), 15, "nothing duplicated: {ids:?}");
    assert_eq!(distinct.len(), 15, "nothing lost");
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
            .await,
        15
    );
    assert_eq!(env.committed_offsets(1), vec![15]);
}

/// Outcome writes that cannot reach their table (another session holds `LOCK TABLE
/// delivery_attempts`) are reported as an outcome-write stall for the broker; once the lock is
/// gone they are written, and nothing is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_write_stall_is_reported_and_nothing_is_sent_twice() {
    let env = TestEnv::new(1).await;
    let receiver = ScriptedReceiver::start(&[200]).await;
    let broker = unique("stuck-outcomes");
    env.add_broker(&broker, &receiver.server.uri()).await;
    env.subscribe(&broker, "L1").await;
    env.subscribe(&broker, "L2").await;
    let mut settings = env.settings();
    settings.kafka.stall_after_ms = 5_000;
    settings.postgres.statement_timeout_ms = 1_000;
    settings.postgres.call_timeout_ms = 2_000;
    let app = spawn_app(settings);
    env.produce_event(Some("warm-up"), "L1", "matched").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            receiver.requests().len() == 1
        })
        .await
    );
    let lock = TableLock::take(&env, "delivery_attempts").await;
    for i in 0..4 {
        env.produce_event(Some(&format!("e{i}")), ["L1", "L2"][i % 2], "matched")
            .await;
    }
    let stalled = || {
        logged(
            "attempt outcomes of this broker cannot be written; its deliveries wait (RUNBOOK: outcome-write stall)",
            &broker,
        )
    };
    assert!(
        eventually(Duration::from_secs(30), || async { !stalled().is_empty() }).await,
        "the outcome-write stall is reported"
    );
    assert_eq!(stalled()[0]["level"], 50);
    let label = format!("broker_id=\"{broker}\"");
    assert_eq!(
        app.metric_value("webhook_delivery_outcome_write_stalled", &[&label])
            .await,
        Some(1.0)
    );
    let ready = app.admin_get("/readyz").await;
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains(&broker));
    // Where the deliveries wait, for on-call: both loads on the ledger, none on the endpoint.
    let awaiting_save = || app.metric_value("webhook_delivery_lanes", &["state=\"awaiting_save\""]);
    assert!(
        eventually(Duration::from_secs(10), || async {
            awaiting_save().await == Some(2.0)
        })
        .await,
        "lanes awaiting their save: {:?}",
        awaiting_save().await
    );
    let listed = app.listed_broker(&broker).await.unwrap();
    assert_eq!(
        listed["lanes"],
        serde_json::json!({"in_flight": 0, "awaiting_save": 2, "ready": 0, "waiting_retry": 0})
    );
    // One delivery per load was sent; the next of each load waits for its predecessor's outcome.
    let sent_while_locked = receiver.requests().len();
    assert!(sent_while_locked <= 3, "{sent_while_locked}");

    lock.release().await;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            5,
            Duration::from_secs(30)
        )
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.admin_get("/readyz").await.status() == 200
        })
        .await,
        "/readyz is green again"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            awaiting_save().await == Some(0.0)
        })
        .await,
        "no lane waits for the ledger once it is back"
    );
    assert_eq!(
        app.metric_value("webhook_delivery_outcome_write_stalled", &[&label])
            .await,
        Some(0.0)
    );
    app.stop().await;
    let ids: Vec<String> = receiver.requests().into_iter().map(|(_, id)| id).collect();
    let distinct: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(
        (ids.len(), distinct.len()),
        (5, 5),
        "nothing sent twice: {ids:?}"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history")
            .await,
        5
    );
}

const PROPTEST_LIMITS: EventLimits = EventLimits {
    max_message_bytes: 4096,
    max_event_id_bytes: 64,
    max_load_id_bytes: 64,
    max_status_bytes: 32,
};

fn assert_storable_event(event: &webhook_delivery::core::event::ShipmentEvent) {
    if let Some(id) = &event.event_id {
        check_storable_text(id, PROPTEST_LIMITS.max_event_id_bytes).unwrap();
    }
    check_storable_text(&event.load_id, PROPTEST_LIMITS.max_load_id_bytes).unwrap();
    check_storable_text(&event.status, PROPTEST_LIMITS.max_status_bytes).unwrap();
    assert!(!event.key.as_str().contains('\0'));
}

/// Any JSON object whose fields hold arbitrary text (NUL, controls, long runs, any Unicode).
fn hostile_event_json() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        any::<String>(),
        "[a-zA-Z0-9._-]{1,40}",
        proptest::collection::vec(any::<char>(), 0..100).prop_map(|c| c.into_iter().collect()),
    ];
    (
        proptest::option::of(text.clone()),
        text.clone(),
        text,
        any::<bool>(),
    )
        .prop_map(|(event_id, load_id, status, with_extra)| {
            let mut value = serde_json::json!({"loadId": load_id, "status": status});
            if let Some(id) = event_id {
                value["eventId"] = id.into();
            }
            if with_extra {
                value["extra"] = serde_json::json!({"nested": [1, null, "\u{0}"]});
            }
            serde_json::to_vec(&value).unwrap()
        })
}

/// Arbitrary bytes and arbitrary JSON into the parser and the boundary types: every input
/// yields storable values or a rejection, never a panic.
#[test]
fn parsing_anything_yields_storable_values_or_a_rejection() {
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 2_000,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..600),
                hostile_event_json(),
            ],
            |bytes| {
                match parse_event(Some(&bytes), &PROPTEST_LIMITS) {
                    Ok(event) => assert_storable_event(&event),
                    Err(reason) => {
                        let text = reason.to_string();
                        prop_assert!(!text.contains('\0'), "{text:?}");
                    }
                }
                let excerpt = StorableText::from_bytes_lossy(&bytes, 100);
                prop_assert!(excerpt.len() <= 100);
                prop_assert!(!excerpt.chars().any(char::is_control));
                Ok(())
            },
        )
        .unwrap();
}

/// `[postgres]` as config/base.toml ships it, pool of one, for a test's own database.
fn postgres_settings(url: String) -> webhook_delivery::config::PostgresSettings {
    webhook_delivery::config::PostgresSettings {
        url,
        pool_size: 1,
        lease_ms: 30_000,
        ca_file: String::new(),
        statement_timeout_ms: 15_000,
        call_timeout_ms: 20_000,
        keepalive_idle_ms: 30_000,
        outcome_commit: webhook_delivery::config::OutcomeCommit::Durable,
    }
}

/// A fresh, migrated database of its own (no Kafka needed): (url, client).
async fn database_only() -> (String, tokio_postgres::Client) {
    let (admin, connection) = tokio_postgres::connect(ADMIN_DB_URL, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let name = unique("wd_test").replace('-', "_");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    Ledger::connect_lazy(&url, 1)
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    (url, db)
}

/// Whatever the parser accepts, the ledger stores and gives back unchanged.
#[test]
fn storable_values_round_trip_through_a_real_insert() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (db_url, db) = runtime.block_on(database_only());
    let ledger = Ledger::connect_lazy(&db_url, 2).unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    // The runner takes an Fn: the counters live in cells.
    let offset = std::cell::Cell::new(0i64);
    let stored = std::cell::Cell::new(0);
    let seen = std::cell::RefCell::new(std::collections::HashSet::new());
    runner
        .run(&hostile_event_json(), |bytes| {
            let event = match parse_event(Some(&bytes), &PROPTEST_LIMITS) {
                Ok(event) => event,
                Err(RejectReason::Unstorable { .. } | RejectReason::BadField { .. }) => {
                    return Ok(())
                }
                Err(other) => panic!("unexpected rejection {other:?} of {bytes:?}"),
            };
            offset.set(offset.get() + 1);
            if !seen.borrow_mut().insert(event.key.clone()) {
                // A repeated key is a duplicate by design: the first one stays.
                return Ok(());
            }
            stored.set(stored.get() + 1);
            runtime.block_on(async {
                ledger
                    .claim_batch("shipment-events", 0, &[(offset.get(), event.clone())])
                    .await
                    .expect("a storable event is stored");
                let row = db
                    .query_one(
                        "SELECT event_id, load_id, status, payload FROM events WHERE idempotency_key = $1",
                        &[&event.key.as_str()],
                    )
                    .await
                    .unwrap();
                assert_eq!(row.get::<_, Option<String>>(0).as_deref(), event.event_id.as_deref());
                assert_eq!(row.get::<_, String>(1), event.load_id.as_str());
                assert_eq!(row.get::<_, String>(2), event.status.as_str());
                assert_eq!(row.get::<_, Vec<u8>>(3), bytes);
            });
            Ok(())
        })
        .unwrap();
    let stored = stored.get();
    assert!(
        stored > 20,
        "the generator produces storable events too ({stored})"
    );
}

/// The classification holds against the real server: what the boundary types keep out would be
/// data errors (split out of a batch), and a statement timeout is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_postgres_errors_are_classified() {
    use webhook_delivery::ledger::{ErrorKind, LedgerError};
    let (_url, db) = database_only().await;
    let kind = |error: tokio_postgres::Error| LedgerError::Query(error).kind();

    let nul = db.execute("SELECT $1::text", &[&"a\0b"]).await.unwrap_err();
    assert_eq!(kind(nul), ErrorKind::Data, "NUL in text");

    db.batch_execute("CREATE TABLE wide (v text); CREATE INDEX wide_v ON wide (v)")
        .await
        .unwrap();
    // Random text does not compress below the btree limit (about 2.7 kB).
    let wide: String = uuid_noise(8_000).collect();
    let too_wide = db
        .execute("INSERT INTO wide VALUES ($1)", &[&wide])
        .await
        .unwrap_err();
    assert_eq!(kind(too_wide), ErrorKind::Data, "index row too large");

    let timeout = db
        .batch_execute("SET statement_timeout = 100; SELECT pg_sleep(2)")
        .await
        .unwrap_err();
    assert_eq!(kind(timeout), ErrorKind::Retryable, "statement timeout");

    let missing = db
        .execute("SELECT * FROM no_such_table", &[])
        .await
        .unwrap_err();
    assert_eq!(kind(missing), ErrorKind::Other, "undefined table");
}

/// `postgres.outcome_commit`: with "async" the outcome writers' own connections commit without
/// waiting for the WAL flush; with "durable" outcomes share the claims' pool, as the server
/// says; the pool that claims use is never changed (a lost claim would be a lost event).
#[tokio::test]
async fn only_the_outcome_connections_commit_asynchronously() {
    use webhook_delivery::config::{OutcomeCommit, PostgresSettings};
    let (url, _db) = database_only().await;
    let settings = |outcome_commit| PostgresSettings {
        outcome_commit,
        ..postgres_settings(url.clone())
    };
    let claims = Ledger::connect(&settings(OutcomeCommit::Async)).unwrap();
    let outcomes = |outcome_commit| claims.for_outcomes(&settings(outcome_commit), 1);
    let commit_mode = |ledger: Ledger| async move { ledger.synchronous_commit().await.unwrap() };
    assert_eq!(
        commit_mode(outcomes(OutcomeCommit::Async).unwrap()).await,
        "off"
    );
    assert_eq!(
        commit_mode(outcomes(OutcomeCommit::Durable).unwrap()).await,
        "on"
    );
    assert_eq!(commit_mode(claims.clone()).await, "on");
}

/// A call the server does not answer (a lock, here, with a long statement_timeout) ends at the
/// client-side bound as a retryable error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_hangs_ends_at_the_client_side_bound() {
    use webhook_delivery::config::PostgresSettings;
    use webhook_delivery::ledger::ErrorKind;
    let (url, db) = database_only().await;
    let ledger = Ledger::connect(&PostgresSettings {
        statement_timeout_ms: 60_000,
        call_timeout_ms: 500,
        ..postgres_settings(url)
    })
    .unwrap();
    ledger.ping().await.unwrap();
    db.batch_execute("BEGIN; LOCK TABLE brokers IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let error = ledger.brokers(&["acme".to_owned()]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(error.kind(), ErrorKind::Retryable, "{error}");
    assert!(
        error.to_string().contains("did not answer within"),
        "{error}"
    );
    db.batch_execute("COMMIT").await.unwrap();
}

/// Incompressible text: hex of random UUIDs.
fn uuid_noise(chars: usize) -> impl Iterator<Item = char> {
    (0..chars / 32 + 1)
        .flat_map(|_| {
            uuid::Uuid::new_v4()
                .simple()
                .to_string()
                .chars()
                .collect::<Vec<_>>()
        })
        .take(chars)
}
