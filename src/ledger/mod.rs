//! The Postgres ledger: the only module that speaks SQL. Every statement is parameterized; batch
//! statements pass arrays through `unnest` so one poll batch is one round trip (docs/design.md 6).

mod dead_letters;
mod migrations;
mod reports;

pub use dead_letters::{DeadLetter, ReplayOutcome, ReplaySelector};
pub use reports::{AttemptStory, BrokerStatus, DeliveryStory, DuplicateDelivery, EventStory};

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::event::{IdempotencyKey, ShipmentEvent};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("invalid postgres url")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("could not build the connection pool: {0}")]
    PoolBuild(String),
    #[error("no database connection available")]
    Pool(#[source] deadpool_postgres::PoolError),
    #[error("database query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("migration {version} failed")]
    Migration {
        version: i32,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl LedgerError {
    /// Retryable errors are the database being away or busy; callers back off and try again
    /// (never skip). Anything else is a bug or a broken schema and is worth a loud log.
    pub fn is_retryable(&self) -> bool {
        match self {
            LedgerError::Pool(_) => true,
            LedgerError::Query(e) => {
                e.is_closed()
                    || e.as_db_error().is_none_or(|db| {
                        let code = db.code().code();
                        // 08: connection exception, 40: transaction rollback (serialization, deadlock),
                        // 53: insufficient resources, 57P: operator intervention (e.g. shutdown).
                        code.starts_with("08")
                            || code.starts_with("40")
                            || code.starts_with("53")
                            || code.starts_with("57P")
                    })
            }
            _ => false,
        }
    }
}

/// tokio-postgres says only "db error" at the top; the server's message and SQLSTATE are what
/// on-call needs in the log line.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// A message that is not a valid event, kept for diagnosis.
#[derive(Debug, Clone)]
pub struct RejectedMessage {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// Already capped by the caller.
    pub raw_value: Option<Vec<u8>>,
    pub value_bytes: i32,
    pub error: String,
}

/// A delivery that still has to be sent, with what sending it needs.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    pub delivery_id: i64,
    pub key: IdempotencyKey,
    pub broker_id: String,
    pub load_id: String,
    pub event_id: Option<String>,
    pub partition: i32,
    pub offset: i64,
    /// Attempts already made.
    pub attempts: u32,
    /// How long until it may be attempted (zero when due), by the database's clock.
    pub due_in: Duration,
    pub payload: Bytes,
}

/// A delivery created by a claim. `pending_predecessor_offset` is the offset of the newest
/// earlier delivery of the same (broker, load) that was still pending when it was claimed: it
/// must not be sent before that one. `claimed_at` is taken before the claim was sent, so it is
/// no later than the commit (the scheduler distrusts claims older than its last ledger page).
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery: PendingDelivery,
    pub pending_predecessor_offset: Option<i64>,
    pub claimed_at: std::time::Instant,
}

#[derive(Debug, Clone)]
pub struct BrokerRow {
    pub broker_id: String,
    pub webhook_url: String,
    pub signing_secret: String,
    pub enabled: bool,
}

/// What happened to one attempt, ready to be written.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub broker_id: String,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub latency: Duration,
    pub status_code: Option<u16>,
    pub error_class: Option<&'static str>,
    pub error_message: Option<String>,
    pub outcome: AttemptOutcome,
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Delivered,
    RetryIn(Duration),
    Dead { reason: String },
}

impl AttemptOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::RetryIn(_) => "retry",
            AttemptOutcome::Dead { .. } => "dead",
        }
    }
}

/// One breaker transition, as stored in `broker_circuits`.
#[derive(Debug, Clone)]
pub struct CircuitRecord {
    pub broker_id: String,
    pub state: &'static str,
    pub since: DateTime<Utc>,
    pub consecutive_failures: u32,
    pub open_until: Option<DateTime<Utc>>,
    pub reason: String,
    pub instance_id: String,
}

#[derive(Clone)]
pub struct Ledger {
    pool: Pool,
}

