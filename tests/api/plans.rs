//! Hot-path plans under the statistics that invite a bad one: the plan a claim gets must be
//! bounded by what it returns, whatever the planner believes about the ledger.

use webhook_delivery::ledger::{CLAIM_SETTINGS, CLAIM_STATEMENT};

use crate::helpers::*;

/// The claim's plan for `events` new events of loads L0.. as the claim's own transaction
/// would plan it, custom or generic (`plan_cache_mode`).
async fn claim_plan(env: &TestEnv, events: usize, plan_cache_mode: &str) -> String {
    let keys: Vec<String> = (0..events).map(|i| format!("'new-{i}'")).collect();
    let loads: Vec<String> = (0..events).map(|i| format!("'L{}'", i % 1000)).collect();
    let offsets: Vec<String> = (0..events).map(|i| (1_000_000 + i).to_string()).collect();
    let list = |items: &[String]| items.join(",");
    let statuses = vec!["'matched'".to_owned(); events];
    let payloads = vec!["'\\x7b7d'::bytea".to_owned(); events];
    let script = format!(
        "BEGIN;
         {CLAIM_SETTINGS};
         SET LOCAL plan_cache_mode = {plan_cache_mode};
         PREPARE claim (text, int4, text[], text[], text[], text[], int8[], bytea[]) AS {CLAIM_STATEMENT};
         EXPLAIN EXECUTE claim('t', 0, ARRAY[{keys}]::text[], ARRAY[{keys}]::text[], ARRAY[{loads}]::text[],
                               ARRAY[{statuses}]::text[], ARRAY[{offsets}]::int8[], ARRAY[{payloads}]::bytea[]);
         DEALLOCATE claim;
         ROLLBACK;",
        keys = list(&keys),
        loads = list(&loads),
        statuses = list(&statuses),
        offsets = list(&offsets),
        payloads = list(&payloads),
    );
    env.db
        .simple_query(&script)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claims_predecessor_probe_is_one_index_step_whatever_the_statistics_say() {
    let env = TestEnv::new(1).await;
    env.add_broker("b1", "http://127.0.0.1:9").await;
    // Statistics taken while everything of the broker was delivered (a quiet ledger), then a
    // backlog of 20,000 pending deliveries over 1,000 loads. With statistics like these the
    // planner has read all of a broker's pending rows and sorted them once per new delivery
    // (3.8 s claims in the onebroker benchmark, docs/performance.md, "The claim's probe,
    // whatever the statistics say"); this server may or may not choose that plan here, so the
    // test checks the settings that rule it out keep the one-step probe and add no JIT.
    env.db
        .batch_execute(
            "INSERT INTO broker_subscriptions (broker_id, load_id)
             SELECT 'b1', 'L' || g FROM generate_series(0, 999) g;
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset, state)
             SELECT 'done-' || g, 'b1', 'L' || (g % 1000), 0, g, 'delivered' FROM generate_series(1, 5000) g;
             ANALYZE deliveries;
             INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
             SELECT 'old-' || g, 'b1', 'L' || (g % 1000), 0, 5000 + g FROM generate_series(1, 20000) g",
        )
        .await
        .unwrap();
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let plan = claim_plan(&env, 500, mode).await;
        assert!(
            plan.contains("Backward using deliveries_pending_by_load on deliveries p"),
            "{mode}: the probe steps back on deliveries_pending_by_load:\n{plan}"
        );
        assert!(
            !plan.contains("Sort Key: p.kafka_offset"),
            "{mode}: the probe sorts nothing:\n{plan}"
        );
        assert!(!plan.contains("JIT"), "{mode}: no JIT:\n{plan}");
    }
}
