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
        eventually(Duration::from_secs(30), || async {
            env.count("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
                .await
                == 5
        })
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
