use std::collections::HashMap;
use std::time::Duration;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::instances::Instance;

async fn slow_ok_receiver(delay: Duration) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(delay))
        .mount(&server)
        .await;
    server
}

async fn ids_received(server: &MockServer) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for request in received(server).await {
        *ids.entry(header(&request, "webhook-id").to_owned())
            .or_default() += 1;
    }
    ids
}

async fn seed(env: &TestEnv, receiver: &MockServer, events: usize) {
    env.add_broker("b1", &receiver.uri()).await;
    for i in 0..events {
        let load = format!("L{}", i % 5);
        if i < 5 {
            env.subscribe("b1", &load).await;
        }
        env.produce_event(Some(&format!("e{i}")), &load, &format!("status-{i}"))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_delivers_everything_exactly_once() {
    let env = TestEnv::new(2).await;
    let receiver = slow_ok_receiver(Duration::from_millis(300)).await;
    seed(&env, &receiver, 30).await;

    let first = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&receiver).await.len() >= 5
        })
        .await
    );
    first.stop().await;
    let delivered_by_first = env
        .count("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
        .await;
    assert!(delivered_by_first < 30, "stopped mid-stream");

    let second = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            30,
            Duration::from_secs(60)
        )
        .await,
        "every event delivered after the restart"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    second.stop().await;
    let ids = ids_received(&receiver).await;
    assert_eq!(ids.len(), 30);
    assert!(ids.values().all(|&n| n == 1), "nothing sent twice: {ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_loses_nothing_and_resends_nothing_already_delivered() {
    let env = TestEnv::new(2).await;
    let receiver = slow_ok_receiver(Duration::from_millis(200)).await;
    seed(&env, &receiver, 30).await;

    let first = Instance::start(&env);
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&receiver).await.len() >= 5
        })
        .await
    );
    first.sigkill();
    // What the ledger says was delivered when the process died must never be sent again.
    let delivered_before: Vec<String> = env
        .db
        .query(
            "SELECT d.idempotency_key FROM deliveries d WHERE d.state = 'delivered'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(delivered_before.len() < 30, "killed mid-stream");

    let second = Instance::start(&env);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            30,
            Duration::from_secs(90)
        )
        .await,
        "every event delivered after the kill"
    );
    assert!(second.sigterm().success(), "SIGTERM exits 0");

    let ids = ids_received(&receiver).await;
    assert_eq!(ids.len(), 30, "no event lost");
    for key in delivered_before {
        let id = webhook_delivery::core::signing::webhook_id(
            &webhook_delivery::core::event::IdempotencyKey::from_stored(key),
        );
        assert_eq!(
            ids[&id], 1,
            "{id} was delivered before the kill and must not be re-sent"
        );
    }
}
