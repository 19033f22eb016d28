//! Issue 12 item 5, 10,000 brokers: idle DeliveryActors retire and start again on demand without
//! losing, duplicating or reordering anything, and an actor with something to remember (a retry
//! pending, an open breaker) is kept; memory held for deliveries is bounded in bytes.

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
    assert!(
        eventually(Duration::from_secs(5), || async {
            let metrics = app.admin_get("/metrics").await.text().await.unwrap();
            !metrics.lines().any(|l| l.contains(&series))
        })
        .await,
        "its per-broker series are gone"
    );
    let row = app
        .listed_broker(&broker)
        .await
        .expect("/brokers still lists a broker whose actor retired");
    assert_eq!(row["in_memory"], 0);
    assert!(
        row["in_flight_limit"].is_null(),
        "no actor, so no concurrency limit"
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
    let event_ids: Vec<String> = received_event_ids(&receiver).await;
    assert_eq!(
        event_ids,
        ["e1", "e2", "e3", "e4", "e5"],
        "each once, in order"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history")
            .await,
        5
    );
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

/// Buffered bytes never exceed `delivery.max_buffered_bytes`; what does not fit waits in the
/// ledger and is delivered once room frees up, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_bytes_stay_under_the_bound_and_everything_is_delivered() {
    let env = TestEnv::new(1).await;
    let receiver = ScriptedReceiver::start_with_delay(&[200], Duration::from_millis(50)).await;
    let broker = unique("tight");
    env.add_broker(&broker, &receiver.server.uri()).await;
    for load in ["A", "B", "C", "D"] {
        env.subscribe(&broker, load).await;
    }
    let mut settings = env.settings();
    settings.delivery.max_message_bytes = 1_024;
    // Room for about three deliveries (payload plus ~0.5 kB each).
    settings.delivery.max_buffered_bytes = 2_048;
    let app = spawn_app(settings);
    for i in 0..24 {
        let load = ["A", "B", "C", "D"][i % 4];
        env.produce_event(Some(&format!("e{i:02}")), load, "matched")
            .await;
    }
    let gauge = |metrics: &str, name: &str| -> i64 {
        metrics
            .lines()
            .find(|l| l.starts_with(&format!("webhook_delivery_{name} ")))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    loop {
        let metrics = app.admin_get("/metrics").await.text().await.unwrap();
        let (held, max) = (
            gauge(&metrics, "buffered_bytes"),
            gauge(&metrics, "buffered_bytes_max"),
        );
        assert_eq!(max, 2_048);
        assert!(
            (0..=max).contains(&held),
            "buffered_bytes {held} within 0..={max}"
        );
        let delivered = env
            .count("SELECT count(*) FROM deliveries WHERE state = 'delivered'")
            .await;
        if delivered == 24 && held == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{delivered} of 24 delivered, {held} bytes held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(receiver.requests().len(), 24, "each delivered once");
    app.stop().await;
}

/// Many brokers starting at once: their ledger reads queue for one permit
/// (`max_concurrent_ledger_loads = 1`) and their rows are read in batches, and every delivery
/// still goes out once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_brokers_starting_at_once_share_one_ledger_read_and_batched_row_reads() {
    let env = TestEnv::new(2).await;
    let receiver = ok_receiver().await;
    let prefix = unique("many");
    for i in 0..40 {
        let broker = format!("{prefix}-{i}");
        env.add_broker(&broker, &receiver.uri()).await;
        env.subscribe(&broker, &format!("L{}", i % 8)).await;
    }
    for i in 0..16 {
        env.produce_event(Some(&format!("e{i}")), &format!("L{}", i % 8), "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.delivery.max_concurrent_ledger_loads = 1;
    let app = spawn_app(settings);
    // 16 events, each for the 5 brokers of its load.
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            80,
            Duration::from_secs(30)
        )
        .await,
        "every broker's deliveries go out"
    );
    assert_eq!(received(&receiver).await.len(), 80, "each once");
    app.stop().await;
}

/// A process short of sockets is not the brokers' fault. With room for one outbound connection
/// (`delivery.max_outbound_connections = 1`), three brokers take turns: a request that finds no
/// room is not made, its broker pauses, and the socket comes back when its holder's client is
/// let go (`connection_keep_alive_ms`). Every webhook arrives once and in order, every attempt
/// recorded is a success, no breaker moves (one failure would open it here), and the shortage
/// shows in `local_shortages_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brokers_short_of_connections_take_turns_with_nothing_counted_against_them() {
    let env = TestEnv::new(1).await;
    let mut brokers = Vec::new();
    for _ in 0..3 {
        let receiver = ok_receiver().await;
        let broker = unique("short");
        env.add_broker(&broker, &receiver.uri()).await;
        for load in ["L1", "L2", "L3"] {
            env.subscribe(&broker, load).await;
        }
        brokers.push((broker, receiver));
    }
    let mut settings = env.settings();
    settings.delivery.max_outbound_connections = 1;
    settings.delivery.connection_keep_alive_ms = 100;
    settings.circuit_breaker.failure_threshold = 1;
    let app = spawn_app(settings);
    let mut sent = Vec::new();
    for i in 0..5 {
        for load in ["L1", "L2", "L3"] {
            let event_id = format!("{load}-e{i}");
            env.produce_event(Some(&event_id), load, "matched").await;
            sent.push(event_id);
        }
    }
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            45,
            Duration::from_secs(60)
        )
        .await,
        "every broker gets every webhook, taking turns on the one connection"
    );
    for (broker, receiver) in &brokers {
        let got = received_event_ids(receiver).await;
        for load in ["L1", "L2", "L3"] {
            let of_load: Vec<&String> = got.iter().filter(|e| e.starts_with(load)).collect();
            let expected: Vec<&String> = sent.iter().filter(|e| e.starts_with(load)).collect();
            assert_eq!(of_load, expected, "{broker}: {load} once each, in order");
        }
        assert!(
            logged("circuit state changed", broker).is_empty(),
            "{broker}: no breaker transition"
        );
    }
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history WHERE outcome <> 'delivered'")
            .await,
        0,
        "no failed attempt recorded: a request not made is not an attempt"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE attempts <> 1")
            .await,
        0,
        "each delivered at its first attempt"
    );
    let shortages = app
        .metric_value("webhook_delivery_local_shortages_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(shortages >= 1.0, "the brokers did run short ({shortages})");
    assert_eq!(
        app.metric_value("webhook_delivery_outbound_connections_max", &[])
            .await,
        Some(1.0)
    );
    app.stop().await;
}
