//! Read-only reports for operators: per-broker health (`status`), webhooks delivered more than
//! once in a time window (`report duplicates`), and the full story of one event
//! (`report deliveries`).

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Ledger, LedgerError};
use crate::core::event::IdempotencyKey;
use crate::core::signing::webhook_id;

/// One broker as `status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BrokerStatus {
    pub broker_id: String,
    pub enabled: bool,
    /// Why it is disabled (e.g. it answered 410 Gone), or that its `brokers` row is gone.
    pub disabled_reason: Option<String>,
    /// `closed`, `open` or `half_open`: the last transition any instance recorded.
    pub circuit_state: String,
    pub circuit_since: Option<DateTime<Utc>>,
    pub circuit_open_until: Option<DateTime<Utc>>,
    pub circuit_reason: Option<String>,
    pub circuit_consecutive_failures: Option<i32>,
    pub pending: i64,
    pub dead: i64,
    /// How long the most overdue pending delivery has been due without being sent, by the
    /// database's clock (0 when every pending one waits for a retry time still ahead).
    pub oldest_pending_age_ms: Option<i64>,
    /// The newest error of a delivery still failing: the last failed attempt of a pending one,
    /// or the newest dead letter's, whichever is more recent.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
}

/// A webhook-id that one broker answered 2xx to more than once within the window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DuplicateDelivery {
    pub broker_id: String,
    pub webhook_id: String,
    pub event_id: Option<String>,
    pub load_id: String,
    /// 2xx answers within the window (so `times_delivered - 1` were duplicates).
    pub times_delivered: i64,
    pub first_delivered_at: DateTime<Utc>,
    pub last_delivered_at: DateTime<Utc>,
}

