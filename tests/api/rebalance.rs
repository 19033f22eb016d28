//! Issue 10: nothing lost or reordered across slow revokes and reassignments. A claim is held on
//! the database (`LOCK TABLE events` in another session) while a second consumer joins and
//! leaves the group, so partitions move away from an instance whose actors are stuck and come
//! back to it while they still are. Then every produced event must be in the ledger and at the
//! receiver, each load's statuses in order.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::helpers::*;

/// Records (load, event index) of every webhook, in arrival order.
struct Recorder(Arc<Mutex<Vec<(String, usize)>>>);

impl Respond for Recorder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let load = body["loadId"].as_str().unwrap().to_owned();
        let index = body["eventId"].as_str().unwrap()[1..].parse().unwrap();
        self.0.lock().unwrap().push((load, index));
        ResponseTemplate::new(200)
    }
}

const LOADS: usize = 6;

/// Produces events `range` (event id `e{i}`, load `L{i % LOADS}`): a load's events are produced
/// in index order, so its statuses must arrive in index order.
async fn produce(env: &TestEnv, range: std::ops::Range<usize>) {
    for i in range {
        env.produce_event(
            Some(&format!("e{i}")),
            &format!("L{}", i % LOADS),
            &format!("s{i}"),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_moving_away_and_back_during_a_stuck_claim_lose_and_reorder_nothing() {
    let env = TestEnv::new(2).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let receiver = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(Recorder(seen.clone()))
        .mount(&receiver)
        .await;
    env.add_broker("b1", &receiver.uri()).await;
    for load in 0..LOADS {
        env.subscribe("b1", &format!("L{load}")).await;
    }
    let mut settings = env.settings();
    // Short, so both revocations below time out while the claims are stuck.
    settings.kafka.revoke_drain_timeout_ms = 1_000;

    let first = spawn_app(settings.clone());
    produce(&env, 0..20).await;
    assert!(
        env.count_reaches("SELECT count(*) FROM events", 20, Duration::from_secs(30))
            .await,
        "the first instance consumes"
    );

    // Another session holds the events table: every claim now waits.
    let lock = TableLock::take(&env, "events").await;
    produce(&env, 20..40).await;

    // /readyz of the first instance, sampled through the rebalances below.
    let readiness = Arc::new(Mutex::new(Vec::new()));
    let sampler = tokio::spawn({
        let (url, readiness) = (first.admin_url("/readyz"), readiness.clone());
        async move {
            loop {
                if let Ok(answer) = reqwest::get(&url).await {
                    let status = answer.status().as_u16();
                    let body = answer.text().await.unwrap_or_default();
                    readiness.lock().unwrap().push((status, body));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // A second consumer joins (the partitions are revoked from stuck actors) ...
    let second = spawn_app(settings.clone());
    assert!(
        eventually(Duration::from_secs(40), || async {
            second.admin_get("/readyz").await.status() == 200
        })
        .await,
        "the second instance joins the group"
    );
    produce(&env, 40..55).await;
    // ... and leaves: its partition comes back to the first instance, whose old actors are
    // still stuck on the lock.
    let both_assigned = || {
        log_lines_containing(&env.topic)
            .iter()
            .filter(|line| {
                line.contains("\"msg\":\"partitions assigned\"") && line.contains("[0, 1]")
            })
            .count()
    };
    let before_leaving = both_assigned();
    second.stop().await;
    assert!(
        eventually(Duration::from_secs(40), || async {
            both_assigned() > before_leaving
        })
        .await,
        "the first instance is assigned every partition again (new tenures, old actors still stuck)"
    );
    // Long enough for a returning tenure to read its partition and queue a claim behind the
    // lock, next to the old tenure's stuck one (unless it waits for it, as it must).
    tokio::time::sleep(Duration::from_secs(3)).await;
    sampler.abort();
    assert!(
        readiness
            .lock()
            .unwrap()
            .iter()
            .any(|(status, body)| *status == 503 && body.contains("rebalance")),
        "/readyz is not ready while partitions are being rebalanced"
    );
    lock.release().await;
    produce(&env, 55..65).await;

    let total = 65;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            total as i64,
            Duration::from_secs(60)
        )
        .await,
        "every event is delivered"
    );
    // Every actor of a revoked tenure stops once its stuck batch is done: none is left behind.
    assert!(
        eventually(Duration::from_secs(10), || async {
            let lines = log_lines_containing(&env.topic);
            let count = |msg: &str| lines.iter().filter(|l| l.contains(msg)).count();
            count("\"msg\":\"partition actor started\"")
                == count("\"msg\":\"partition actor stopped\"") + 2
        })
        .await,
        "only the two current partition actors are running"
    );
    first.stop().await;

    let in_ledger: HashSet<String> = env
        .db
        .query("SELECT event_id FROM events", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let produced: HashSet<String> = (0..total).map(|i| format!("e{i}")).collect();
    assert_eq!(in_ledger, produced, "every produced event is in the ledger");

    let seen = seen.lock().unwrap().clone();
    let mut per_load: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (load, index) in &seen {
        let arrived = per_load.entry(load.clone()).or_default();
        // A resend of something already delivered is not a reorder; a first arrival must come
        // after every earlier event of its load.
        if !arrived.contains(index) {
            arrived.push(*index);
        }
    }
    let received: HashSet<usize> = per_load.values().flatten().copied().collect();
    assert_eq!(received.len(), total, "the receiver got every event");
    for (load, indexes) in &per_load {
        assert!(
            indexes.windows(2).all(|pair| pair[0] < pair[1]),
            "{load}'s statuses arrived out of order: {indexes:?}"
        );
    }

    assert!(
        !logged(
            "revoked partition did not finish its batch in time; its offset stays where it was stored and the next reader re-reads the batch",
            &env.topic
        )
        .is_empty(),
        "the scenario did revoke partitions from stuck actors"
    );
    assert!(
        log_lines_containing(&env.topic)
            .iter()
            .all(|line| !line.contains("message arrived on the main queue")),
        "partition queues are split before assignment: nothing reaches the main queue"
    );
}
