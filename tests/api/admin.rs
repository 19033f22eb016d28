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
        "webhook_delivery_in_flight_limit{broker_id=\"healthy\"} ",
        "webhook_delivery_mailbox_depth{broker_id=",
        "webhook_delivery_ledger_pages_total ",
        "webhook_delivery_ledger_page_rows_total ",
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
    // Both outcomes (delivered, dead) went through the group commit and were timed (just after
    // their commit, which the count above may see first).
    assert!(
        eventually(Duration::from_secs(5), || async {
            app.metric_value("webhook_delivery_outcome_save_wait_seconds_count", &[])
                .await
                == Some(2.0)
                && app
                    .metric_value("webhook_delivery_outcome_write_duration_seconds_count", &[])
                    .await
                    .is_some_and(|statements| statements >= 1.0)
        })
        .await,
        "outcome saves are timed"
    );

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

    let brokers: Vec<serde_json::Value> = app
        .admin_get_with_token("/brokers", TOKEN)
        .await
        .json()
        .await
        .unwrap();
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
    assert!(
        failing_row["in_flight_limit"]
            .as_u64()
            .is_some_and(|n| n >= 1),
        "the broker's live concurrency limit: {failing_row}"
    );

    let letters: Vec<serde_json::Value> = app
        .admin_get_with_token("/dead-letters?broker=failing", TOKEN)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_read_routes_need_it_and_the_probes_do_not() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings();
    settings.admin.token = TOKEN.into();
    let app = spawn_app(settings);
    for open in ["/healthz", "/readyz", "/metrics"] {
        let status = app.admin_get(open).await.status();
        assert_ne!(status, 401, "{open} stays open");
    }
    for guarded in ["/brokers", "/dead-letters", "/dead-letters?limit=5"] {
        let response = app.admin_get(guarded).await;
        assert_eq!(response.status(), 401, "{guarded} without a token");
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            app.admin_get_with_token(guarded, "wrong-token-0123456789")
                .await
                .status(),
            401,
            "{guarded} with a wrong token"
        );
        assert_eq!(
            app.admin_get_with_token(guarded, TOKEN).await.status(),
            200,
            "{guarded} with the token"
        );
    }
    assert_eq!(
        app.admin_get("/dead-letters?limit=nonsense").await.status(),
        401,
        "the token is checked before anything is said about the query"
    );
    app.stop().await;
}

async fn error_of(response: reqwest::Response) -> (u16, String) {
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.expect("a JSON body");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_query_parameters_and_bodies_get_a_clear_400_and_database_errors_are_not_echoed() {
    let env = TestEnv::new(1).await;
    let mut settings = env.settings();
    settings.admin.token = TOKEN.into();
    let app = spawn_app(settings);
    let long_broker = "b".repeat(201);
    let cases = [
        ("limit=-1", "`limit` must be an integer from 1 to 1000"),
        ("limit=0", "`limit` must be an integer from 1 to 1000"),
        ("limit=1001", "`limit` must be an integer from 1 to 1000"),
        ("limit=abc", "`limit` must be an integer from 1 to 1000"),
        ("limit=99999999999999999999", "`limit` must be an integer"),
        ("since=yesterday", "`since` must be an RFC 3339 time"),
        (
            "since=2026-13-01T00:00:00Z",
            "`since` must be an RFC 3339 time",
        ),
        (
            "broker=%00",
            "`broker` is not a broker id: it contains control characters",
        ),
        ("broker=", "`broker` is not a broker id: it is empty"),
        (
            &format!("broker={long_broker}")[..],
            "longer than 200 bytes",
        ),
        ("bogus=1", "invalid query string"),
        ("limit=1&limit=2", "invalid query string"),
    ];
    for (query, expected) in cases {
        let (status, error) = error_of(
            app.admin_get_with_token(&format!("/dead-letters?{query}"), TOKEN)
                .await,
        )
        .await;
        assert_eq!(status, 400, "{query}: {error}");
        assert!(error.contains(expected), "{query}: {error}");
    }
    let fine = app
        .admin_get_with_token(
            "/dead-letters?limit=1&since=2026-01-01T00:00:00Z&broker=acme",
            TOKEN,
        )
        .await;
    assert_eq!(fine.status(), 200);
    assert_eq!(
        fine.json::<Vec<serde_json::Value>>().await.unwrap().len(),
        0
    );

    let http = reqwest::Client::new();
    let replay = |body: &'static str| {
        http.post(app.admin_url("/dead-letters/replay"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    for (body, expected) in [
        ("not json", "invalid JSON body"),
        (r#"{"id": "seven"}"#, "invalid JSON body"),
        (r#"{"bogus": 1}"#, "invalid JSON body"),
        (r#"{"broker": "a\u0000b"}"#, "contains control characters"),
        (r#"{"broker": "acme", "since": "soon"}"#, "`since` must be"),
        (r#"{"id": 1, "broker": "acme"}"#, "exactly one of"),
        (
            r#"{"id": 1, "since": "2026-01-01T00:00:00Z"}"#,
            "exactly one of",
        ),
        ("{}", "exactly one of"),
    ] {
        let (status, error) = error_of(replay(body).await.unwrap()).await;
        assert_eq!(status, 400, "{body}: {error}");
        assert!(error.contains(expected), "{body}: {error}");
    }

    // A real database error: the caller gets a generic message, the log gets the detail.
    env.db
        .batch_execute("ALTER TABLE deliveries RENAME TO deliveries_hidden")
        .await
        .unwrap();
    let (status, error) = error_of(app.admin_get_with_token("/dead-letters", TOKEN).await).await;
    env.db
        .batch_execute("ALTER TABLE deliveries_hidden RENAME TO deliveries")
        .await
        .unwrap();
    assert_eq!(status, 500, "{error}");
    assert!(error.starts_with("internal error"), "{error}");
    for leaked in [
        "deliveries",
        "relation",
        "SQLSTATE",
        "database query failed",
    ] {
        assert!(!error.contains(leaked), "{leaked} echoed: {error}");
    }
    app.stop().await;
    assert!(
        !logged("admin API request failed", "deliveries").is_empty(),
        "the detail is logged"
    );
}
