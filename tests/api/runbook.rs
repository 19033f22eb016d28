//! Runs every command of RUNBOOK.md against a live instance and checks what each one prints
//! (scripts/runbook-check.sh with scripts/runbook-expect.txt), so the runbook cannot rot. The
//! instance has what the runbook's sections are about: a healthy broker, a dead letter, an open
//! breaker, a disabled broker and a rejected message.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;
use crate::instances::Instance;

const TOKEN: &str = "runbook-admin-token-0123456789";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_prints_what_the_runbook_says_against_a_running_instance() {
    let env = TestEnv::new(2).await;
    let since = (chrono::Utc::now() - chrono::Duration::minutes(1)).to_rfc3339();
    let healthy = ok_receiver().await;
    let rejecting = ScriptedReceiver::start(&[400]).await;
    let unavailable = ScriptedReceiver::start(&[503]).await;
    let never_called = ok_receiver().await;
    env.add_broker("acme-freight", &healthy.uri()).await;
    env.add_broker("globex-logistics", &rejecting.server.uri())
        .await;
    env.add_broker("initech", &unavailable.server.uri()).await;
    env.add_broker("umbrella-corp", &never_called.uri()).await;
    env.db
        .execute(
            "UPDATE brokers SET enabled = false, disabled_reason = 'answered 410 Gone' WHERE broker_id = 'umbrella-corp'",
            &[],
        )
        .await
        .unwrap();
    for broker in [
        "acme-freight",
        "globex-logistics",
        "initech",
        "umbrella-corp",
    ] {
        env.subscribe(broker, "LOAD-1").await;
    }
    env.produce_event(Some("e-runbook-1"), "LOAD-1", "matched")
        .await;
    env.produce_event(Some("e-runbook-2"), "LOAD-1", "accepted")
        .await;
    env.produce(Some("LOAD-1"), b"not json").await;

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("service.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let instance_env = [
        (
            "APP__ADMIN__BIND".to_owned(),
            format!("127.0.0.1:{admin_port}"),
        ),
        ("APP__ADMIN__TOKEN".to_owned(), TOKEN.to_owned()),
    ];
    let instance = Instance::start_with(&env, &instance_env, Stdio::from(log_file));
    for (what, sql, expected) in [
        (
            "acme-freight got both events",
            "SELECT count(*) FROM deliveries WHERE broker_id = 'acme-freight' AND state = 'delivered'",
            2,
        ),
        (
            "globex-logistics dead-lettered both",
            "SELECT count(*) FROM deliveries WHERE broker_id = 'globex-logistics' AND state = 'dead'",
            2,
        ),
        (
            "initech's breaker opened",
            "SELECT count(*) FROM broker_circuits WHERE broker_id = 'initech' AND state = 'open'",
            1,
        ),
        (
            "the message that is not JSON was rejected",
            "SELECT count(*) FROM rejected_messages",
            1,
        ),
    ] {
        assert!(
            env.count_reaches(sql, expected, Duration::from_secs(30))
                .await,
            "the instance has something to talk about: {what}"
        );
    }
    // The polled gauges (lag, ledger totals, readiness) are refreshed every few seconds: wait
    // for a refresh that saw the dead letters and the joined group.
    assert!(
        eventually(Duration::from_secs(20), || async {
            let metrics = reqwest::get(format!("http://127.0.0.1:{admin_port}/metrics"))
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            metrics.contains("webhook_delivery_consumer_lag_messages{")
                && metrics.contains("webhook_delivery_ready 1")
                && !metrics.contains("webhook_delivery_dead_deliveries 0")
        })
        .await,
        "the gauges were refreshed"
    );

    let binary_dir = std::path::Path::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .parent()
        .unwrap()
        .to_owned();
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = tokio::task::spawn_blocking({
        let env_vars = env.settings_env();
        let log_path = log_path.clone();
        let db_url = env.db_url.clone();
        let env_group = env.group_id.clone();
        move || {
            Command::new("scripts/runbook-check.sh")
                .arg("RUNBOOK.md")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .envs(env_vars)
                .env("PATH", path)
                .env("ADMIN", format!("http://127.0.0.1:{admin_port}"))
                .env("DATABASE_URL", db_url)
                .env("LOG", log_path)
                .env("BROKER", "initech")
                .env("SINCE", since)
                .env("EVENT_ID", "e-runbook-1")
                .env("TOKEN", TOKEN)
                // The cutover's "old consumer": the instance's own group will do for a dry run.
                .env("OLD_GROUP", env_group)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(instance.sigterm().success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "runbook commands failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count() >= 40,
        "every command ran:\n{stdout}"
    );
}
