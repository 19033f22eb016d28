//! Online migrations: `serve` runs no DDL and refuses a schema older than it needs; `migrate`
//! applied while an instance delivers never makes a claim or an outcome write wait on a lock.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use webhook_delivery::ledger::{known_schema_versions, latest_schema_version, Ledger};

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_ledger_older_than_it_needs_and_says_to_run_migrate() {
    let env = TestEnv::with_schema(1, MigrationScope::UpTo(1)).await;
    let output = run_cli(&env, &["serve"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("ledger schema is too old"), "{stderr}");
    assert!(
        stderr.contains("run `webhook-delivery migrate`"),
        "{stderr}"
    );
    assert!(stderr.contains("newest migration applied: 1"), "{stderr}");
    // Nothing was created by serve: it runs no DDL.
    assert_eq!(env.count("SELECT count(*) FROM schema_migrations").await, 1);

    // What serve needs first (a deploy that leaves the index builds for later), then the rest.
    let migrated = run_cli(&env, &["migrate", "--required-only"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let ledger = Ledger::connect_lazy(&env.db_url, 1).unwrap();
    let status = ledger.check_schema().await.expect("serve can start now");
    assert!(
        !status.pending_optional.is_empty(),
        "the online index builds are left for later"
    );
    let migrated = run_cli(&env, &["migrate"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    assert_eq!(
        ledger.applied_schema_versions().await.unwrap(),
        known_schema_versions()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_on_a_newer_schema_than_it_knows() {
    let env = TestEnv::new(1).await;
    env.db
        .execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, 'from_a_newer_release')",
            &[&(latest_schema_version() + 1000)],
        )
        .await
        .unwrap();
    let receiver = ok_receiver().await;
    env.add_broker("b-newer", &receiver.uri()).await;
    env.subscribe("b-newer", "L-newer").await;
    env.produce_event(Some("e-newer"), "L-newer", "matched")
        .await;
    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
}

/// The longest any backend of this database other than the migration itself has been waiting
/// on a lock right now, in milliseconds.
const LOCK_WAIT_MS: &str =
    "SELECT COALESCE(max(EXTRACT(EPOCH FROM (clock_timestamp() - query_start)) * 1000), 0)::int8
     FROM pg_stat_activity
     WHERE datname = current_database() AND pid <> pg_backend_pid()
       AND wait_event_type = 'Lock'
       AND query NOT ILIKE '%CONCURRENTLY%' AND query NOT ILIKE '%pg_advisory%'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_while_delivering_makes_no_claim_or_outcome_write_wait() {
    // Only what this build needs (`migrate --required-only`); the rest, the online index builds,
    // are what a rolling deploy may apply while it runs.
    let env = TestEnv::with_schema(2, MigrationScope::Required).await;
    let applied = Ledger::connect_lazy(&env.db_url, 1)
        .unwrap()
        .applied_schema_versions()
        .await
        .unwrap();
    let online: Vec<i32> = known_schema_versions()
        .into_iter()
        .filter(|version| !applied.contains(version))
        .collect();
    assert!(
        !online.is_empty(),
        "every migration is required: nothing here is applied online"
    );
    // A ledger with history, so that each index build takes a while rather than an instant.
    env.db
        .batch_execute(
            "INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset,
                                     state, attempts, dead_reason)
             SELECT 'evt:old-' || g, 'b-old', 'L-old-' || (g % 1000), 0, g, 'dead', 12, 'old'
             FROM generate_series(1, 300000) g;
             ANALYZE deliveries",
        )
        .await
        .unwrap();
    let receivers = [ok_receiver().await, ok_receiver().await];
    for (i, receiver) in receivers.iter().enumerate() {
        env.add_broker(&format!("b{i}"), &receiver.uri()).await;
    }
    for load in 0..20 {
        for broker in ["b0", "b1"] {
            env.subscribe(broker, &format!("L{load}")).await;
        }
    }
    let app = spawn_app(env.settings());

    // Watch lock waits from the first event to the last delivery.
    let watching = Arc::new(AtomicBool::new(true));
    let (watcher_db, connection) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    let watcher = tokio::spawn({
        let watching = watching.clone();
        async move {
            let mut longest_wait_ms = 0_i64;
            while watching.load(Ordering::SeqCst) {
                let wait: i64 = watcher_db
                    .query_one(LOCK_WAIT_MS, &[])
                    .await
                    .unwrap()
                    .get(0);
                longest_wait_ms = longest_wait_ms.max(wait);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            longest_wait_ms
        }
    });

    let events = 200;
    let migrate = {
        let env_vars = env.settings_env();
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(500));
            std::process::Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
                .arg("migrate")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .envs(env_vars)
                .output()
                .expect("binary runs")
        })
    };
    for i in 0..events {
        env.produce_event(
            Some(&format!("e-{i}")),
            &format!("L{}", i % 20),
            "in_transit",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let migrated = migrate.await.unwrap();
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let delivered = env
        .count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            2 * events,
            Duration::from_secs(60),
        )
        .await;
    watching.store(false, Ordering::SeqCst);
    let longest_wait_ms = watcher.await.unwrap();
    eprintln!("longest lock wait of a service query during the migration: {longest_wait_ms} ms");
    app.stop().await;

    assert!(delivered, "every event reaches both brokers");
    for version in &online {
        assert_eq!(
            env.count(&format!(
                "SELECT count(*) FROM schema_migrations WHERE version = {version}"
            ))
            .await,
            1,
            "migration {version} applied while the instance ran"
        );
    }
    assert_eq!(
        env.count(
            "SELECT count(*) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
             WHERE c.relname = 'deliveries_dead_by_time' AND i.indisvalid"
        )
        .await,
        1
    );
    assert!(
        longest_wait_ms < 1000,
        "a service query waited {longest_wait_ms} ms on a lock during the migration"
    );
    for receiver in &receivers {
        assert_eq!(received(receiver).await.len(), events as usize);
    }
}
