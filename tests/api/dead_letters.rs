use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_is_dead_lettered_listed_and_replayed_with_the_same_webhook_id() {
    let env = TestEnv::new(1).await;
    let scripted = ScriptedReceiver::start(&[400, 200]).await;
    let receiver = &scripted.server;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    env.produce_event(Some("e2"), "L1", "accepted").await;

    let app = spawn_app(env.settings());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state <> 'pending'",
            2,
            Duration::from_secs(30)
        )
        .await
    );
    let first_id = header(&received(receiver).await[0], "webhook-id").to_owned();
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history")
            .await,
        2,
        "a 400 is permanent: no retry"
    );

    let list = run_cli(&env, &["dead-letters", "list", "--broker", "b1", "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let letters: Vec<serde_json::Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["webhook_id"], first_id.as_str());
    assert!(letters[0]["dead_reason"]
        .as_str()
        .unwrap()
        .contains("HTTP 400"));
    let dead_id = letters[0]["delivery_id"].as_i64().unwrap().to_string();

    let delivered_id: i64 = env
        .db
        .query_one(
            "SELECT delivery_id FROM deliveries WHERE state = 'delivered'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let refused = run_cli(
        &env,
        &["dead-letters", "replay", "--id", &delivered_id.to_string()],
    );
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("refused"));

    let replay = run_cli(&env, &["dead-letters", "replay", "--id", &dead_id]);
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            received(receiver).await.len() == 3
        })
        .await,
        "the running service sends the replayed delivery"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            2,
            Duration::from_secs(5)
        )
        .await
    );
    app.stop().await;
    assert_eq!(header(&received(receiver).await[2], "webhook-id"), first_id);
    let empty = run_cli(&env, &["dead-letters", "list"]);
    assert!(String::from_utf8_lossy(&empty.stdout).contains("0 dead deliveries"));
}

/// One delivery dead-lettered (its broker answers 400, then 200) by a running instance whose
/// overdue sweep is slowed to a minute, so only a replay announcement makes it go out in time.
async fn dead_letter_with_a_slow_sweep() -> (TestEnv, ScriptedReceiver, TestApp) {
    let env = TestEnv::new(1).await;
    let scripted = ScriptedReceiver::start(&[400, 200]).await;
    env.add_broker("b1", &scripted.server.uri()).await;
    env.subscribe("b1", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    let mut settings = env.settings();
    settings.delivery.ledger_poll_interval_ms = 60_000;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    (env, scripted, app)
}

fn replay_with_the_cli(env: &TestEnv) {
    let replayed = run_cli(env, &["dead-letters", "replay", "--broker", "b1"]);
    assert!(
        replayed.status.success(),
        "{}",
        String::from_utf8_lossy(&replayed.stderr)
    );
}

/// Stops the instance once the replayed delivery is delivered, or after 20 s; true if it was.
async fn delivered_then_stop(env: &TestEnv, app: TestApp) -> bool {
    let delivered = env
        .count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            1,
            Duration::from_secs(20),
        )
        .await;
    app.stop().await;
    delivered
}

/// A replay made by the CLI, another process, reaches the running instance's schedulers when it
/// commits (LISTEN/NOTIFY), not only at the next ledger sweep: with the sweep slowed to a minute,
/// the replayed delivery still goes out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_replay_is_announced_to_the_running_instance() {
    let (env, scripted, app) = dead_letter_with_a_slow_sweep().await;
    replay_with_the_cli(&env);
    assert!(
        delivered_then_stop(&env, app).await,
        "the replay reached the running instance without waiting for the sweep"
    );
    assert_eq!(scripted.requests().len(), 2);
}

/// The instance's replay listener, as `pg_stat_activity` shows it.
const REPLAY_LISTENERS: &str = "SELECT count(*) FROM pg_stat_activity
     WHERE datname = current_database() AND query = 'LISTEN webhook_delivery_replays'";

/// A replay committed while the instance's replay listener is down (its connection killed, as a
/// database restart does) is not heard. When the listener is back, every broker reads its
/// ledger from the start, as after a replay (its sweeps otherwise start after the rows it holds):
/// with the overdue sweep slowed to a minute, the replayed delivery still goes out in seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_made_while_the_listener_was_down_goes_out_once_it_is_back() {
    let (env, scripted, app) = dead_letter_with_a_slow_sweep().await;
    assert!(
        env.count_reaches(REPLAY_LISTENERS, 1, Duration::from_secs(10))
            .await
    );
    let killed = env
        .count(&REPLAY_LISTENERS.replace(
            "count(*)",
            // In the select list, so it runs only for the rows the filter kept.
            "count(*) FILTER (WHERE pg_terminate_backend(pid))",
        ))
        .await;
    assert_eq!(killed, 1, "the listener's connection is killed");
    replay_with_the_cli(&env);
    // The listener waits 5 s before it connects again: the replay's announcement went nowhere.
    assert_eq!(
        env.count(REPLAY_LISTENERS).await,
        0,
        "the replay committed while nobody listened"
    );
    assert!(
        delivered_then_stop(&env, app).await,
        "the listener's return made the broker read the replayed delivery"
    );
    assert_eq!(scripted.requests().len(), 2);
}
