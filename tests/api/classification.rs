use std::time::Duration;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// One broker per row of the classification table (README "What each response means").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_classification_row_does_what_the_table_says() {
    let env = TestEnv::new(1).await;
    // (status, requests expected with max_attempts = 2, final state)
    let rows: [(u16, usize, &str); 12] = [
        (200, 1, "delivered"),
        (204, 1, "delivered"),
        (410, 1, "dead"),
        (400, 1, "dead"),
        (401, 1, "dead"),
        (404, 1, "dead"),
        (422, 1, "dead"),
        (301, 1, "dead"),
        (408, 2, "dead"),
        (429, 2, "dead"),
        (500, 2, "dead"),
        (503, 2, "dead"),
    ];
    let redirect_target = ok_receiver().await;
    let mut receivers = Vec::new();
    for (status, _, _) in rows {
        let server = MockServer::start().await;
        let mut response = ResponseTemplate::new(status);
        if status == 301 {
            response = response.insert_header("location", redirect_target.uri().as_str());
        }
        Mock::given(method("POST"))
            .respond_with(response)
            .mount(&server)
            .await;
        let broker = format!("status-{status}");
        env.add_broker(&broker, &server.uri()).await;
        env.subscribe(&broker, "L1").await;
        receivers.push(server);
    }
    env.produce_event(Some("e1"), "L1", "matched").await;

    let mut settings = env.settings();
    settings.retry.max_attempts = 2;
    settings.retry.base_delay_ms = 100;
    settings.retry.max_delay_ms = 100;
    let app = spawn_app(settings);
    // One statement, one snapshot: two separate counts could see "none pending" before the
    // claim and "all rows there" after it, and stop the app before anything was sent.
    assert!(
        eventually(Duration::from_secs(30), || async {
            env.count(
                "SELECT CASE WHEN count(*) FILTER (WHERE state = 'pending') = 0 THEN count(*) \
                 ELSE -1 END FROM deliveries",
            )
            .await
                == rows.len() as i64
        })
        .await
    );
    app.stop().await;

    for ((status, requests, state), server) in rows.iter().zip(&receivers) {
        let broker = format!("status-{status}");
        let row = env
            .db
            .query_one(
                "SELECT state, attempts, last_status_code, dead_reason, last_error FROM deliveries WHERE broker_id = $1",
                &[&broker],
            )
            .await
            .unwrap();
        let ledger: (String, i32, Option<i32>, Option<String>, Option<String>) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        assert_eq!(
            received(server).await.len(),
            *requests,
            "HTTP {status}: requests (ledger: {ledger:?})"
        );
        assert_eq!(ledger.0, *state, "HTTP {status}: state");
        assert_eq!(ledger.1, *requests as i32, "HTTP {status}: attempts");
        assert_eq!(ledger.2, Some(i32::from(*status)));
    }
    assert!(
        received(&redirect_target).await.is_empty(),
        "redirects are not followed"
    );
    let gone = env
        .db
        .query_one(
            "SELECT enabled, disabled_reason FROM brokers WHERE broker_id = 'status-410'",
            &[],
        )
        .await
        .unwrap();
    assert!(!gone.get::<_, bool>(0), "410 disables the broker");
    assert!(gone.get::<_, String>(1).contains("410"));
    assert_eq!(
        env.count("SELECT count(*) FROM brokers WHERE enabled")
            .await,
        rows.len() as i64 - 1,
        "no other broker is disabled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_read_only_up_to_the_cap() {
    let env = TestEnv::new(1).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(400).set_body_string("x".repeat(200_000)))
        .mount(&server)
        .await;
    env.add_broker("chatty", &server.uri()).await;
    env.subscribe("chatty", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    let mut settings = env.settings();
    settings.delivery.max_response_bytes = 100;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
    let last_error: String = env
        .db
        .query_one("SELECT last_error FROM deliveries", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(last_error, format!("HTTP 400: {}", "x".repeat(100)));
}
