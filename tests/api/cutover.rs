//! Issue 10: a cutover that re-sends no history. A first deployment (empty ledger, no committed
//! offset) consumes nothing until told where to start; `offsets seed` sets the group's starting
//! point from the old consumer's group, a time or the end of the topic.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::*;

/// The test's configuration as `APP__*` variables, without `kafka.initial_offsets`.
fn undecided_env(env: &TestEnv) -> Vec<(String, String)> {
    env.settings_env()
        .into_iter()
        .filter(|(key, _)| key != "APP__KAFKA__INITIAL_OFFSETS")
        .collect()
}

/// Runs the binary with the test's configuration minus `kafka.initial_offsets`.
fn cli(env: &TestEnv, args: &[&str]) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(undecided_env(env))
        .output()
        .expect("binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// What `offsets show --json` says the group has committed, per partition.
fn committed(env: &TestEnv) -> Vec<Option<i64>> {
    let (ok, text) = cli(env, &["offsets", "show", "--json"]);
    assert!(ok, "{text}");
    let partitions: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    partitions.iter().map(|p| p["committed"].as_i64()).collect()
}

/// Commits `offset` on partition 0 as consumer group `group_id` (the consumer being replaced).
fn commit_as(env: &TestEnv, group_id: &str, offset: i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", KAFKA)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(&env.topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.commit(&list, CommitMode::Sync).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_deployment_consumes_nothing_until_seeded_and_then_sends_no_history() {
    let env = TestEnv::new(2).await;
    let receiver = ok_receiver().await;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;
    for i in 0..6 {
        env.produce_event(Some(&format!("history-{i}")), "L1", "matched")
            .await;
    }
    let mut settings = env.settings();
    settings.kafka.initial_offsets = None;
    let app = spawn_app(settings);

    assert!(
        eventually(Duration::from_secs(20), || async {
            let answer: serde_json::Value = app.admin_get("/readyz").await.json().await.unwrap();
            answer["reason"]
                .as_str()
                .is_some_and(|reason| reason.contains("offsets seed"))
        })
        .await,
        "/readyz says why nothing is consumed"
    );
    let told: Vec<String> = log_lines_containing(&env.group_id)
        .into_iter()
        .filter(|line| line.contains("first deployment") && line.contains("\"level\":50"))
        .collect();
    assert_eq!(told.len(), 1, "one ERROR line names the command: {told:?}");
    assert!(told[0].contains("webhook-delivery offsets seed --from-group"));

    let (ok, text) = cli(&env, &["offsets", "seed", "--latest", "--dry-run"]);
    assert!(ok, "{text}");
    assert!(text.contains("dry run: nothing committed"), "{text}");
    assert_eq!(
        committed(&env),
        vec![None, None],
        "a dry run commits nothing"
    );

    let (ok, text) = cli(&env, &["offsets", "seed", "--latest"]);
    assert!(ok, "{text}");
    let seeded = committed(&env);
    assert_eq!(
        seeded.iter().map(|c| c.unwrap()).sum::<i64>(),
        6,
        "seeded at the end of the topic: {seeded:?}"
    );

    // The waiting instance notices the seed by itself and starts; only new events are sent.
    env.produce_event(Some("new-1"), "L1", "accepted").await;
    env.produce_event(Some("new-2"), "L1", "in_transit").await;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            2,
            Duration::from_secs(40)
        )
        .await
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            app.admin_get("/readyz").await.status() == 200
        })
        .await
    );
    app.stop().await;
    assert_eq!(env.count("SELECT count(*) FROM events").await, 2);
    let sent: Vec<String> = received_event_ids(&receiver).await;
    assert_eq!(sent, vec!["new-1", "new-2"], "no history re-sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeding_from_the_old_group_or_a_time_starts_exactly_there() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;
    for i in 0..5 {
        env.produce_event(Some(&format!("before-{i}")), "L1", "matched")
            .await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let cut = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..5 {
        env.produce_event(Some(&format!("after-{i}")), "L1", "accepted")
            .await;
    }
    let old_group = unique("legacy-consumer");
    commit_as(&env, &old_group, 3);

    let (ok, text) = cli(
        &env,
        &["offsets", "seed", "--from-group", &old_group, "--dry-run"],
    );
    assert!(ok, "{text}");
    assert!(text.contains(&old_group), "{text}");
    assert_eq!(committed(&env), vec![None], "a dry run commits nothing");

    let at = cut.to_rfc3339();
    let (ok, text) = cli(&env, &["offsets", "seed", "--at", &at]);
    assert!(ok, "{text}");
    assert_eq!(
        committed(&env),
        vec![Some(5)],
        "the first message after the cut"
    );

    let (ok, text) = cli(&env, &["offsets", "seed", "--from-group", &old_group]);
    assert!(ok, "{text}");
    assert_eq!(committed(&env), vec![Some(3)], "where the old group stood");

    let (ok, text) = cli(&env, &["offsets", "seed", "--from-group", "no-such-group"]);
    assert!(!ok, "a group without commits is refused");
    assert!(text.contains("no committed offset"), "{text}");

    let (ok, text) = cli(&env, &["offsets", "seed"]);
    assert!(!ok, "a seed needs a source: {text}");

    // Seeded, so not a first deployment: starts at offset 3 without kafka.initial_offsets.
    let mut settings = env.settings();
    settings.kafka.initial_offsets = None;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            7,
            Duration::from_secs(40)
        )
        .await
    );
    // Never both: a running instance's group is not re-seeded under it.
    let (ok, text) = cli(&env, &["offsets", "seed", "--latest"]);
    assert!(
        !ok,
        "seeding a group with a running member is refused: {text}"
    );
    app.stop().await;
    assert_eq!(env.count("SELECT count(*) FROM events").await, 7);
    let mut sent: Vec<String> = received_event_ids(&receiver).await;
    sent.sort();
    assert_eq!(
        sent,
        vec!["after-0", "after-1", "after-2", "after-3", "after-4", "before-3", "before-4"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_the_ledger_has_events_a_partition_without_a_commit_starts_at_the_earliest_with_a_warning(
) {
    let env = TestEnv::new(1).await;
    for i in 0..3 {
        env.produce_event(Some(&format!("e{i}")), "L1", "matched")
            .await;
    }
    // The ledger already has an event (an earlier run), but this group never committed.
    env.db
        .execute(
            "INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition, kafka_offset, payload)
             VALUES ('earlier', 'earlier', 'L0', 'matched', 'older-topic', 0, 0, '\\x7b7d'::bytea)",
            &[],
        )
        .await
        .unwrap();
    let mut settings = env.settings();
    settings.kafka.initial_offsets = None;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            &format!("SELECT count(*) FROM events WHERE topic = '{}'", env.topic),
            3,
            Duration::from_secs(40)
        )
        .await,
        "read from the earliest message"
    );
    app.stop().await;
    assert!(!logged(
        "partition has no committed offset for this group (added later, or its offsets expired); reading it from the earliest retained message",
        &env.topic
    )
    .is_empty());
}