/// Where one event came from and what happened to it for every broker.
#[derive(Debug, Clone, Serialize)]
pub struct EventStory {
    pub idempotency_key: String,
    pub event_id: Option<String>,
    pub load_id: String,
    pub status: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub consumed_at: DateTime<Utc>,
    /// One per broker the event was fanned out to, by broker id.
    pub deliveries: Vec<DeliveryStory>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryStory {
    pub delivery_id: i64,
    pub broker_id: String,
    pub webhook_id: String,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub dead_reason: Option<String>,
    /// In the order they were made (a replay starts counting attempts at 1 again).
    pub attempts: Vec<AttemptStory>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttemptStory {
    pub attempt: i32,
    pub started_at: DateTime<Utc>,
    pub latency_ms: i32,
    pub status_code: Option<i32>,
    pub error_class: Option<String>,
    pub error_message: Option<String>,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
}

impl Ledger {
    /// Pending and dead deliveries in the whole ledger, and how long in seconds the most overdue
    /// pending one has been due (0 when none is due): gauges, refreshed every few seconds by every instance. Bounded
    /// by construction: a sum over `delivery_counts` (one row per broker and partition, kept by
    /// triggers) and one index probe per broker with pending work, whatever the backlog.
    pub async fn delivery_totals(&self) -> Result<(i64, i64, f64), LedgerError> {
        let rows = self
            .query_with_probe_plans(
                None,
                "SELECT COALESCE(sum(pending), 0)::int8, COALESCE(sum(dead), 0)::int8,
                        GREATEST(EXTRACT(EPOCH FROM now() - (
                            SELECT min(due.next_attempt_at)
                            FROM delivery_counts p
                            -- LIMIT keeps this a probe of deliveries_pending_due per (broker,
                            -- partition) with pending work, never a join over the pending rows,
                            -- and PROBE_PLAN_SETTINGS keep the probe on that index.
                            CROSS JOIN LATERAL (SELECT d.next_attempt_at FROM deliveries d
                                                WHERE d.broker_id = p.broker_id
                                                  AND d.kafka_partition = p.kafka_partition
                                                  AND d.state = 'pending'
                                                ORDER BY d.next_attempt_at LIMIT 1) due
                            WHERE p.pending > 0
                        )), 0)::float8
                 FROM delivery_counts",
                &[],
            )
            .await?;
        let row = &rows[0];
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// Whether any event was ever consumed into this ledger (the first-start gate). One index
    /// probe: EXISTS stops at the first row.
    pub async fn has_events(&self) -> Result<bool, LedgerError> {
        let row = self
            .client()
            .await?
            .query_one("SELECT EXISTS (SELECT 1 FROM events)", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Every broker, in id order, with its breaker state and backlog. Brokers that still have
    /// pending or dead deliveries but no `brokers` row are listed too, so totals match the ledger.
    /// Counts, the last retry error and the newest dead letter's error come from
    /// `delivery_counts`; the most overdue pending delivery is one index probe per (broker,
    /// partition) with pending work.
    pub async fn broker_statuses(&self) -> Result<Vec<BrokerStatus>, LedgerError> {
        let rows = self
            .query_with_probe_plans(
                None,
                // One pass over delivery_counts; per (broker, partition) with pending work one
                // probe of deliveries_pending_due for its earliest-due row (LIMIT keeps each a
                // nested index lookup).
                "WITH backlog AS (
                     SELECT c.broker_id, sum(c.pending)::int8 AS pending, sum(c.dead)::int8 AS dead,
                            (array_agg(c.last_error ORDER BY c.last_error_at DESC)
                                 FILTER (WHERE c.last_error IS NOT NULL))[1] AS last_error,
                            max(c.last_error_at) AS last_error_at,
                            (array_agg(c.last_dead_error ORDER BY c.last_dead_at DESC)
                                 FILTER (WHERE c.last_dead_error IS NOT NULL))[1] AS last_dead_error,
                            max(c.last_dead_at) AS last_dead_at,
                            min(due.next_attempt_at) AS due_since
                     FROM delivery_counts c
                     LEFT JOIN LATERAL (SELECT d.next_attempt_at FROM deliveries d
                                        WHERE d.broker_id = c.broker_id
                                          AND d.kafka_partition = c.kafka_partition
                                          AND d.state = 'pending' AND c.pending > 0
                                        ORDER BY d.next_attempt_at LIMIT 1) due ON true
                     GROUP BY c.broker_id
                     HAVING sum(c.pending) > 0 OR sum(c.dead) > 0
                 )
                 SELECT COALESCE(b.broker_id, k.broker_id),
                        COALESCE(b.enabled, false),
                        CASE WHEN b.broker_id IS NULL THEN 'no row in the brokers table'
                             ELSE b.disabled_reason END,
                        COALESCE(c.state, 'closed'), c.since, c.open_until, c.reason, c.consecutive_failures,
                        COALESCE(k.pending, 0), COALESCE(k.dead, 0),
                        -- NULL (not 0) for a broker with nothing pending.
                        CASE WHEN k.due_since IS NOT NULL
                             THEN (GREATEST(EXTRACT(EPOCH FROM (now() - k.due_since)), 0) * 1000)::int8
                        END,
                        CASE WHEN k.last_error_at >= k.last_dead_at OR k.last_dead_at IS NULL
                             THEN k.last_error ELSE k.last_dead_error END,
                        GREATEST(k.last_error_at, k.last_dead_at)
                 FROM brokers b
                 FULL JOIN backlog k ON k.broker_id = b.broker_id
                 LEFT JOIN broker_circuits c ON c.broker_id = COALESCE(b.broker_id, k.broker_id)
                 ORDER BY 1",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| BrokerStatus {
                broker_id: row.get(0),
                enabled: row.get(1),
                disabled_reason: row.get(2),
                circuit_state: row.get(3),
                circuit_since: row.get(4),
                circuit_open_until: row.get(5),
                circuit_reason: row.get(6),
                circuit_consecutive_failures: row.get(7),
                pending: row.get(8),
                dead: row.get(9),
                oldest_pending_age_ms: row.get(10),
                last_error: row.get(11),
                last_error_at: row.get(12),
            })
            .collect())
    }

    /// Every (broker, webhook-id) with more than one 2xx answer started in `[since, until)`,
    /// by broker, then by first delivery.
    pub async fn duplicate_deliveries(
        &self,
        since: DateTime<Utc>,
        until: DateTime<Utc>,
    ) -> Result<Vec<DuplicateDelivery>, LedgerError> {
        let rows = self
            .client()
            .await?
            .query(
                // Every 2xx but the one that delivered is a delivery_attempts row, and a
                // delivery's row holds at most one (migration 20), so a duplicate in the window
                // has at least one history row in it: start from those (the partial index
                // delivery_attempts_delivered_by_time), then add the row's own if it is in the
                // window too. Deliveries of an older release have all their 2xx as history rows.
                "WITH extra AS (
                     SELECT a.delivery_id, count(*) AS answers,
                            min(a.started_at) AS first_at, max(a.started_at) AS last_at
                     FROM delivery_attempts a
                     WHERE a.outcome = 'delivered' AND a.status_code BETWEEN 200 AND 299
                       AND a.started_at >= $1 AND a.started_at < $2
                     GROUP BY a.delivery_id
                 ),
                 counted AS (
                     SELECT d.broker_id, d.idempotency_key, d.load_id, x.first_at, x.last_at,
                            x.answers + COALESCE(d.delivered_started_at >= $1
                                                 AND d.delivered_started_at < $2, false)::int
                                AS answers,
                            CASE WHEN d.delivered_started_at >= $1 AND d.delivered_started_at < $2
                                 THEN d.delivered_started_at END AS row_at
                     FROM extra x JOIN deliveries d ON d.delivery_id = x.delivery_id
                 )
                 SELECT c.broker_id, c.idempotency_key, e.event_id, c.load_id, c.answers,
                        LEAST(c.first_at, c.row_at), GREATEST(c.last_at, c.row_at)
                 FROM counted c JOIN events e ON e.idempotency_key = c.idempotency_key
                 WHERE c.answers > 1
                 ORDER BY c.broker_id, LEAST(c.first_at, c.row_at), c.idempotency_key",
                &[&since, &until],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| DuplicateDelivery {
                broker_id: row.get(0),
                webhook_id: webhook_id(&IdempotencyKey::from_stored(row.get(1))),
                event_id: row.get(2),
                load_id: row.get(3),
                times_delivered: row.get(4),
                first_delivered_at: row.get(5),
                last_delivered_at: row.get(6),
            })
            .collect())
    }

