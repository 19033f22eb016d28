//! Backfill: events consumed while a broker was disabled reach it once, with the webhook-ids a
//! normal claim would have given them, after it is re-enabled and backfilled.

use std::collections::HashSet;
use std::time::Duration;

use chrono::Utc;
use futures::FutureExt;
use webhook_delivery::core::event::IdempotencyKey;
use webhook_delivery::core::signing::webhook_id;

use crate::helpers::*;

const TOKEN: &str = "test-admin-token-backfill-0123";

fn json_output(output: &std::process::Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON object")
}

async fn set_enabled(env: &TestEnv, broker_id: &str, enabled: bool) {
    env.db
        .execute(
            "UPDATE brokers SET enabled = $2 WHERE broker_id = $1",
            &[&broker_id, &enabled],
        )
        .await
        .unwrap();
}

/// The webhook-ids a normal claim gives the events of `load_id`, in offset order.
async fn expected_webhook_ids(env: &TestEnv, load_id: &str) -> Vec<String> {
    env.db
        .query(
            "SELECT idempotency_key FROM events WHERE load_id = $1 ORDER BY kafka_offset",
            &[&load_id],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| webhook_id(&IdempotencyKey::from_stored(row.get(0))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_missed_while_disabled_arrive_once_after_backfill_and_a_rerun_creates_nothing() {
    let env = TestEnv::new(2).await;
    let since = (Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let receiver = ScriptedReceiver::start(&[200]).await;
    let other = ok_receiver().await;
    env.add_broker("late", &receiver.server.uri()).await;
    env.add_broker("steady", &other.uri()).await;
    for load in ["L1", "L2"] {
        env.subscribe("late", load).await;
        env.subscribe("steady", load).await;
    }
    set_enabled(&env, "late", false).await;
    for (i, (load, status)) in [
        ("L1", "matched"),
        ("L2", "matched"),
        ("L1", "accepted"),
        ("L2", "accepted"),
        ("L1", "in_transit"),
    ]
    .into_iter()
    .enumerate()
    {
        env.produce_event(Some(&format!("e{i}")), load, status)
            .await;
    }
    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE broker_id = 'steady' AND state = 'delivered'",
            5,
            Duration::from_secs(30)
        )
        .await,
        "the enabled broker got every event"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'late'")
            .await,
        0,
        "claims skip a disabled broker"
    );

    let refused = run_cli(&env, &["backfill", "--broker", "late", "--since", &since]);
    assert!(!refused.status.success(), "a disabled broker is refused");
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("re-enable it first"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    set_enabled(&env, "late", true).await;

    let dry = json_output(&run_cli(
        &env,
        &[
            "backfill",
            "--broker",
            "late",
            "--since",
            &since,
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["deliveries_created"], 5, "{dry}");
    assert_eq!(dry["events_scanned"], 5, "{dry}");
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'late'")
            .await,
        0,
        "--dry-run creates nothing"
    );

    let one_load = json_output(&run_cli(
        &env,
        &[
            "backfill", "--broker", "late", "--since", &since, "--load", "L2", "--json",
        ],
    ));
    assert_eq!(one_load["deliveries_created"], 2, "{one_load}");
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'late' AND load_id <> 'L2'")
            .await,
        0,
        "--load creates only that load's deliveries"
    );

    let rest = json_output(&run_cli(
        &env,
        &["backfill", "--broker", "late", "--since", &since, "--json"],
    ));
    assert_eq!(rest["deliveries_created"], 3, "{rest}");
    let again = json_output(&run_cli(
        &env,
        &["backfill", "--broker", "late", "--since", &since, "--json"],
    ));
    assert_eq!(
        again["deliveries_created"], 0,
        "a second run creates nothing"
    );

    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE broker_id = 'late' AND state = 'delivered'",
            5,
            Duration::from_secs(30)
        )
        .await,
        "the ledger sweep sends backfilled deliveries within seconds"
    );
    // Time for anything that would be sent twice to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let requests = received(&receiver.server).await;
    let ids: Vec<&str> = requests.iter().map(|r| header(r, "webhook-id")).collect();
    assert_eq!(ids.len(), 5, "each missed event arrives once: {ids:?}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 5, "{ids:?}");
    for load in ["L1", "L2"] {
        let arrived: Vec<String> = requests
            .iter()
            .filter(|r| String::from_utf8_lossy(&r.body).contains(&format!("\"{load}\"")))
            .map(|r| header(r, "webhook-id").to_owned())
            .collect();
        assert_eq!(
            arrived,
            expected_webhook_ids(&env, load).await,
            "{load}: the webhook-ids a claim would have given, in offset order"
        );
    }
    for request in &requests {
        assert_signed(request);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_backfill_route_needs_the_token_and_backfills_a_late_subscription() {
    let env = TestEnv::new(1).await;
    let since = Utc::now() - chrono::Duration::minutes(1);
    let receiver = ok_receiver().await;
    env.add_broker("b1", &receiver.uri()).await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    env.produce_event(Some("e2"), "L1", "accepted").await;
    let mut settings = env.settings();
    settings.admin.token = TOKEN.into();
    let app = spawn_app(settings);
    assert!(
        env.count_reaches("SELECT count(*) FROM events", 2, Duration::from_secs(30))
            .await
    );
    // Subscribed after the events were consumed: the claims had no one to fan out to.
    env.subscribe("b1", "L1").await;
    let http = reqwest::Client::new();
    let body = serde_json::json!({"since": since});

    let anonymous = http
        .post(app.admin_url("/brokers/b1/backfill"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let backfill = |broker: &str| {
        http.post(app.admin_url(&format!("/brokers/{broker}/backfill")))
            .bearer_auth(TOKEN)
            .json(&body)
            .send()
            .map(Result::unwrap)
    };
    let unknown = backfill("nobody").await;
    assert_eq!(unknown.status(), 404);
    env.db
        .execute(
            "UPDATE brokers SET enabled = false WHERE broker_id = 'b1'",
            &[],
        )
        .await
        .unwrap();
    let disabled = backfill("b1").await;
    assert_eq!(disabled.status(), 409, "a disabled broker is refused");
    env.db
        .execute(
            "UPDATE brokers SET enabled = true WHERE broker_id = 'b1'",
            &[],
        )
        .await
        .unwrap();
    let backfilled = backfill("b1").await;
    assert_eq!(backfilled.status(), 200);
    let summary: serde_json::Value = backfilled.json().await.unwrap();
    assert_eq!(summary["deliveries_created"], 2, "{summary}");

    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&receiver).await.len() == 2
        })
        .await,
        "both events of the late subscription arrive"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_window_is_walked_in_bounded_batches_within_since_and_until() {
    let env = TestEnv::new(1).await;
    env.add_broker("b1", "https://b1.example/hooks").await;
    env.subscribe("b1", "L0").await;
    env.subscribe("b1", "L1").await;
    // 12,000 events consumed a second apart over the last few hours, a third of them of a load
    // b1 does not subscribe to: three batches of BACKFILL_SCAN_ROWS.
    env.db
        .batch_execute(
            "INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition,
                                 kafka_offset, payload, consumed_at)
             SELECT 'key-' || i, 'e' || i, 'L' || (i % 3), 'matched', 't', i % 2, i, '{}'::bytea,
                    now() - interval '5 hours' + i * interval '1 second'
             FROM generate_series(1, 12000) i",
        )
        .await
        .unwrap();
    let since = (Utc::now() - chrono::Duration::hours(6)).to_rfc3339();

    let dry = json_output(&run_cli(
        &env,
        &[
            "backfill",
            "--broker",
            "b1",
            "--since",
            &since,
            "--dry-run",
            "--json",
        ],
    ));
    assert_eq!(dry["events_scanned"], 12_000, "{dry}");
    assert_eq!(dry["deliveries_created"], 8_000, "{dry}");
    assert_eq!(dry["batches"], 3, "{dry}");

    // The first hour of events only: consumed_at in [since, until).
    let first: chrono::DateTime<Utc> = env
        .db
        .query_one("SELECT min(consumed_at) FROM events", &[])
        .await
        .unwrap()
        .get(0);
    let until = (first + chrono::Duration::hours(1)).to_rfc3339();
    let first_hour = json_output(&run_cli(
        &env,
        &[
            "backfill", "--broker", "b1", "--since", &since, "--until", &until, "--json",
        ],
    ));
    assert_eq!(first_hour["events_scanned"], 3_600, "{first_hour}");
    assert_eq!(first_hour["deliveries_created"], 2_400, "{first_hour}");

    let all = json_output(&run_cli(
        &env,
        &["backfill", "--broker", "b1", "--since", &since, "--json"],
    ));
    assert_eq!(all["deliveries_created"], 5_600, "the rest, once: {all}");
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'b1' AND state = 'pending'")
            .await,
        8_000
    );
    assert_eq!(
        env.count(
            "SELECT count(*) FROM deliveries d JOIN events e USING (idempotency_key)
             WHERE d.kafka_partition <> e.kafka_partition OR d.kafka_offset <> e.kafka_offset
                OR d.load_id <> e.load_id"
        )
        .await,
        0,
        "each delivery has its event's partition, offset and load"
    );
    let again = json_output(&run_cli(
        &env,
        &["backfill", "--broker", "b1", "--since", &since, "--json"],
    ));
    assert_eq!(again["deliveries_created"], 0, "{again}");
}
