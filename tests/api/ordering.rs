use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wiremock::matchers::method;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use webhook_delivery::config::OutcomeCommit;

use crate::helpers::*;

/// (load, status, sequence, answered status, when).
type Seen = Vec<(String, String, i64, u16, Instant)>;

/// Fails every request for `failing_load` until it has failed `failures` times; records every
/// request as (load, status, sequence, answered status, when).
struct FlakyForOneLoad {
    failing_load: &'static str,
    failures: usize,
    seen: Arc<Mutex<Seen>>,
}

impl Respond for FlakyForOneLoad {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let load = body["loadId"].as_str().unwrap().to_owned();
        let status = body["status"].as_str().unwrap().to_owned();
        let sequence = header(request, "webhook-sequence").parse().unwrap();
        let mut seen = self.seen.lock().unwrap();
        let failed_so_far = seen
            .iter()
            .filter(|(l, _, _, code, _)| l == self.failing_load && *code != 200)
            .count();
        let code = if load == self.failing_load && failed_so_far < self.failures {
            503
        } else {
            200
        };
        seen.push((load, status, sequence, code, Instant::now()));
        ResponseTemplate::new(code)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loads_statuses_arrive_in_order_even_across_retries_without_holding_up_other_loads() {
    statuses_arrive_in_order_across_retries(OutcomeCommit::Durable).await;
}

/// The same with outcomes committed before their WAL flush (`postgres.outcome_commit`): a
/// load's next delivery goes out sooner, and still only after the previous one's outcome is
/// committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_across_retries_with_asynchronous_outcome_commits() {
    statuses_arrive_in_order_across_retries(OutcomeCommit::Async).await;
}

async fn statuses_arrive_in_order_across_retries(outcome_commit: OutcomeCommit) {
    let env = TestEnv::new(2).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(FlakyForOneLoad {
            failing_load: "L-flaky",
            failures: 3,
            seen: seen.clone(),
        })
        .mount(&server)
        .await;
    env.add_broker("b1", &server.uri()).await;
    env.subscribe("b1", "L-flaky").await;
    env.subscribe("b1", "L-steady").await;
    let statuses = ["matched", "accepted", "in_transit", "delivered"];
    for status in statuses {
        env.produce_event(Some(&format!("flaky-{status}")), "L-flaky", status)
            .await;
        env.produce_event(Some(&format!("steady-{status}")), "L-steady", status)
            .await;
    }
    let mut settings = env.settings();
    settings.retry.base_delay_ms = 300;
    settings.retry.max_delay_ms = 300;
    settings.circuit_breaker.failure_threshold = 100;
    settings.postgres.outcome_commit = outcome_commit;

    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            8,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;

    let seen = seen.lock().unwrap().clone();
    let of = |load: &str| -> Vec<_> { seen.iter().filter(|r| r.0 == load).cloned().collect() };
    let flaky = of("L-flaky");
    assert_eq!(flaky.len(), 7, "3 failures then 4 deliveries: {flaky:?}");
    assert!(
        flaky[..4].iter().all(|r| r.1 == "matched"),
        "nothing overtakes the failing first status: {flaky:?}"
    );
    let delivered: Vec<&str> = flaky
        .iter()
        .filter(|r| r.3 == 200)
        .map(|r| r.1.as_str())
        .collect();
    assert_eq!(delivered, statuses);
    let steady = of("L-steady");
    assert_eq!(steady.len(), 4);
    assert_eq!(
        steady.iter().map(|r| r.1.as_str()).collect::<Vec<_>>(),
        statuses
    );
    let flaky_recovered_at = flaky[3].4;
    assert!(
        steady.iter().all(|r| r.4 < flaky_recovered_at),
        "the other load was not held up by the failing one"
    );
    for load in [&flaky, &steady] {
        let sequences: Vec<i64> = load.iter().filter(|r| r.3 == 200).map(|r| r.2).collect();
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "webhook-sequence only grows per load: {sequences:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_a_secret_rotation_every_active_secret_signs() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    let new_secret = "whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB";
    env.db
        .execute(
            "INSERT INTO brokers (broker_id, webhook_url, signing_secret) VALUES ('b1', $1, $2)",
            &[&receiver.uri(), &format!("{SECRET} {new_secret}")],
        )
        .await
        .unwrap();
    env.subscribe("b1", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    let app = spawn_app(env.settings());
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&receiver).await.len() == 1
        })
        .await
    );
    app.stop().await;
    let request = &received(&receiver).await[0];
    assert_eq!(header(request, "webhook-signature").split(' ').count(), 2);
    for secret in [SECRET, new_secret] {
        let key = secret.trim_start_matches("whsec_");
        assert!(
            log_lines_containing(key).is_empty(),
            "secrets never appear in logs"
        );
        standardwebhooks::Webhook::new(secret)
            .unwrap()
            .verify(&request.body, &request.headers)
            .expect("each secret verifies on its own (standardwebhooks crate)");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_when_most_deliveries_wait_in_the_ledger() {
    let env = TestEnv::new(2).await;
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_millis(30)))
        .mount(&server)
        .await;
    env.add_broker("b1", &server.uri()).await;
    let loads = ["L1", "L2", "L3", "L4"];
    for load in loads {
        env.subscribe("b1", load).await;
    }
    for step in 0..6 {
        for load in loads {
            env.produce_event(Some(&format!("{load}-{step}")), load, &format!("s{step}"))
                .await;
        }
    }
    let mut settings = env.settings();
    // Room for 3 of the 24 deliveries: the rest overflow to the ledger and are loaded later.
    settings.delivery.mailbox_capacity = 3;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            24,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
    let requests = received(&server).await;
    assert_eq!(requests.len(), 24, "each delivery exactly once");
    for load in loads {
        let statuses: Vec<String> = requests
            .iter()
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.body).unwrap())
            .filter(|body| body["loadId"] == load)
            .map(|body| body["status"].as_str().unwrap().to_owned())
            .collect();
        let expected: Vec<String> = (0..6).map(|step| format!("s{step}")).collect();
        assert_eq!(statuses, expected, "{load} in order");
    }
}

