//! The ORIGINAL consumer, ported faithfully so the service can be compared with what it
//! replaced. Do not fix it: its flaws are what the benchmark measures.
//!
//! - rdkafka consumer with auto-commit and the default auto offset store: an offset counts as
//!   done as soon as the message is polled, whatever happens to its webhooks;
//! - per event, the subscribers are looked up with a string-built SQL query;
//! - webhooks are POSTed to each subscriber in turn, each waiting up to 5 s;
//! - on any failure the whole event is re-run for every subscriber, including those that
//!   already accepted it (bounded here to `MAX_RERUNS` so the benchmark terminates);
//! - no idempotency: no webhook-id, no record of what was sent.

use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::ClientConfig;
use serde::Deserialize;
use tokio_postgres::NoTls;
use webhook_delivery::config::Settings;

use crate::error::BenchError;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The original recursed without limit; a few levels keep a benchmark run finite.
const MAX_RERUNS: u32 = 3;

#[derive(Deserialize)]
struct ShipmentEvent {
    #[serde(rename = "loadId")]
    load_id: String,
}

struct OriginalConsumer {
    db: tokio_postgres::Client,
    http: reqwest::Client,
}

/// Consumes until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> Result<(), BenchError> {
    let kafka = &settings.kafka;
    let mut config = ClientConfig::new();
    for (key, value) in &kafka.client {
        config.set(key, value);
    }
    let consumer: StreamConsumer = config
        .set("bootstrap.servers", &kafka.brokers)
        .set("group.id", &kafka.group_id)
        .set("enable.auto.commit", "true")
        // The old consumer read a new group from the start of the topic; the service's own
        // settings no longer carry this property (it sets it itself, docs/decisions.md).
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", kafka.session_timeout_ms.to_string())
        .set(
            "max.poll.interval.ms",
            kafka.max_poll_interval_ms.to_string(),
        )
        .create()
        .map_err(|e| BenchError::kafka("creating the baseline consumer", e))?;
    consumer
        .subscribe(&[&kafka.topic])
        .map_err(|e| BenchError::kafka("subscribing the baseline consumer", e))?;
    let (db, connection) = tokio_postgres::connect(&settings.postgres.url, NoTls)
        .await
        .map_err(|e| BenchError::postgres("baseline connecting to postgres", e))?;
    tokio::spawn(connection);
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|source| BenchError::Http {
            context: "building the baseline's client".into(),
            source,
        })?;
    let original = OriginalConsumer { db, http };
    tokio::select! {
        () = original.consume(&consumer) => {}
        _ = shutdown => {}
    }
    Ok(())
}

impl OriginalConsumer {
    /// The poll loop; ends only when the caller stops polling it.
    async fn consume(&self, consumer: &StreamConsumer) {
        loop {
            let message = match consumer.recv().await {
                Ok(message) => message,
                Err(error) => {
                    eprintln!("baseline: poll failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(payload) = message.payload() else {
                continue;
            };
            let Ok(event) = serde_json::from_slice::<ShipmentEvent>(payload) else {
                continue;
            };
            self.handle_event(&event.load_id, payload, 0).await;
        }
    }

    /// Looks up the subscribers and posts to each in turn; any failure re-runs all of it.
    async fn handle_event(&self, load_id: &str, payload: &[u8], rerun: u32) {
        let mut failed = false;
        match self.subscribers(load_id).await {
            Ok(brokers) => {
                for (broker_id, webhook_url) in brokers {
                    if !self.post(&webhook_url, payload).await {
                        eprintln!("baseline: webhook to {broker_id} failed (load {load_id})");
                        failed = true;
                    }
                }
            }
            Err(error) => {
                eprintln!("baseline: subscriber lookup failed: {error}");
                failed = true;
            }
        }
        if failed && rerun < MAX_RERUNS {
            Box::pin(self.handle_event(load_id, payload, rerun + 1)).await;
        }
    }

    async fn subscribers(
        &self,
        load_id: &str,
    ) -> Result<Vec<(String, String)>, tokio_postgres::Error> {
        // String-built, as the original was (an injection risk the service removed).
        let sql = format!(
            "SELECT b.broker_id, b.webhook_url FROM broker_subscriptions s \
             JOIN brokers b ON b.broker_id = s.broker_id \
             WHERE s.load_id = '{load_id}' AND b.enabled"
        );
        let rows = self.db.query(sql.as_str(), &[]).await?;
        Ok(rows.iter().map(|row| (row.get(0), row.get(1))).collect())
    }

    async fn post(&self, url: &str, payload: &[u8]) -> bool {
        let sent = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .body(payload.to_vec())
            .send()
            .await;
        matches!(sent, Ok(response) if response.status().is_success())
    }
}