    /// The event whose `eventId` is `id`, or else whose idempotency key is `id`; `None` if
    /// neither exists.
    pub async fn event_story(&self, id: &str) -> Result<Option<EventStory>, LedgerError> {
        let client = self.client().await?;
        // event_id first: it is what people have; the key is the fallback for events without one.
        let Some(event) = client
            .query_opt(
                "SELECT idempotency_key, event_id, load_id, status, topic, kafka_partition,
                        kafka_offset, consumed_at
                 FROM events
                 WHERE idempotency_key = $1 OR idempotency_key = $2
                 ORDER BY (idempotency_key = $1) DESC
                 LIMIT 1",
                // Both lookups are on the primary key: an eventId's key is derived from it.
                &[&IdempotencyKey::from_event_id(id).as_str(), &id],
            )
            .await?
        else {
            return Ok(None);
        };
        let key: String = event.get(0);
        let deliveries = client
            .query(
                "SELECT delivery_id, broker_id, state,
                        CASE WHEN state = 'pending' THEN next_attempt_at END,
                        delivered_at, dead_reason
                 FROM deliveries WHERE idempotency_key = $1
                 ORDER BY broker_id",
                &[&key],
            )
            .await?;
        let attempts = client
            .query(
                // The history rows, and the attempt that delivered where it is kept on the
                // delivery's row (migration 20). Both halves are index lookups by the key;
                // the view delivery_attempt_history is not, when joined.
                "SELECT a.delivery_id, a.attempt, a.started_at, a.latency_ms, a.status_code,
                        a.error_class, a.error_message, a.outcome
                 FROM delivery_attempts a JOIN deliveries d ON d.delivery_id = a.delivery_id
                 WHERE d.idempotency_key = $1
                 UNION ALL
                 SELECT delivery_id, attempts, delivered_started_at, delivered_latency_ms,
                        last_status_code, NULL, NULL, 'delivered'
                 FROM deliveries
                 WHERE idempotency_key = $1 AND delivered_started_at IS NOT NULL
                 ORDER BY 3, 2",
                &[&key],
            )
            .await?;
        let id = webhook_id(&IdempotencyKey::from_stored(key.clone()));
        let deliveries = deliveries
            .iter()
            .map(|row| {
                let delivery_id: i64 = row.get(0);
                DeliveryStory {
                    delivery_id,
                    broker_id: row.get(1),
                    webhook_id: id.clone(),
                    state: row.get(2),
                    next_attempt_at: row.get(3),
                    delivered_at: row.get(4),
                    dead_reason: row.get(5),
                    attempts: attempts
                        .iter()
                        .filter(|a| a.get::<_, i64>(0) == delivery_id)
                        .map(|a| AttemptStory {
                            attempt: a.get(1),
                            started_at: a.get(2),
                            latency_ms: a.get(3),
                            status_code: a.get(4),
                            error_class: a.get(5),
                            error_message: a.get(6),
                            outcome: a.get(7),
                        })
                        .collect(),
                }
            })
            .collect();
        Ok(Some(EventStory {
            idempotency_key: key,
            event_id: event.get(1),
            load_id: event.get(2),
            status: event.get(3),
            topic: event.get(4),
            partition: event.get(5),
            offset: event.get(6),
            consumed_at: event.get(7),
            deliveries,
        }))
    }
}
