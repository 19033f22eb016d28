use std::time::Duration;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_bounded_and_only_hit_the_failing_broker() {
    let env = TestEnv::new(1).await;
    let failing = receiver(ResponseTemplate::new(503)).await;
    let healthy = ok_receiver().await;
    env.add_broker("failing", &failing.uri()).await;
    env.add_broker("healthy", &healthy.uri()).await;
    env.subscribe("failing", "L1").await;
    env.subscribe("healthy", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;

    let mut settings = env.settings();
    settings.retry.max_attempts = 3;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.stop().await;

    assert_eq!(
        received(&failing).await.len(),
        3,
        "exactly max_attempts attempts"
    );
    assert_eq!(
        received(&healthy).await.len(),
        1,
        "the healthy broker is never re-sent"
    );
    let ids: std::collections::HashSet<_> = received(&failing)
        .await
        .iter()
        .map(|r| header(r, "webhook-id").to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "every retry carries the same webhook-id");
    let reason: String = env
        .db
        .query_one(
            "SELECT dead_reason FROM deliveries WHERE state = 'dead'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempts WHERE broker_id = 'failing'")
            .await,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let env = TestEnv::new(1).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("retry-after", "2"))
        .up_to_n_times(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    env.add_broker("b1", &server.uri()).await;
    env.subscribe("b1", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;

    let mut settings = env.settings();
    // Without Retry-After the retry would come after ~200 ms.
    settings.retry.base_delay_ms = 200;
    settings.retry.max_delay_ms = 5_000;
    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&server).await.len() == 2
        })
        .await
    );
    app.stop().await;
    let requests = received(&server).await;
    let first: i64 = header(&requests[0], "webhook-timestamp").parse().unwrap();
    let second: i64 = header(&requests[1], "webhook-timestamp").parse().unwrap();
    assert!(
        second - first >= 2,
        "the retry waited the 2 s the broker asked for"
    );
}
