use std::time::Duration;

use crate::helpers::*;

const TOKEN: &str = "test-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_reports_health_metrics_brokers_and_replays_with_a_token() {
    let env = TestEnv::new(2).await;
    let healthy = ok_receiver().await;
    let failing = ScriptedReceiver::start(&[400, 200]).await;
    env.add_broker("healthy", &healthy.uri()).await;
    env.add_broker("failing", &failing.server.uri()).await;
    env.subscribe("healthy", "L1").await;
    env.subscribe("failing", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    env.produce(Some("L1"), b"not json").await;
    let mut settings = env.settings();
    settings.admin.token = TOKEN.into();
    let app = spawn_app(settings);
    let http = reqwest::Client::new();

    let health = app.admin_get("/healthz").await;
    assert_eq!(health.status(), 200);
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.admin_get("/readyz").await.status() == 200
        })
        .await,
        "ready once postgres answers and the group is joined"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state <> 'pending'",
            2,
            Duration::from_secs(20)
        )
        .await
    );

    let metrics = app.admin_get("/metrics").await.text().await.unwrap();
    for expected in [
        "webhook_delivery_messages_consumed_total{partition=",
        "webhook_delivery_messages_rejected_total{partition=",
        "webhook_delivery_deliveries_total{outcome=\"delivered\"} 1",
        "webhook_delivery_deliveries_total{outcome=\"dead\"} 1",
        "webhook_delivery_attempts_total{result=\"4xx\"} 1",
        "webhook_delivery_attempt_duration_seconds_bucket",
        "webhook_delivery_circuit_state{broker_id=\"healthy\"} 0",
        "webhook_delivery_in_flight_requests{broker_id=",
        "webhook_delivery_mailbox_depth{broker_id=",
    ] {
        assert!(
            metrics.contains(expected),
            "{expected} missing from:\n{metrics}"
        );
    }
    let rejected: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("webhook_delivery_messages_rejected_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(rejected, 1);

    assert!(
        eventually(Duration::from_secs(15), || async {
            let text = app.admin_get("/metrics").await.text().await.unwrap();
            text.contains("webhook_delivery_consumer_lag_messages{partition=")
                && text.contains("webhook_delivery_pending_deliveries 0")
                && text.contains("webhook_delivery_dead_deliveries 1")
        })
        .await,
        "lag (per held partition) and ledger gauges are published"
    );

    let brokers: Vec<serde_json::Value> = app.admin_get("/brokers").await.json().await.unwrap();
    let failing_row = brokers
        .iter()
        .find(|b| b["broker_id"] == "failing")
        .unwrap();
    assert_eq!(failing_row["dead"], 1);
    assert_eq!(failing_row["circuit_state"], "closed");
    assert!(failing_row["last_error"]
        .as_str()
        .unwrap()
        .starts_with("HTTP 400"));
    assert_eq!(failing_row["enabled"], true);

    let letters: Vec<serde_json::Value> = app
        .admin_get("/dead-letters?broker=failing")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    let id = letters[0]["delivery_id"].as_i64().unwrap();

    let replay = |token: Option<&'static str>| {
        let mut request = http
            .post(app.admin_url("/dead-letters/replay"))
            .json(&serde_json::json!({ "id": id }));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    assert_eq!(replay(None).await.unwrap().status(), 401);
    assert_eq!(
        replay(Some("wrong-token-0123456789"))
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(replay(Some(TOKEN)).await.unwrap().status(), 200);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            2,
            Duration::from_secs(15)
        )
        .await,
        "the replayed delivery goes out"
    );
    assert_eq!(
        replay(Some(TOKEN)).await.unwrap().status(),
        409,
        "delivered: refused"
    );
    app.stop().await;
    assert!(!log_lines_containing("dead letters replayed through the admin API").is_empty());
    assert!(
        log_lines_containing(TOKEN).is_empty(),
        "the token never appears in logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_mutating_routes_are_off() {
    let env = TestEnv::new(1).await;
    let app = spawn_app(env.settings());
    let response = reqwest::Client::new()
        .post(app.admin_url("/dead-letters/replay"))
        .bearer_auth("anything-at-all-0123456789")
        .json(&serde_json::json!({"id": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_why_it_is_not_ready() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings();
    // Nothing listens there: the consumer can never join its group.
    settings.kafka.brokers = "127.0.0.1:1".into();
    let app = spawn_app(settings);
    let response = app.admin_get("/readyz").await;
    assert_eq!(response.status(), 503);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["reason"]
            .as_str()
            .unwrap()
            .contains("has not joined its group"),
        "{body}"
    );
    app.stop().await;
}
