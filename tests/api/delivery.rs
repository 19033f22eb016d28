use std::collections::{HashMap, HashSet};
use std::time::Duration;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_exactly_the_subscribed_brokers_once_each_signed() {
    let env = TestEnv::new(3).await;
    let receivers = [
        ok_receiver().await,
        ok_receiver().await,
        ok_receiver().await,
    ];
    for (i, receiver) in receivers.iter().enumerate() {
        env.add_broker(&format!("b{i}"), &receiver.uri()).await;
    }
    env.subscribe("b0", "L-one").await;
    for broker in ["b0", "b1", "b2"] {
        env.subscribe(broker, "L-three").await;
    }
    let mut sent = Vec::new();
    sent.push(env.produce_event(Some("e-none"), "L-none", "matched").await);
    sent.push(env.produce_event(Some("e-one"), "L-one", "matched").await);
    sent.push(
        env.produce_event(Some("e-three-1"), "L-three", "matched")
            .await,
    );
    sent.push(
        env.produce_event(Some("e-three-2"), "L-three", "accepted")
            .await,
    );

    let app = spawn_app(env.settings());
    let all_delivered = env
        .count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            7,
            Duration::from_secs(30),
        )
        .await;
    assert!(all_delivered, "7 deliveries (1 + 2 x 3) are delivered");
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.stop().await;

    let counts: Vec<usize> = futures_counts(&receivers).await;
    assert_eq!(
        counts,
        vec![3, 2, 2],
        "b0 gets L-one and both L-three events; b1, b2 get L-three"
    );
    for receiver in &receivers {
        let mut ids = HashSet::new();
        for request in received(receiver).await {
            assert_signed(&request);
            assert_eq!(header(&request, "content-type"), "application/json");
            assert!(header(&request, "user-agent").starts_with("webhook-delivery"));
            assert!(!header(&request, "webhook-sequence").is_empty());
            assert!(
                sent.contains(&request.body),
                "body is the event exactly as produced"
            );
            assert!(
                ids.insert(header(&request, "webhook-id").to_owned()),
                "one webhook-id per event"
            );
        }
    }
    assert_eq!(env.count("SELECT count(*) FROM deliveries").await, 7);
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history")
            .await,
        7
    );
}

async fn futures_counts(receivers: &[MockServer]) -> Vec<usize> {
    let mut counts = Vec::new();
    for receiver in receivers {
        counts.push(received(receiver).await.len());
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_of_an_event_send_one_webhook_per_broker() {
    let env = TestEnv::new(2).await;
    let receivers = [ok_receiver().await, ok_receiver().await];
    for (i, receiver) in receivers.iter().enumerate() {
        env.add_broker(&format!("b{i}"), &receiver.uri()).await;
        env.subscribe(&format!("b{i}"), "L1").await;
    }
    // The same eventId at two offsets (a producer retry), even with different bytes.
    env.produce_event(Some("e-1"), "L1", "matched").await;
    env.produce(
        Some("L1"),
        br#"{"eventId":"e-1","loadId":"L1","status":"matched","retry":true}"#,
    )
    .await;
    // A byte-identical event with no eventId, twice.
    let no_id = br#"{"loadId":"L1","status":"in_transit"}"#;
    env.produce(Some("L1"), no_id).await;
    env.produce(Some("L1"), no_id).await;

    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            4,
            Duration::from_secs(30)
        )
        .await
    );
    // Give a wrongly duplicated send every chance to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.stop().await;

    for receiver in &receivers {
        let requests = received(receiver).await;
        assert_eq!(requests.len(), 2, "one webhook per distinct event");
        let ids: HashSet<_> = requests
            .iter()
            .map(|r| header(r, "webhook-id").to_owned())
            .collect();
        assert_eq!(ids.len(), 2);
    }
    assert_eq!(env.count("SELECT count(*) FROM events").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_load_ids_are_just_strings() {
    let env = TestEnv::new(1).await;
    let hostile = "1 OR 1=1; DROP TABLE brokers; --";
    let target = ok_receiver().await;
    let bystander = ok_receiver().await;
    env.add_broker("target", &target.uri()).await;
    env.add_broker("bystander", &bystander.uri()).await;
    env.subscribe("target", hostile).await;
    env.subscribe("bystander", "1").await;
    env.produce_event(
        Some("e-'; DELETE FROM deliveries; --"),
        hostile,
        "matched'); --",
    )
    .await;

    let app = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&target).await.len() == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.stop().await;

    assert!(received(&bystander).await.is_empty());
    let request = &received(&target).await[0];
    assert_signed(request);
    let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
    assert_eq!(body["loadId"], hostile);
    assert_eq!(
        env.count("SELECT count(*) FROM brokers").await,
        2,
        "tables intact"
    );
    assert_eq!(env.count("SELECT count(*) FROM deliveries").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_broker_does_not_delay_another_brokers_deliveries() {
    let env = TestEnv::new(2).await;
    let slow = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(10)))
        .mount(&slow)
        .await;
    let fast = ok_receiver().await;
    env.add_broker("slow", &slow.uri()).await;
    env.add_broker("fast", &fast.uri()).await;
    for i in 0..10 {
        let load = format!("L{i}");
        env.subscribe("slow", &load).await;
        env.subscribe("fast", &load).await;
        env.produce_event(Some(&format!("e{i}")), &load, "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.delivery.request_timeout_ms = 15_000;
    settings.postgres.lease_ms = 40_000;

    let app = spawn_app(settings);
    let started = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&fast).await.len() == 10
        })
        .await,
        "the fast broker gets every event"
    );
    let fast_done = started.elapsed();
    let slow_delivered = env
        .count("SELECT count(*) FROM deliveries WHERE broker_id = 'slow' AND state = 'delivered'")
        .await;
    assert_eq!(
        slow_delivered, 0,
        "the fast broker finished ({fast_done:?}) before the slow broker answered anything"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            20,
            Duration::from_secs(40)
        )
        .await,
        "the slow broker gets its events too"
    );
    app.stop().await;
    let per_broker: HashMap<&str, usize> = [
        ("fast", received(&fast).await.len()),
        ("slow", received(&slow).await.len()),
    ]
    .into();
    assert_eq!(per_broker["fast"], 10);
    assert_eq!(per_broker["slow"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_row_with_an_invalid_url_or_secret_is_dead_lettered_not_fatal() {
    let env = TestEnv::new(1).await;
    let healthy = ok_receiver().await;
    env.add_broker("healthy", &healthy.uri()).await;
    env.add_broker("bad-url", "not a url").await;
    env.db
        .execute(
            "INSERT INTO brokers (broker_id, webhook_url, signing_secret) VALUES ('bad-secret', $1, 'hunter2')",
            &[&healthy.uri()],
        )
        .await
        .unwrap();
    for broker in ["healthy", "bad-url", "bad-secret"] {
        env.subscribe(broker, "L1").await;
    }
    env.produce_event(Some("e1"), "L1", "matched").await;

    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state <> 'pending'",
            3,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
    assert_eq!(
        received(&healthy).await.len(),
        1,
        "only the healthy broker is called"
    );
    let rows = env
        .db
        .query(
            "SELECT broker_id, dead_reason FROM deliveries WHERE state = 'dead' ORDER BY broker_id",
            &[],
        )
        .await
        .unwrap();
    let dead: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(dead.len(), 2);
    assert!(dead[0].1.contains("signing_secret is invalid"), "{dead:?}");
    assert!(
        dead[1].1.contains("webhook_url is not a valid URL"),
        "{dead:?}"
    );
    assert!(
        !dead[0].1.contains("hunter2"),
        "secrets never appear in reasons"
    );
}
