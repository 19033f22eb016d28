//! `webhook-delivery report duplicates|deliveries`, run as the real binary against the ledger a
//! real run produced.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{SecondsFormat, Utc};
use serde_json::Value;
use webhook_delivery::core::event::IdempotencyKey;
use webhook_delivery::core::signing::webhook_id;
use webhook_delivery::ledger::{AttemptOutcome, AttemptRecord, Ledger};

use crate::helpers::*;

fn stdout_of(output: std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn hours_ago(hours: i64) -> String {
    (Utc::now() - chrono::Duration::hours(hours)).to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn id_of(event_id: &str) -> String {
    webhook_id(&IdempotencyKey::from_event_id(event_id))
}

/// Adds an attempt row for (event, broker) as if another send had happened `seconds_ago`: the
/// at-least-once crash window this report exists to measure.
async fn add_attempt(
    env: &TestEnv,
    event_id: &str,
    broker_id: &str,
    seconds_ago: i64,
    status: i32,
) {
    let outcome = if (200..300).contains(&status) {
        "delivered"
    } else {
        "retry"
    };
    let added = env
        .db
        .execute(
            "INSERT INTO delivery_attempts (delivery_id, broker_id, attempt, started_at, latency_ms, status_code, outcome)
             SELECT delivery_id, broker_id, 1, now() - $3::int8 * interval '1 second', 5, $4, $5
             FROM deliveries WHERE idempotency_key = $1 AND broker_id = $2",
            &[
                &IdempotencyKey::from_event_id(event_id).as_str(),
                &broker_id,
                &seconds_ago,
                &status,
                &outcome,
            ],
        )
        .await
        .unwrap();
    assert_eq!(added, 1);
}

/// (broker_id, webhook_id) -> times_delivered, from the JSON report.
fn duplicates_of(report: &Value) -> BTreeMap<(String, String), i64> {
    report["duplicates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                (
                    d["broker_id"].as_str().unwrap().to_owned(),
                    d["webhook_id"].as_str().unwrap().to_owned(),
                ),
                d["times_delivered"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn expected(rows: &[(&str, &str, i64)]) -> BTreeMap<(String, String), i64> {
    rows.iter()
        .map(|(broker, event, n)| ((broker.to_string(), id_of(event)), *n))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_duplicates_lists_exactly_the_webhook_ids_delivered_more_than_once() {
    let env = TestEnv::new(1).await;
    let b1 = ok_receiver().await;
    let b2 = ok_receiver().await;
    env.add_broker("b1", &b1.uri()).await;
    env.add_broker("b2", &b2.uri()).await;
    env.subscribe("b1", "L1").await;
    env.subscribe("b2", "L1").await;
    for event in ["e1", "e2", "e3", "e4"] {
        env.produce_event(Some(event), "L1", "matched").await;
    }
    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            8,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
    let sent_to_b1: Vec<String> = received(&b1)
        .await
        .iter()
        .map(|r| header(r, "webhook-id").to_owned())
        .collect();
    assert!(sent_to_b1.contains(&id_of("e1")) && sent_to_b1.contains(&id_of("e2")));

    add_attempt(&env, "e1", "b1", 10, 200).await;
    add_attempt(&env, "e2", "b1", 10, 200).await;
    add_attempt(&env, "e2", "b1", 5, 204).await;
    add_attempt(&env, "e3", "b2", 10, 200).await;
    // A failed attempt is not a delivery.
    add_attempt(&env, "e4", "b2", 10, 503).await;
    // Two days ago, outside the last hour.
    add_attempt(&env, "e4", "b1", 2 * 86_400, 200).await;
    add_attempt(&env, "e4", "b1", 2 * 86_400 - 60, 200).await;

    // The last hour, as JSON.
    let since = hours_ago(1);
    let report: Value = serde_json::from_str(&stdout_of(run_cli(
        &env,
        &[
            "report",
            "duplicates",
            "--since",
            &since,
            "--format",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(
        duplicates_of(&report),
        expected(&[("b1", "e1", 2), ("b1", "e2", 3), ("b2", "e3", 2)])
    );
    let e2 = report["duplicates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["webhook_id"] == id_of("e2").as_str())
        .unwrap();
    assert_eq!(e2["event_id"], "e2");
    assert_eq!(e2["load_id"], "L1");
    assert!(e2["first_delivered_at"].as_str().unwrap() < e2["last_delivered_at"].as_str().unwrap());
    assert_eq!(
        report["summary"],
        serde_json::json!([
            {"broker_id": "b1", "duplicated_webhook_ids": 2, "extra_deliveries": 3},
            {"broker_id": "b2", "duplicated_webhook_ids": 1, "extra_deliveries": 1},
        ])
    );
    assert!(report["since"].is_string() && report["until"].is_string());

    // The same window as CSV (the default format).
    let csv = stdout_of(run_cli(&env, &["report", "duplicates", "--since", &since]));
    let (rows, summary) = csv
        .split_once("\n\n")
        .expect("a blank line before the summary");
    let mut lines = rows.lines();
    assert_eq!(
        lines.next(),
        Some("broker_id,webhook_id,event_id,load_id,times_delivered,first_delivered_at,last_delivered_at")
    );
    let from_csv: BTreeMap<(String, String), i64> = lines
        .map(|line| {
            let fields: Vec<&str> = line.split(',').collect();
            assert_eq!(fields.len(), 7, "{line}");
            (
                (fields[0].to_owned(), fields[1].to_owned()),
                fields[4].parse().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        from_csv,
        expected(&[("b1", "e1", 2), ("b1", "e2", 3), ("b2", "e3", 2)])
    );
    let summary: Vec<&str> = summary.lines().collect();
    assert_eq!(
        summary[0],
        "broker_id,duplicated_webhook_ids,extra_deliveries,window_since,window_until"
    );
    assert!(summary[1].starts_with("b1,2,3,"), "{csv}");
    assert!(summary[2].starts_with("b2,1,1,"), "{csv}");
    assert_eq!(summary.len(), 3, "{csv}");

    // --until closes the window: three days ago to one day ago holds only the old pair.
    let old = serde_json::from_str::<Value>(&stdout_of(run_cli(
        &env,
        &[
            "report",
            "duplicates",
            "--since",
            &hours_ago(72),
            "--until",
            &hours_ago(24),
            "--format",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(duplicates_of(&old), expected(&[("b1", "e4", 2)]));

    // Three days up to now: the old pair plus its real delivery today.
    let all = serde_json::from_str::<Value>(&stdout_of(run_cli(
        &env,
        &[
            "report",
            "duplicates",
            "--since",
            &hours_ago(72),
            "--format",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(
        duplicates_of(&all),
        expected(&[
            ("b1", "e1", 2),
            ("b1", "e2", 3),
            ("b1", "e4", 3),
            ("b2", "e3", 2)
        ])
    );

    let backwards = run_cli(
        &env,
        &[
            "report",
            "duplicates",
            "--since",
            &hours_ago(1),
            "--until",
            &hours_ago(2),
        ],
    );
    assert!(!backwards.status.success());
    assert!(String::from_utf8_lossy(&backwards.stderr).contains("--until"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_deliveries_tells_the_story_of_one_event() {
    let env = TestEnv::new(1).await;
    let scripted = ScriptedReceiver::start(&[503, 200]).await;
    let receiver = &scripted.server;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    let without_id = env.produce_event(None, "L1", "accepted").await;
    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            2,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
    let first_request = &received(receiver).await[0];

    let story: Value = serde_json::from_str(&stdout_of(run_cli(
        &env,
        &["report", "deliveries", "--event-id", "e1", "--json"],
    )))
    .unwrap();
    assert_eq!(story["event_id"], "e1");
    assert_eq!(story["topic"], env.topic.as_str());
    assert_eq!(
        (story["partition"].as_i64(), story["offset"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(story["consumed_at"].is_string());
    let deliveries = story["deliveries"].as_array().unwrap();
    assert_eq!(deliveries.len(), 1, "{story:#}");
    assert_eq!(deliveries[0]["broker_id"], "b1");
    assert_eq!(deliveries[0]["state"], "delivered");
    assert_eq!(
        deliveries[0]["webhook_id"],
        header(first_request, "webhook-id")
    );
    let attempts = deliveries[0]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{story:#}");
    assert_eq!(
        (
            &attempts[0]["attempt"],
            &attempts[0]["status_code"],
            &attempts[0]["outcome"]
        ),
        (&Value::from(1), &Value::from(503), &Value::from("retry"))
    );
    assert_eq!(
        (
            &attempts[1]["attempt"],
            &attempts[1]["status_code"],
            &attempts[1]["outcome"]
        ),
        (
            &Value::from(2),
            &Value::from(200),
            &Value::from("delivered")
        )
    );
    assert!(attempts[0]["latency_ms"].is_i64());
    assert!(attempts[1]["latency_ms"].is_i64());
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempts WHERE outcome = 'retry'")
            .await,
        1,
        "the failed attempt is a history row"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempts WHERE outcome = 'delivered'")
            .await,
        0,
        "the attempt that delivered lives on the delivery's row"
    );

    let text = stdout_of(run_cli(&env, &["report", "deliveries", "--event-id", "e1"]));
    for needle in [
        "e1",
        "partition 0 offset 0",
        "broker b1",
        "HTTP 503",
        "retry",
        "delivered at",
    ] {
        assert!(text.contains(needle), "`{needle}` in:\n{text}");
    }

    // An event without an eventId is found by its idempotency key.
    let key = IdempotencyKey::from_value_bytes(&without_id);
    let story: Value = serde_json::from_str(&stdout_of(run_cli(
        &env,
        &["report", "deliveries", "--event-id", key.as_str(), "--json"],
    )))
    .unwrap();
    assert!(story["event_id"].is_null());
    assert_eq!(story["offset"], 1);
    assert_eq!(
        story["deliveries"][0]["attempts"].as_array().unwrap().len(),
        1
    );

    let unknown = run_cli(
        &env,
        &["report", "deliveries", "--event-id", "no-such-event"],
    );
    assert!(!unknown.status.success());
    assert!(unknown.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(stderr.contains("no-such-event"), "{stderr}");
}

/// An outcome for delivery `delivery_id` of broker b1, as a DeliveryActor reports it.
fn outcome_of(
    delivery_id: i64,
    attempt: u32,
    status: u16,
    outcome: AttemptOutcome,
) -> AttemptRecord {
    AttemptRecord {
        delivery_id,
        broker_id: "b1".to_owned(),
        attempt,
        started_at: Utc::now(),
        latency: Duration::from_millis(7),
        status_code: Some(status),
        error_class: None,
        error_message: None,
        outcome,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_2xx_for_a_delivered_delivery_is_history_and_a_duplicate() {
    let env = TestEnv::new(1).await;
    env.add_broker("b1", "http://127.0.0.1:9").await;
    let delivery_id: i64 = env
        .db
        .query_one(
            "WITH e AS (INSERT INTO events (idempotency_key, event_id, load_id, status, topic,
                                           kafka_partition, kafka_offset, payload)
                        VALUES ($1, 'e1', 'L1', 'matched', 't', 0, 0, '{}'))
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
             VALUES ($1, 'b1', 'L1', 0, 0) RETURNING delivery_id",
            &[&IdempotencyKey::from_event_id("e1").as_str()],
        )
        .await
        .unwrap()
        .get(0);
    let ledger = Ledger::connect_lazy(&env.db_url, 1).unwrap();

    ledger
        .record_attempts(&[outcome_of(delivery_id, 1, 200, AttemptOutcome::Delivered)])
        .await
        .unwrap();
    let row = env
        .db
        .query_one(
            "SELECT state, attempts, last_status_code, delivered_latency_ms,
                    delivered_started_at IS NOT NULL
             FROM deliveries WHERE delivery_id = $1",
            &[&delivery_id],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, i32>(1),
            row.get::<_, Option<i32>>(2),
            row.get::<_, Option<i32>>(3),
            row.get::<_, bool>(4)
        ),
        ("delivered".to_owned(), 1, Some(200), Some(7), true)
    );
    assert_eq!(env.count("SELECT count(*) FROM delivery_attempts").await, 0);

    // Sent again (an old owner that had not seen the first outcome): the row keeps the first
    // delivery, the second 2xx and a late failure are history.
    ledger
        .record_attempts(&[
            outcome_of(delivery_id, 1, 204, AttemptOutcome::Delivered),
            outcome_of(
                delivery_id,
                2,
                503,
                AttemptOutcome::RetryIn(Duration::from_secs(1)),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(
        env.count(
            "SELECT count(*) FROM deliveries
             WHERE state = 'delivered' AND last_status_code = 200 AND attempts = 1"
        )
        .await,
        1,
        "a delivery that is no longer pending is left as it is"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history")
            .await,
        3
    );
    let report: Value = serde_json::from_str(&stdout_of(run_cli(
        &env,
        &[
            "report",
            "duplicates",
            "--since",
            &hours_ago(1),
            "--format",
            "json",
        ],
    )))
    .unwrap();
    assert_eq!(duplicates_of(&report), expected(&[("b1", "e1", 2)]));
}
