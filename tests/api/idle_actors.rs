//! Idle DeliveryActors retire (issue 12 item 5: 10,000 brokers) and start again on demand
//! without losing, duplicating or reordering anything; an actor with something to remember (a
//! retry pending, an open breaker) is kept.

use std::time::Duration;

use crate::helpers::*;

fn retired(broker_id: &str) -> usize {
    logged("delivery actor retired (idle)", broker_id).len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_actor_retires_and_a_new_one_delivers_once_in_order() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    let broker = unique("idle");
    env.add_broker(&broker, &receiver.uri()).await;
    env.subscribe(&broker, "L1").await;
    let mut settings = env.settings();
    settings.delivery.idle_actor_ms = 300;
    let app = spawn_app(settings);
    env.produce_event(Some("e1"), "L1", "matched").await;
    assert!(
        eventually(Duration::from_secs(20), || async { retired(&broker) >= 1 }).await,
        "the actor retires once it has delivered and been idle for 300 ms"
    );
    assert_eq!(received(&receiver).await.len(), 1);
    let series = format!("broker_id=\"{broker}\"");
    let metrics = app.admin_get("/metrics").await.text().await.unwrap();
    assert!(
        !metrics
            .lines()
            .any(|l| l.contains("mailbox_depth") && l.contains(&series)),
        "its per-broker series are gone"
    );
    for i in 2..=5 {
        env.produce_event(Some(&format!("e{i}")), "L1", "matched")
            .await;
    }
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            5,
            Duration::from_secs(20)
        )
        .await,
        "a new actor delivers what came after"
    );
    let event_ids: Vec<String> = received(&receiver)
        .await
        .iter()
        .map(|request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            body["eventId"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        event_ids,
        ["e1", "e2", "e3", "e4", "e5"],
        "each once, in order"
    );
    assert_eq!(env.count("SELECT count(*) FROM delivery_attempts").await, 5);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actor_with_a_retry_pending_or_its_breaker_open_is_kept() {
    let env = TestEnv::new(1).await;
    let receiver = ScriptedReceiver::start(&[503, 200]).await;
    let broker = unique("keep");
    env.add_broker(&broker, &receiver.server.uri()).await;
    env.subscribe(&broker, "L1").await;
    let mut settings = env.settings();
    settings.delivery.idle_actor_ms = 300;
    settings.circuit_breaker.failure_threshold = 1;
    settings.circuit_breaker.open_ms = 3_000;
    settings.retry.base_delay_ms = 3_000;
    settings.retry.max_delay_ms = 3_000;
    let app = spawn_app(settings);
    env.produce_event(Some("e1"), "L1", "matched").await;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM delivery_attempts WHERE status_code = 503",
            1,
            Duration::from_secs(20)
        )
        .await,
        "the first attempt fails: a retry is pending and the breaker is open"
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        retired(&broker),
        0,
        "kept while it has a retry and a breaker to remember"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            1,
            Duration::from_secs(20)
        )
        .await,
        "the retry is delivered"
    );
    assert!(
        eventually(Duration::from_secs(20), || async { retired(&broker) >= 1 }).await,
        "then, with the breaker closed again, it retires"
    );
    assert_eq!(receiver.requests().len(), 2, "no request made twice");
    app.stop().await;
}