impl Ledger {
    pub fn connect_lazy(url: &str, pool_size: usize) -> Result<Ledger, LedgerError> {
        let config = tokio_postgres::Config::from_str(url).map_err(LedgerError::InvalidUrl)?;
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| LedgerError::PoolBuild(e.to_string()))?;
        Ok(Ledger { pool })
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        self.pool.get().await.map_err(LedgerError::Pool)
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Records the events of one poll batch and creates a pending delivery for every enabled
    /// subscribed broker, in one statement. Returns only the deliveries this call created: a
    /// redelivered or re-produced event creates none (docs/design.md 1).
    pub async fn claim_batch(
        &self,
        topic: &str,
        partition: i32,
        events: &[(i64, ShipmentEvent)],
    ) -> Result<Vec<ClaimedDelivery>, LedgerError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let claimed_at = std::time::Instant::now();
        let keys: Vec<&str> = events.iter().map(|(_, e)| e.key.as_str()).collect();
        let event_ids: Vec<Option<&str>> =
            events.iter().map(|(_, e)| e.event_id.as_deref()).collect();
        let load_ids: Vec<&str> = events.iter().map(|(_, e)| e.load_id.as_str()).collect();
        let statuses: Vec<&str> = events.iter().map(|(_, e)| e.status.as_str()).collect();
        let offsets: Vec<i64> = events.iter().map(|(offset, _)| *offset).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|(_, e)| &e.payload[..]).collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH input AS (
                     SELECT * FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::bytea[])
                         AS t(idempotency_key, event_id, load_id, status, kafka_offset, payload)
                 ),
                 new_events AS (
                     INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition, kafka_offset, payload)
                     SELECT DISTINCT ON (idempotency_key)
                            idempotency_key, event_id, load_id, status, $1, $2, kafka_offset, payload
                     FROM input ORDER BY idempotency_key, kafka_offset
                     ON CONFLICT (idempotency_key) DO NOTHING
                 ),
                 targets AS (
                     SELECT DISTINCT ON (i.idempotency_key, s.broker_id)
                            i.idempotency_key, s.broker_id, i.load_id, i.kafka_offset
                     FROM input i
                     JOIN broker_subscriptions s ON s.load_id = i.load_id
                     JOIN brokers b ON b.broker_id = s.broker_id AND b.enabled
                     ORDER BY i.idempotency_key, s.broker_id, i.kafka_offset
                 ),
                 inserted AS (
                     INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
                     SELECT idempotency_key, broker_id, load_id, $2, kafka_offset FROM targets
                     ON CONFLICT (idempotency_key, broker_id) DO NOTHING
                     RETURNING delivery_id, idempotency_key, broker_id, load_id, kafka_offset
                 )
                 -- The subquery sees the ledger as it was before this statement: earlier rows only.
                 SELECT n.delivery_id, n.idempotency_key, n.broker_id, n.load_id, n.kafka_offset,
                        (SELECT max(p.kafka_offset) FROM deliveries p
                         WHERE p.broker_id = n.broker_id AND p.load_id = n.load_id
                           AND p.state = 'pending') AS pending_predecessor_offset
                 FROM inserted n
                 ORDER BY n.kafka_offset, n.broker_id",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &topic, &partition, &keys, &event_ids, &load_ids, &statuses, &offsets,
                    &payloads,
                ],
            )
            .await?;
        let by_key: HashMap<&str, &ShipmentEvent> =
            events.iter().map(|(_, e)| (e.key.as_str(), e)).collect();
        Ok(rows
            .iter()
            .map(|row| {
                let key: String = row.get(1);
                let event = by_key[key.as_str()];
                ClaimedDelivery {
                    delivery: PendingDelivery {
                        delivery_id: row.get(0),
                        key: event.key.clone(),
                        broker_id: row.get(2),
                        load_id: row.get(3),
                        event_id: event.event_id.clone(),
                        partition,
                        offset: row.get(4),
                        attempts: 0,
                        due_in: Duration::ZERO,
                        payload: event.payload.clone(),
                    },
                    pending_predecessor_offset: row.get(5),
                    claimed_at,
                }
            })
            .collect())
    }

    /// Keeps messages that are not valid events. Idempotent per (topic, partition, offset).
    pub async fn record_rejected(
        &self,
        topic: &str,
        partition: i32,
        rejected: &[RejectedMessage],
    ) -> Result<(), LedgerError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let offsets: Vec<i64> = rejected.iter().map(|r| r.offset).collect();
        let keys: Vec<Option<&[u8]>> = rejected.iter().map(|r| r.key.as_deref()).collect();
        let values: Vec<Option<&[u8]>> = rejected.iter().map(|r| r.raw_value.as_deref()).collect();
        let sizes: Vec<i32> = rejected.iter().map(|r| r.value_bytes).collect();
        let errors: Vec<&str> = rejected.iter().map(|r| r.error.as_str()).collect();
        self.client()
            .await?
            .execute(
                "INSERT INTO rejected_messages (topic, kafka_partition, kafka_offset, message_key, raw_value, value_bytes, error)
                 SELECT $1, $2, * FROM unnest($3::int8[], $4::bytea[], $5::bytea[], $6::int4[], $7::text[])
                 ON CONFLICT DO NOTHING",
                &[&topic, &partition, &offsets, &keys, &values, &sizes, &errors],
            )
            .await?;
        Ok(())
    }

    /// The oldest pending deliveries of one broker in the given partitions, in offset order,
    /// skipping the ones the caller already holds. Not-yet-due rows are included (with `due_in`)
    /// so that every load's deliveries come back as an unbroken prefix, which is what keeps
    /// per-load order (docs/design.md 4): a load lives in one partition, and a LIMIT over offset
    /// order cuts each partition's rows at one offset. Offset order (rather than partition, then
    /// offset) lets the index `deliveries_pending_by_offset` stop at the LIMIT without a sort.
    /// One page of a broker's pending deliveries in `partitions`, in (partition, offset) order,
    /// after `after`: a range scan of `deliveries_pending` bounded by `limit`. The scheduler
    /// walks the pages with a cursor, so rows it cannot use now (behind a retry) never hide the
    /// ones it can.
    pub async fn pending_for_broker(
        &self,
        broker_id: &str,
        partitions: &[i32],
        after: Option<(i32, i64)>,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, LedgerError> {
        let (after_partition, after_offset) = after.unwrap_or((i32::MIN, i64::MIN));
        let fetch = i64::try_from(limit).unwrap_or(i64::MAX);
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT d.delivery_id, d.idempotency_key, d.load_id, d.kafka_partition, d.kafka_offset,
                        d.attempts, GREATEST(0, (EXTRACT(EPOCH FROM (d.next_attempt_at - now())) * 1000))::int8,
                        e.payload, e.event_id
                 FROM deliveries d JOIN events e ON e.idempotency_key = d.idempotency_key
                 WHERE d.broker_id = $1 AND d.state = 'pending' AND d.kafka_partition = ANY($2)
                   AND (d.kafka_partition, d.kafka_offset) > ($3, $4)
                 ORDER BY d.kafka_partition, d.kafka_offset
                 LIMIT $5",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &broker_id,
                    &partitions,
                    &after_partition,
                    &after_offset,
                    &fetch,
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| PendingDelivery {
                delivery_id: row.get(0),
                key: IdempotencyKey::from_stored(row.get(1)),
                broker_id: broker_id.to_owned(),
                load_id: row.get(2),
                partition: row.get(3),
                offset: row.get(4),
                attempts: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
                due_in: Duration::from_millis(u64::try_from(row.get::<_, i64>(6)).unwrap_or(0)),
                payload: Bytes::from(row.get::<_, Vec<u8>>(7)),
                event_id: row.get(8),
            })
            .collect())
    }

    /// Brokers with pending deliveries in the given partitions that have been due for longer
    /// than `overdue_for`: the ledger sweep's safety net. Deliveries a DeliveryActor holds are
    /// normally sent within moments of coming due, so only work nobody holds (a replay, a row
    /// forgotten after a restart) stays overdue, and healthy brokers are left alone.
    pub async fn brokers_with_overdue_work(
        &self,
        partitions: &[i32],
        overdue_for: Duration,
    ) -> Result<Vec<String>, LedgerError> {
        let overdue_ms = i64::try_from(overdue_for.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .client()
            .await?
            .query(
                "SELECT DISTINCT broker_id FROM deliveries
                 WHERE state = 'pending' AND kafka_partition = ANY($1)
                   AND next_attempt_at <= now() - $2::int8 * interval '1 millisecond'",
                &[&partitions, &overdue_ms],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    pub async fn broker(&self, broker_id: &str) -> Result<Option<BrokerRow>, LedgerError> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT broker_id, webhook_url, signing_secret, enabled FROM brokers WHERE broker_id = $1",
                &[&broker_id],
            )
            .await?;
        Ok(row.map(|row| BrokerRow {
            broker_id: row.get(0),
            webhook_url: row.get(1),
            signing_secret: row.get(2),
            enabled: row.get(3),
        }))
    }

    /// Writes a batch of attempt outcomes in one statement: the attempts history and the new
    /// state of each delivery. A delivery that is no longer pending is left as it is.
    pub async fn record_attempts(&self, records: &[AttemptRecord]) -> Result<(), LedgerError> {
        if records.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = records.iter().map(|r| r.delivery_id).collect();
        let brokers: Vec<&str> = records.iter().map(|r| r.broker_id.as_str()).collect();
        let attempts: Vec<i32> = records
            .iter()
            .map(|r| i32::try_from(r.attempt).unwrap_or(i32::MAX))
            .collect();
        let started: Vec<DateTime<Utc>> = records.iter().map(|r| r.started_at).collect();
        let latencies: Vec<i32> = records
            .iter()
            .map(|r| i32::try_from(r.latency.as_millis()).unwrap_or(i32::MAX))
            .collect();
        let codes: Vec<Option<i32>> = records
            .iter()
            .map(|r| r.status_code.map(i32::from))
            .collect();
        let classes: Vec<Option<&str>> = records.iter().map(|r| r.error_class).collect();
        let messages: Vec<Option<&str>> =
            records.iter().map(|r| r.error_message.as_deref()).collect();
        let outcomes: Vec<&str> = records.iter().map(|r| r.outcome.as_str()).collect();
        let retry_in: Vec<Option<i64>> = records
            .iter()
            .map(|r| match r.outcome {
                AttemptOutcome::RetryIn(delay) => {
                    Some(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
                }
                _ => None,
            })
            .collect();
        let dead_reasons: Vec<Option<&str>> = records
            .iter()
            .map(|r| match &r.outcome {
                AttemptOutcome::Dead { reason } => Some(reason.as_str()),
                _ => None,
            })
            .collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH input AS (
                     SELECT * FROM unnest($1::int8[], $2::text[], $3::int4[], $4::timestamptz[], $5::int4[],
                                          $6::int4[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::text[])
                         AS t(delivery_id, broker_id, attempt, started_at, latency_ms, status_code,
                              error_class, error_message, outcome, retry_in_ms, dead_reason)
                 ),
                 history AS (
                     INSERT INTO delivery_attempts (delivery_id, broker_id, attempt, started_at, latency_ms,
                                                    status_code, error_class, error_message, outcome)
                     SELECT delivery_id, broker_id, attempt, started_at, latency_ms, status_code,
                            error_class, error_message, outcome
                     FROM input
                 )
                 UPDATE deliveries d SET
                     state = CASE i.outcome WHEN 'retry' THEN 'pending' ELSE i.outcome END,
                     attempts = i.attempt,
                     next_attempt_at = CASE WHEN i.outcome = 'retry'
                                            THEN now() + i.retry_in_ms * interval '1 millisecond'
                                            ELSE d.next_attempt_at END,
                     last_status_code = i.status_code,
                     last_error = i.error_message,
                     dead_reason = i.dead_reason,
                     delivered_at = CASE WHEN i.outcome = 'delivered' THEN now() END,
                     updated_at = now()
                 FROM input i
                 WHERE d.delivery_id = i.delivery_id AND d.state = 'pending'",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &ids,
                    &brokers,
                    &attempts,
                    &started,
                    &latencies,
                    &codes,
                    &classes,
                    &messages,
                    &outcomes,
                    &retry_in,
                    &dead_reasons,
                ],
            )
            .await?;
        Ok(())
    }

    /// Records a breaker transition (the latest one per broker wins).
    pub async fn record_circuit(&self, circuit: &CircuitRecord) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO broker_circuits (broker_id, state, since, consecutive_failures, open_until, reason, instance_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (broker_id) DO UPDATE SET
                     state = EXCLUDED.state, since = EXCLUDED.since,
                     consecutive_failures = EXCLUDED.consecutive_failures,
                     open_until = EXCLUDED.open_until, reason = EXCLUDED.reason,
                     instance_id = EXCLUDED.instance_id",
                &[
                    &circuit.broker_id,
                    &circuit.state,
                    &circuit.since,
                    &i32::try_from(circuit.consecutive_failures).unwrap_or(i32::MAX),
                    &circuit.open_until,
                    &circuit.reason,
                    &circuit.instance_id,
                ],
            )
            .await?;
        Ok(())
    }

    /// A broker answered 410 Gone: stop sending to it until someone re-enables it.
    pub async fn disable_broker(&self, broker_id: &str, reason: &str) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "UPDATE brokers SET enabled = false, disabled_reason = $2 WHERE broker_id = $1",
                &[&broker_id, &reason],
            )
            .await?;
        Ok(())
    }

    /// Takes or renews the lease on a partition. Returns false while another live instance holds it.
    pub async fn acquire_lease(
        &self,
        topic: &str,
        partition: i32,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, LedgerError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let row = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO partition_leases (topic, kafka_partition, owner_id, expires_at)
                 VALUES ($1, $2, $3, now() + $4::int8 * interval '1 millisecond')
                 ON CONFLICT (topic, kafka_partition) DO UPDATE
                     SET owner_id = EXCLUDED.owner_id, expires_at = EXCLUDED.expires_at
                     WHERE partition_leases.owner_id = EXCLUDED.owner_id
                        OR partition_leases.expires_at < now()
                 RETURNING owner_id",
                &[&topic, &partition, &owner, &lease_ms],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Gives a lease up early: it ends `linger` from now, long enough for requests already in
    /// flight to finish, so the next owner never overlaps with them.
    pub async fn release_lease(
        &self,
        topic: &str,
        partition: i32,
        owner: &str,
        linger: Duration,
    ) -> Result<(), LedgerError> {
        let linger_ms = i64::try_from(linger.as_millis()).unwrap_or(i64::MAX);
        self.client()
            .await?
            .execute(
                "UPDATE partition_leases
                 SET expires_at = LEAST(expires_at, now() + $4::int8 * interval '1 millisecond')
                 WHERE topic = $1 AND kafka_partition = $2 AND owner_id = $3",
                &[&topic, &partition, &owner, &linger_ms],
            )
            .await?;
        Ok(())
    }
}
