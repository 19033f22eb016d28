use std::time::Duration;

use crate::helpers::*;

async fn dead_reasons(env: &TestEnv) -> Vec<(String, String)> {
    env.db
        .query(
            "SELECT broker_id, dead_reason FROM deliveries WHERE state = 'dead' ORDER BY broker_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

async fn run_until_settled(env: &TestEnv, settings: webhook_delivery::config::Settings, n: i64) {
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            n,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_the_guard_refuses_are_dead_lettered_without_a_request() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    let brokers = [
        ("a-plain-http", receiver.uri()),
        ("b-private", "https://10.0.0.1/hooks".to_owned()),
        (
            "c-metadata",
            "https://169.254.169.254/latest/meta-data".to_owned(),
        ),
        ("d-unspecified", "https://0.0.0.0/".to_owned()),
    ];
    for (broker, url) in &brokers {
        env.add_broker(broker, url).await;
        env.subscribe(broker, "L1").await;
    }
    env.produce_event(Some("e1"), "L1", "matched").await;
    let mut settings = env.settings();
    settings.delivery.allow_http = false;
    run_until_settled(&env, settings, 4).await;

    assert!(received(&receiver).await.is_empty(), "no request was made");
    let reasons = dead_reasons(&env).await;
    assert!(reasons[0].1.contains("must use https"), "{reasons:?}");
    assert!(
        reasons[1].1.contains("10.0.0.1, a private address"),
        "{reasons:?}"
    );
    assert!(reasons[2].1.contains("link-local"), "{reasons:?}");
    assert!(reasons[3].1.contains("unspecified"), "{reasons:?}");
    assert!(reasons
        .iter()
        .all(|(_, r)| r.starts_with("refused by the SSRF guard")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_resolving_to_a_forbidden_address_is_refused_at_connect_time() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    let port = receiver.address().port();
    env.add_broker("by-name", &format!("http://localhost:{port}/hooks"))
        .await;
    env.subscribe("by-name", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    let mut settings = env.settings();
    settings.delivery.allowed_networks = Vec::new();
    run_until_settled(&env, settings, 1).await;

    assert!(received(&receiver).await.is_empty(), "no request was made");
    let reasons = dead_reasons(&env).await;
    assert!(reasons[0].1.contains("loopback address"), "{reasons:?}");
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempts WHERE error_class = 'ssrf_refused'")
            .await,
        1,
        "refused once, not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_ipv4_and_other_special_purpose_ranges_are_refused_too() {
    let env = TestEnv::new(1).await;
    let brokers = [
        ("a-benchmarking", "https://198.18.0.1/", "benchmarking"),
        (
            "b-ipv4-compatible",
            "https://[::10.0.0.1]/",
            "IPv4-compatible",
        ),
        ("c-nat64", "https://[64:ff9b::a00:1]/", "NAT64"),
        ("d-6to4", "https://[2002:a00:1::1]/", "6to4"),
        ("e-teredo", "https://[2001::a00:1]/", "Teredo"),
        ("f-site-local", "https://[fec0::1]/", "site-local"),
        (
            "g-cgnat",
            "https://100.64.0.1/",
            "shared (carrier-grade NAT)",
        ),
        (
            "h-mapped",
            "https://[::ffff:169.254.169.254]/",
            "link-local",
        ),
    ];
    for (broker, url, _) in &brokers {
        env.add_broker(broker, url).await;
        env.subscribe(broker, "L1").await;
    }
    env.produce_event(Some("e1"), "L1", "matched").await;
    let mut settings = env.settings();
    settings.delivery.allowed_networks = Vec::new();
    run_until_settled(&env, settings, brokers.len() as i64).await;

    let reasons = dead_reasons(&env).await;
    for ((broker, _, kind), (dead_broker, reason)) in brokers.iter().zip(&reasons) {
        assert_eq!(broker, dead_broker);
        assert!(
            reason.starts_with("refused by the SSRF guard") && reason.contains(kind),
            "{broker}: {reason}"
        );
    }
}
