//! End-to-end regressions for the delivery scheduler's bugs of issue 11 (the simulator in
//! tests/simulation.rs covers the interleavings; these show the observed symptoms are gone).

use std::time::Duration;

use wiremock::matchers::{body_string_contains, method};
use wiremock::{Mock, MockServer, ResponseTemplate};

use crate::helpers::*;

/// Bug 2: with `mailbox_capacity = 10` and a 30 s retry delay, 20 loads failing used to keep
/// 10 healthy loads' events out of memory until the retries came due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_waiting_in_memory_do_not_hold_up_healthy_loads() {
    let env = TestEnv::new(1).await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .and(body_string_contains("\"loadId\":\"FAIL-"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&receiver)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&receiver)
        .await;
    env.add_broker("mixed", &receiver.uri()).await;
    for i in 0..20 {
        let load = format!("FAIL-{i}");
        env.subscribe("mixed", &load).await;
        env.produce_event(Some(&format!("f{i}")), &load, "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.delivery.mailbox_capacity = 10;
    settings.retry.base_delay_ms = 30_000;
    settings.retry.max_delay_ms = 30_000;
    // Keep the breaker out of it: this is about room, not about the endpoint being down.
    settings.circuit_breaker.failure_threshold = 1_000;
    settings.circuit_breaker.failure_ratio = 1.0;
    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(20), || async {
            env.count("SELECT count(*) FROM deliveries WHERE attempts = 1")
                .await
                >= 10
        })
        .await,
        "at least ten failing loads wait for their retry"
    );
    for i in 0..10 {
        let load = format!("OK-{i}");
        env.subscribe("mixed", &load).await;
        env.produce_event(Some(&format!("h{i}")), &load, "matched")
            .await;
    }
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE load_id LIKE 'OK-%' AND state = 'delivered'",
            10,
            Duration::from_secs(15)
        )
        .await,
        "the healthy loads are delivered while the failing ones wait for their retries"
    );
    app.stop().await;
}

/// Bug 1: disabling a broker while its breaker was open (what RUNBOOK.md tells on-call to do)
/// and re-enabling it later left the breaker half-open for good: 0 of 5 new events arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_disabled_while_its_breaker_is_open_recovers_when_re_enabled() {
    let env = TestEnv::new(1).await;
    let receiver = ScriptedReceiver::start(&[503, 503, 200]).await;
    env.add_broker("flaky", &receiver.server.uri()).await;
    for load in ["A1", "A2", "B1", "B2", "B3", "B4", "B5"] {
        env.subscribe("flaky", load).await;
    }
    env.produce_event(Some("a1"), "A1", "matched").await;
    env.produce_event(Some("a2"), "A2", "matched").await;
    let mut settings = env.settings();
    settings.circuit_breaker.failure_threshold = 2;
    // Open long enough for the disabled row to be read (every 5 s) while it is open.
    settings.circuit_breaker.open_ms = 8_000;
    settings.retry.base_delay_ms = 500;
    settings.retry.max_delay_ms = 500;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM delivery_attempts WHERE status_code = 503",
            2,
            Duration::from_secs(20)
        )
        .await,
        "two failures open the breaker"
    );
    env.db
        .execute(
            "UPDATE brokers SET enabled = false WHERE broker_id = 'flaky'",
            &[],
        )
        .await
        .unwrap();
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            2,
            Duration::from_secs(30)
        )
        .await,
        "the disabled broker's deliveries are dead-lettered without a request"
    );
    env.db
        .execute(
            "UPDATE brokers SET enabled = true WHERE broker_id = 'flaky'",
            &[],
        )
        .await
        .unwrap();
    for (i, load) in ["B1", "B2", "B3", "B4", "B5"].into_iter().enumerate() {
        env.produce_event(Some(&format!("b{i}")), load, "matched")
            .await;
    }
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            5,
            Duration::from_secs(45)
        )
        .await,
        "all five new events arrive once the broker is re-enabled"
    );
    assert_eq!(
        receiver.arrivals().len(),
        7,
        "2 failures, then 5 deliveries"
    );
    app.stop().await;
}

/// Session 12: while a broker's breaker was open, every claim for it that could not join its
/// full memory started a sweep through its whole backlog, reading rows that could not go
/// (`hotload`'s unavailable broker read 92,252 of them). Nothing is read until it half-opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_does_not_read_its_backlog_again() {
    let env = TestEnv::new(1).await;
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&receiver)
        .await;
    env.add_broker("down", &receiver.uri()).await;
    // Two deep loads, as in `hotload`: their heads wait for a retry, their tails are in the
    // ledger, and every new event of theirs is a claim that cannot join memory.
    let loads = ["DEEP-A", "DEEP-B"];
    for load in loads {
        env.subscribe("down", load).await;
    }
    let produce = |from: usize, to: usize| {
        let env = &env;
        async move {
            for i in from..to {
                let load = loads[i % 2];
                env.produce_event(Some(&format!("ev-{i}")), load, "in_transit")
                    .await;
            }
        }
    };
    produce(0, 10).await;
    let mut settings = env.settings();
    settings.delivery.mailbox_capacity = 5;
    settings.circuit_breaker.failure_threshold = 2;
    settings.circuit_breaker.open_ms = 60_000;
    settings.retry.base_delay_ms = 30_000;
    settings.retry.max_delay_ms = 30_000;
    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(20), || async {
            app.metric_value("webhook_delivery_circuit_state", &["broker_id=\"down\""])
                .await
                == Some(2.0)
        })
        .await,
        "the two loads' first 503s open the breaker"
    );
    // A page asked for before it opened may still be answered.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rows_read = || async {
        app.metric_value("webhook_delivery_ledger_page_rows_total", &[])
            .await
            .expect("the counter is published")
    };
    let before = rows_read().await;
    produce(10, 40).await;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries",
            40,
            Duration::from_secs(20)
        )
        .await,
        "the new events are claimed"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rows_read().await,
        before,
        "no ledger rows are read while the breaker is open"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE state = 'pending'")
            .await,
        40,
        "every delivery waits in the ledger"
    );
    app.stop().await;
}
