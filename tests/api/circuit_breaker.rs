use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_holds_probes_and_closes() {
    let env = TestEnv::new(1).await;
    // Four failures, a failed probe, then healthy.
    let receiver = ScriptedReceiver::start(&[503, 503, 503, 503, 503, 200]).await;
    let broker_id = unique("breaker");
    env.add_broker(&broker_id, &receiver.server.uri()).await;
    for load in ["L1", "L2", "L3", "L4"] {
        env.subscribe(&broker_id, load).await;
        env.produce_event(Some(&format!("e-{load}")), load, "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.circuit_breaker.failure_threshold = 3;
    settings.circuit_breaker.open_ms = 1_000;
    settings.circuit_breaker.max_open_ms = 10_000;
    settings.retry.base_delay_ms = 100;
    settings.retry.max_delay_ms = 200;
    settings.retry.max_attempts = 20;

    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            4,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;

    let arrivals = receiver.arrivals();
    assert_eq!(
        arrivals.len(),
        9,
        "4 failures, a failed probe, a good probe, 3 more"
    );
    let gap = |i: usize| arrivals[i] - arrivals[i - 1];
    assert!(
        gap(4) >= Duration::from_millis(900),
        "open for 1 s: {:?}",
        gap(4)
    );
    assert!(
        gap(5) >= Duration::from_millis(1_900),
        "reopened for 2 s: {:?}",
        gap(5)
    );
    assert!(
        gap(6) < Duration::from_millis(900),
        "closed: the rest flows at once"
    );

    let transitions: Vec<(String, String)> = logged("circuit state changed", &broker_id)
        .iter()
        .map(|line| {
            assert!(line["consecutive_failures"].is_u64());
            assert!(line["reason"].is_string());
            (
                line["from"].as_str().unwrap().to_owned(),
                line["to"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected = [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
        ("half_open", "closed"),
    ];
    assert_eq!(
        transitions,
        expected.map(|(a, b)| (a.to_owned(), b.to_owned())).to_vec()
    );
    let opened = &logged("circuit state changed", &broker_id)[0];
    assert!(opened["open_until"].is_string());
    // No attempt budget was spent while open: 9 requests, 9 attempts.
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history")
            .await,
        9
    );
}
