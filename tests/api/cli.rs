use std::process::Command;

fn run(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.iter().copied())
        .output()
        .expect("binary runs")
}

#[test]
fn an_invalid_config_value_exits_non_zero_naming_the_key() {
    let output = run(
        &["serve"],
        &[("APP__DELIVERY__MAX_IN_FLIGHT_PER_BROKER", "0")],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("delivery.max_in_flight_per_broker"),
        "{stderr}"
    );
}

#[test]
fn a_malformed_environment_value_exits_non_zero_naming_the_key() {
    let output = run(&["migrate"], &[("APP__KAFKA__SESSION_TIMEOUT_MS", "ten")]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("session_timeout_ms"), "{stderr}");
}

#[test]
fn migrate_is_idempotent() {
    let db = format!(
        "wd_cli_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    assert!(Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "test",
            "-qc",
            &format!("CREATE DATABASE {db}")
        ])
        .status()
        .unwrap()
        .success());
    let url = format!("postgres://postgres@127.0.0.1:5432/{db}");
    for _ in 0..2 {
        let output = run(&["migrate"], &[("APP__POSTGRES__URL", &url)]);
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn replay_takes_exactly_one_target_and_since_only_with_a_broker() {
    for args in [
        &["dead-letters", "replay"][..],
        &["dead-letters", "replay", "--id", "1", "--broker", "b1"],
        &[
            "dead-letters",
            "replay",
            "--id",
            "1",
            "--since",
            "2026-01-01T00:00:00Z",
        ],
    ] {
        let output = run(args, &[]);
        assert!(!output.status.success(), "{args:?} must be refused");
        assert_eq!(output.status.code(), Some(2), "a usage error: {args:?}");
    }
}
