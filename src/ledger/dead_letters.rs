//! Dead letters: listing them and putting them back in the queue (replay).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Ledger, LedgerError};
use crate::core::event::IdempotencyKey;
use crate::core::signing::webhook_id;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub delivery_id: i64,
    pub broker_id: String,
    pub load_id: String,
    pub event_id: Option<String>,
    pub webhook_id: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub dead_reason: Option<String>,
    pub died_at: DateTime<Utc>,
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum ReplaySelector {
    Delivery(i64),
    Broker {
        broker_id: String,
        since: Option<DateTime<Utc>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOutcome {
    /// These deliveries are pending again, with a fresh attempt budget and the same webhook-id.
    Requeued(Vec<i64>),
    NotFound,
    /// Refused: it was delivered; sending it again would be a duplicate.
    AlreadyDelivered,
    /// Nothing to do: it is still being delivered.
    StillPending,
}

impl Ledger {
    pub async fn dead_letters(
        &self,
        broker_id: Option<&str>,
        since: Option<DateTime<Utc>>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, LedgerError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT d.delivery_id, d.broker_id, d.load_id, e.event_id, d.idempotency_key, d.attempts,
                        d.last_status_code, d.last_error, d.dead_reason, d.updated_at
                 FROM deliveries d JOIN events e ON e.idempotency_key = d.idempotency_key
                 WHERE d.state = 'dead'
                   AND ($1::text IS NULL OR d.broker_id = $1)
                   AND ($2::timestamptz IS NULL OR d.updated_at >= $2)
                 ORDER BY d.updated_at, d.delivery_id
                 LIMIT $3",
                &[&broker_id, &since, &limit],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| DeadLetter {
                delivery_id: row.get(0),
                broker_id: row.get(1),
                load_id: row.get(2),
                event_id: row.get(3),
                webhook_id: webhook_id(&IdempotencyKey::from_stored(row.get(4))),
                attempts: row.get(5),
                last_status_code: row.get(6),
                last_error: row.get(7),
                dead_reason: row.get(8),
                died_at: row.get(9),
            })
            .collect())
    }

    /// Re-queues dead deliveries: pending, due now, attempts reset. A running service picks
    /// them up within a few seconds (the ledger sweep). Delivered rows are never touched.
    pub async fn replay(&self, selector: &ReplaySelector) -> Result<ReplayOutcome, LedgerError> {
        let client = self.client().await?;
        const REQUEUE: &str = "state = 'pending', attempts = 0, next_attempt_at = now(),
                               dead_reason = NULL, updated_at = now()";
        // Delivered to every running instance when this commits (identical notifications of one
        // transaction are delivered once): each tells that broker's scheduler, so a replayed
        // delivery goes before later deliveries of its load, whichever process replayed it. A
        // broker id too long for a notification (a row no broker could be sent to anyway)
        // announces to every broker instead.
        const ANNOUNCE: &str = "pg_notify('webhook_delivery_replays',
                                          CASE WHEN octet_length(broker_id) <= 1024 THEN broker_id ELSE '' END)";
        match selector {
            ReplaySelector::Delivery(id) => {
                let Some(row) = client
                    .query_opt("SELECT state FROM deliveries WHERE delivery_id = $1", &[id])
                    .await?
                else {
                    return Ok(ReplayOutcome::NotFound);
                };
                match row.get::<_, &str>(0) {
                    "delivered" => Ok(ReplayOutcome::AlreadyDelivered),
                    "pending" => Ok(ReplayOutcome::StillPending),
                    _ => {
                        let rows = client
                            .query(
                                &format!("WITH requeued AS (UPDATE deliveries SET {REQUEUE} WHERE delivery_id = $1 AND state = 'dead' RETURNING delivery_id, broker_id)
                                          SELECT delivery_id, {ANNOUNCE} FROM requeued"),
                                &[id],
                            )
                            .await?;
                        Ok(ReplayOutcome::Requeued(
                            rows.iter().map(|r| r.get(0)).collect(),
                        ))
                    }
                }
            }
            ReplaySelector::Broker { broker_id, since } => {
                let rows = client
                    .query(
                        &format!(
                            "WITH requeued AS (
                                 UPDATE deliveries SET {REQUEUE}
                                 WHERE broker_id = $1 AND state = 'dead'
                                   AND ($2::timestamptz IS NULL OR updated_at >= $2)
                                 RETURNING delivery_id, broker_id
                             )
                             SELECT delivery_id, {ANNOUNCE} FROM requeued"
                        ),
                        &[broker_id, since],
                    )
                    .await?;
                Ok(ReplayOutcome::Requeued(
                    rows.iter().map(|r| r.get(0)).collect(),
                ))
            }
        }
    }
}

/// Which brokers' replays committed since the last look.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReplayedBrokers {
    pub brokers: std::collections::BTreeSet<String>,
    /// A replay whose broker id could not be announced: every broker should look.
    pub every_broker: bool,
}

#[derive(Default)]
struct Announced {
    replayed: ReplayedBrokers,
    closed: bool,
}

/// Replays committed by any process (the CLI, the admin API, another instance), as they commit.
/// Each `next` returns the brokers whose replays committed since the previous call; memory is
/// bounded by the number of brokers. Ends when its connection does.
pub struct ReplayAnnouncements {
    /// Kept so that the connection, and with it the LISTEN, stays open.
    _client: tokio_postgres::Client,
    announced: std::sync::Arc<std::sync::Mutex<Announced>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl ReplayAnnouncements {
    pub async fn next(&mut self) -> Option<ReplayedBrokers> {
        loop {
            {
                let mut announced = lock(&self.announced);
                if announced.replayed != ReplayedBrokers::default() {
                    return Some(std::mem::take(&mut announced.replayed));
                }
                if announced.closed {
                    return None;
                }
            }
            self.wake.notified().await;
        }
    }
}

fn lock(announced: &std::sync::Mutex<Announced>) -> std::sync::MutexGuard<'_, Announced> {
    announced
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Ledger {
    /// Listens for replay announcements on a connection of its own: LISTEN needs one that stays
    /// open, which a pooled connection does not.
    pub async fn replays_announced(&self) -> Result<ReplayAnnouncements, LedgerError> {
        use futures::StreamExt;
        let (client, mut connection) = self.config.connect(self.tls.clone()).await?;
        let announced = std::sync::Arc::new(std::sync::Mutex::new(Announced::default()));
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let (writer, waker) = (announced.clone(), wake.clone());
        tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(notification) = message {
                    let replayed = &mut lock(&writer).replayed;
                    match notification.payload() {
                        "" => replayed.every_broker = true,
                        broker_id => {
                            replayed.brokers.insert(broker_id.to_owned());
                        }
                    }
                    waker.notify_one();
                }
            }
            lock(&writer).closed = true;
            waker.notify_one();
        });
        client
            .batch_execute("LISTEN webhook_delivery_replays")
            .await?;
        Ok(ReplayAnnouncements {
            _client: client,
            announced,
            wake,
        })
    }
}
