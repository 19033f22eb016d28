use std::collections::HashMap;
use std::time::Duration;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_broker_neither_delays_a_healthy_one_nor_holds_offsets_back() {
    let env = TestEnv::new(2).await;
    let hanging = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(60)))
        .mount(&hanging)
        .await;
    let healthy = ok_receiver().await;
    env.add_broker("hanging", &hanging.uri()).await;
    env.add_broker("healthy", &healthy.uri()).await;
    let events = 40;
    for i in 0..events {
        let load = format!("L{i}");
        env.subscribe("hanging", &load).await;
        env.subscribe("healthy", &load).await;
        env.produce_event(Some(&format!("e{i}")), &load, "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.delivery.request_timeout_ms = 1_000;
    // Far fewer slots than deliveries: most of them must wait in the ledger and be loaded later.
    settings.delivery.mailbox_capacity = 8;
    settings.delivery.max_in_flight_per_broker = 2;
    settings.retry.base_delay_ms = 60_000;
    settings.retry.max_delay_ms = 60_000;
    settings.circuit_breaker.failure_threshold = 4;
    settings.circuit_breaker.open_ms = 30_000;

    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&healthy).await.len() == events
        })
        .await,
        "the healthy broker receives all of its events"
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.committed_offsets(2).iter().sum::<i64>() == events as i64
        })
        .await,
        "committed offsets reach the end while the other broker hangs"
    );
    let hanging_delivered = env
        .count(
            "SELECT count(*) FROM deliveries WHERE broker_id = 'hanging' AND state = 'delivered'",
        )
        .await;
    assert_eq!(hanging_delivered, 0);
    app.stop().await;

    let mut per_id: HashMap<String, usize> = HashMap::new();
    for request in received(&healthy).await {
        *per_id
            .entry(header(&request, "webhook-id").to_owned())
            .or_default() += 1;
    }
    assert_eq!(per_id.len(), events);
    assert!(per_id.values().all(|&n| n == 1));
    assert!(
        received(&hanging).await.len() <= 6,
        "the hanging broker's breaker opened after 4 timeouts (plus at most 2 in flight)"
    );
}
