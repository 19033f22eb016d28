use std::time::Duration;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_messages_are_recorded_and_the_partition_keeps_flowing() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;

    env.produce_event(Some("good-1"), "L1", "matched").await;
    env.produce(Some("L1"), b"{not json").await;
    env.produce(Some("L1"), &[b'{', 0xff, 0xfe, b'}']).await;
    env.produce(Some("L1"), &vec![b' '; 2048]).await;
    env.produce(Some("L1"), b"[1, 2, 3]").await;
    env.produce(Some("L1"), br#"{"loadId": 42, "status": "matched"}"#)
        .await;
    env.produce(None, br#"{"status": "matched"}"#).await;
    env.produce_event(Some("good-2"), "L1", "delivered").await;

    let mut settings = env.settings();
    settings.delivery.max_message_bytes = 1024;
    let app = spawn_app(settings);
    assert!(
        eventually(Duration::from_secs(30), || async {
            received(&receiver).await.len() == 2
        })
        .await,
        "both good events are delivered around the poison"
    );
    assert!(
        eventually(Duration::from_secs(15), || async {
            env.committed_offsets(1) == vec![8]
        })
        .await,
        "the committed offset moves past every message"
    );
    app.stop().await;

    let rows = env
        .db
        .query(
            "SELECT kafka_offset, error, value_bytes FROM rejected_messages ORDER BY kafka_offset",
            &[],
        )
        .await
        .unwrap();
    let rejected: Vec<(i64, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(rejected.len(), 6, "{rejected:?}");
    assert!(rejected[0].1.contains("not valid JSON"));
    assert!(rejected[1].1.contains("UTF-8"));
    assert!(rejected[2].1.contains("above the limit"));
    assert!(rejected[3].1.contains("not an object"));
    assert!(rejected[4].1.contains("loadId"));
    assert!(rejected[5].1.contains("loadId"));
    let oversized_size: i32 = rows[2].get(2);
    assert_eq!(oversized_size, 2048);
}
