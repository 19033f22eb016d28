//! deploy/ against the real service: every metric the alert rules and the Grafana dashboard
//! query is exported by a live instance, so a renamed metric cannot silently blind an alert.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::helpers::*;

/// Every `webhook_delivery_*` name in a file.
fn metric_names(path: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(start) = rest.find("webhook_delivery_") {
        let name: String = rest[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[start + name.len()..];
        names.insert(name);
    }
    names
}

/// Names with at least one sample in a Prometheus text exposition.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported_by_a_live_instance() {
    let env = TestEnv::new(1).await;
    let healthy = ok_receiver().await;
    let failing = ScriptedReceiver::start(&[503]).await;
    env.add_broker("healthy", &healthy.uri()).await;
    env.add_broker("failing", &failing.server.uri()).await;
    env.subscribe("healthy", "L1").await;
    env.subscribe("failing", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    env.produce(Some("L1"), b"not json").await;
    let app = spawn_app(env.settings());

    let mut wanted = metric_names("deploy/prometheus/alerts.yml");
    wanted.extend(metric_names("deploy/grafana/webhook-delivery.json"));
    assert!(wanted.len() >= 12, "names found: {wanted:?}");
    // The lag gauge is refreshed every few seconds and per-broker series appear once a broker
    // has been worked on: wait for them rather than for a fixed time.
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let missing = loop {
        let text = app.admin_get("/metrics").await.text().await.unwrap();
        let missing: BTreeSet<String> = wanted.difference(&exported(&text)).cloned().collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        missing.is_empty(),
        "used by deploy/ but not exported by a live instance: {missing:?}"
    );
    app.stop().await;
}
