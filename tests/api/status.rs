//! `webhook-delivery status`, run as the real binary against real Kafka and Postgres.

use std::time::Duration;

use std::process::Command;

use serde_json::Value;
use wiremock::ResponseTemplate;

use crate::helpers::*;

fn status_json(env: &TestEnv) -> Value {
    let output = run_cli(env, &["status", "--json"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("status --json prints one JSON object")
}

fn broker<'a>(status: &'a Value, broker_id: &str) -> &'a Value {
    status["brokers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["broker_id"] == broker_id)
        .unwrap_or_else(|| panic!("broker {broker_id} in {status:#}"))
}

fn total_lag(status: &Value) -> i64 {
    status["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["lag"].as_i64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_lag_per_partition_and_backlog_per_broker() {
    let env = TestEnv::new(2).await;
    let ok = ok_receiver().await;
    let refusing = receiver(ResponseTemplate::new(400)).await; // permanent: dead at once
    let failing = receiver(ResponseTemplate::new(503)).await; // retried: stays pending
    env.add_broker("ok", &ok.uri()).await;
    env.add_broker("refusing", &refusing.uri()).await;
    env.add_broker("failing", &failing.uri()).await;
    let loads = ["L1", "L2", "L3", "L4", "L5", "L6"];
    for load in loads {
        for broker in ["ok", "refusing", "failing"] {
            env.subscribe(broker, load).await;
        }
    }
    for (i, load) in loads.iter().enumerate() {
        env.produce_event(Some(&format!("e{i}")), load, "matched")
            .await;
    }

    let mut settings = env.settings();
    settings.retry.max_attempts = 100;
    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.count("SELECT count(*) FROM deliveries WHERE broker_id = 'ok' AND state = 'delivered'")
                .await
                == 6
                && env
                    .count("SELECT count(*) FROM deliveries WHERE broker_id = 'refusing' AND state = 'dead'")
                    .await
                    == 6
                && env
                    .count("SELECT count(*) FROM deliveries WHERE broker_id = 'failing' AND last_error IS NOT NULL")
                    .await
                    > 0
        })
        .await
    );
    app.stop().await;
    // What another instance's breaker would have left behind.
    env.db
        .execute(
            "INSERT INTO broker_circuits (broker_id, state, since, consecutive_failures, open_until, reason, instance_id)
             VALUES ('refusing', 'open', now(), 5, now() + interval '1 minute', 'test', 'other-instance')
             ON CONFLICT (broker_id) DO UPDATE SET state = 'open', open_until = EXCLUDED.open_until",
            &[],
        )
        .await
        .unwrap();

    let status = status_json(&env);
    let partitions = status["partitions"].as_array().unwrap();
    assert_eq!(partitions.len(), 2, "{status:#}");
    for p in partitions {
        assert!(
            p["high_watermark"].as_i64().unwrap() > 0,
            "both partitions have events: {status:#}"
        );
        assert_eq!(p["committed"], p["high_watermark"], "{status:#}");
        assert_eq!(p["lag"], 0, "{status:#}");
    }
    assert_eq!(
        partitions
            .iter()
            .map(|p| p["high_watermark"].as_i64().unwrap())
            .sum::<i64>(),
        6
    );
    let ok_status = broker(&status, "ok");
    assert_eq!(ok_status["enabled"], true);
    assert_eq!(ok_status["circuit_state"], "closed", "no row means closed");
    assert_eq!(
        (ok_status["pending"].as_i64(), ok_status["dead"].as_i64()),
        (Some(0), Some(0))
    );
    assert!(ok_status["oldest_pending_age_ms"].is_null());
    let refusing_status = broker(&status, "refusing");
    assert_eq!(refusing_status["dead"], 6);
    assert_eq!(refusing_status["pending"], 0);
    assert_eq!(refusing_status["circuit_state"], "open");
    assert!(refusing_status["last_error"]
        .as_str()
        .unwrap()
        .contains("400"));
    let failing_status = broker(&status, "failing");
    assert_eq!(failing_status["pending"], 6);
    assert_eq!(failing_status["dead"], 0);
    // Its deliveries wait for retries: due in the future, so 0 overdue (but known).
    assert!(failing_status["oldest_pending_age_ms"].as_i64().unwrap() >= 0);
    assert!(failing_status["last_error"]
        .as_str()
        .unwrap()
        .contains("503"));

    let human = run_cli(&env, &["status"]);
    assert!(human.status.success());
    let text = String::from_utf8_lossy(&human.stdout);
    for needle in [
        "lag",
        "ok",
        "refusing",
        "failing",
        "open until",
        env.topic.as_str(),
    ] {
        assert!(text.contains(needle), "`{needle}` in:\n{text}");
    }
    assert!(
        text.contains("total lag 0, total pending 6, total dead 6"),
        "{text}"
    );

    // Nobody is consuming now: new events are lag.
    for (i, load) in loads.iter().take(3).enumerate() {
        env.produce_event(Some(&format!("late{i}")), load, "accepted")
            .await;
    }
    let status = status_json(&env);
    assert_eq!(total_lag(&status), 3, "{status:#}");
    let human = String::from_utf8_lossy(&run_cli(&env, &["status"]).stdout).into_owned();
    assert!(human.contains("total lag 3,"), "{human}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_never_committed_lags_by_everything_in_the_topic() {
    let env = TestEnv::new(2).await;
    for i in 0..4 {
        env.produce_event(Some(&format!("e{i}")), &format!("L{i}"), "matched")
            .await;
    }
    let status = status_json(&env);
    for p in status["partitions"].as_array().unwrap() {
        assert!(p["committed"].is_null(), "{status:#}");
    }
    assert_eq!(total_lag(&status), 4, "{status:#}");
    assert_eq!(status["brokers"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_topic_that_does_not_exist_fails_naming_it() {
    let env = TestEnv::new(1).await;
    let output = Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .args(["status"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.settings_env())
        .env("APP__KAFKA__TOPIC", "no-such-topic-for-status")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-topic-for-status"), "{stderr}");
    // The ledger half is still shown.
    assert!(String::from_utf8_lossy(&output.stdout).contains("broker_id"));
}
