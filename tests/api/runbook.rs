//! Runs every command of RUNBOOK.md against a live instance, so the runbook cannot rot.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;
use crate::instances::Instance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_runbook_command_works_against_a_running_instance() {
    let env = TestEnv::new(2).await;
    let healthy = ok_receiver().await;
    let failing = ScriptedReceiver::start(&[400]).await;
    env.add_broker("acme-freight", &healthy.uri()).await;
    env.add_broker("globex-logistics", &failing.server.uri())
        .await;
    for broker in ["acme-freight", "globex-logistics"] {
        env.subscribe(broker, "LOAD-1").await;
    }
    env.produce_event(Some("e-runbook-1"), "LOAD-1", "matched")
        .await;
    env.produce_event(Some("e-runbook-2"), "LOAD-1", "accepted")
        .await;

    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log_dir = tempfile::tempdir().unwrap();
    let log_path = log_dir.path().join("service.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let admin_bind = [(
        "APP__ADMIN__BIND".to_owned(),
        format!("127.0.0.1:{admin_port}"),
    )];
    let instance = Instance::start_with(&env, &admin_bind, Stdio::from(log_file));
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state <> 'pending'",
            4,
            Duration::from_secs(30)
        )
        .await,
        "the instance has delivered and dead-lettered something to talk about"
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
        "runbook commands failed:\n{stdout}"
    );
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    assert!(
        stdout.lines().filter(|l| l.starts_with("ok: ")).count() >= 15,
        "every command ran:\n{stdout}"
    );
}