/// Another instance's claim of the same partition, stuck in its transaction (the partition moved
/// on while it waited on the database): this claim waits for it, then sees its rows, so the
/// pending predecessor it reports is the other claim's delivery of the same load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_of_one_partition_never_overlap_even_across_instances() {
    use webhook_delivery::core::event::{parse_event, EventLimits};
    use webhook_delivery::ledger::Ledger;

    let env = TestEnv::new(1).await;
    env.add_broker("b-overlap", "http://127.0.0.1:9/").await;
    env.subscribe("b-overlap", "L-overlap").await;
    let (other_claim, connection) = tokio_postgres::connect(&env.db_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    other_claim
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(hashtext('{}'), 0)",
            env.topic
        ))
        .await
        .unwrap();

    let limits = EventLimits {
        max_message_bytes: 4096,
        max_event_id_bytes: 256,
        max_load_id_bytes: 256,
        max_status_bytes: 128,
    };
    let event = parse_event(
        Some(br#"{"eventId":"e-later","loadId":"L-overlap","status":"delivered"}"#),
        &limits,
    )
    .unwrap();
    let ledger = Ledger::connect_lazy(&env.db_url, 1).unwrap();
    let topic = env.topic.clone();
    let claim = tokio::spawn(async move { ledger.claim_batch(&topic, 0, &[(9, event)]).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !claim.is_finished(),
        "the claim waits for the other claim of its partition"
    );

    // The stuck claim finishes: an earlier event of the same load, pending for the same broker.
    other_claim
        .batch_execute(&format!(
            "INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition, kafka_offset, payload)
             VALUES ('evt:e-earlier', 'e-earlier', 'L-overlap', 'in_transit', '{topic}', 0, 4, '\\x7b7d');
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
             VALUES ('evt:e-earlier', 'b-overlap', 'L-overlap', 0, 4);
             COMMIT",
            topic = env.topic
        ))
        .await
        .unwrap();
    let claimed = claim.await.unwrap().unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        claimed[0].pending_predecessor_offset,
        Some(4),
        "the later claim sees the earlier claim's delivery as the load's pending predecessor"
    );
}
