//! Needs the `fault-injection` feature (scripts/test.sh enables it).
#![cfg(feature = "fault-injection")]

use std::time::Duration;

use webhook_delivery::fault_injection::panic_once_in_delivery;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_delivery_actor_is_restarted_and_its_deliveries_complete() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    let broker_id = unique("crashy");
    env.add_broker(&broker_id, &receiver.uri()).await;
    for i in 0..5 {
        let load = format!("L{i}");
        env.subscribe(&broker_id, &load).await;
        env.produce_event(Some(&format!("e{i}")), &load, "matched")
            .await;
    }
    panic_once_in_delivery(&broker_id);

    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            5,
            Duration::from_secs(30)
        )
        .await,
        "every delivery completes after the restart"
    );
    app.stop().await;

    let panicked = logged(
        "delivery actor panicked; restarting it (its deliveries stay pending in the ledger)",
        &broker_id,
    );
    assert_eq!(panicked.len(), 1);
    assert!(panicked[0]["error.message"]
        .as_str()
        .unwrap()
        .contains("injected fault"));
    assert_eq!(
        logged(
            "delivery actor restarted; reloading its pending deliveries from the ledger",
            &broker_id
        )
        .len(),
        1
    );
    let ids: std::collections::HashSet<String> = received(&receiver)
        .await
        .iter()
        .map(|r| header(r, "webhook-id").to_owned())
        .collect();
    assert_eq!(ids.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_actor_that_dies_fails_the_health_check_and_loses_nothing() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    webhook_delivery::fault_injection::panic_once_in_partition(&env.topic);

    let app = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            app.admin_get("/healthz").await.status() == 503
        })
        .await,
        "liveness fails so the orchestrator restarts the pod"
    );
    let body: serde_json::Value = app.admin_get("/healthz").await.json().await.unwrap();
    assert!(body["reason"]
        .as_str()
        .unwrap()
        .contains("no longer consumed"));
    assert_eq!(
        logged(
            "partition actor stopped unexpectedly; this partition is no longer consumed; /healthz now fails so the pod gets restarted",
            &env.topic
        )
        .len(),
        1
    );
    app.stop().await;
    assert!(received(&receiver).await.is_empty());

    // The "restarted pod": the event was never claimed, so its offset was never stored.
    let restarted = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&receiver).await.len() == 1
        })
        .await,
        "the event is delivered after the restart"
    );
    restarted.stop().await;
}
