//! Backfill: create the deliveries a broker missed. A claim only fans an event out to brokers
//! that are enabled and subscribed at that moment, so events consumed while a broker was
//! disabled, or before it subscribed to a load, have no delivery row for it. Backfill walks the
//! ledger's `events` in the window and inserts the missing (event, broker) rows exactly as a
//! claim would have: same idempotency key (so the same `webhook-id`), same partition and offset
//! (so the same `webhook-sequence` and the same owner), `ON CONFLICT DO NOTHING` (so running it
//! twice, or over events that were delivered, creates nothing).
//!
//! It reaches only what the `events` table still holds: retention (`[retention]`, src/retention.rs)
//! removes an event `delivered_ms` after it was consumed once none of its deliveries is left.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Ledger, LedgerError};

/// Events one backfill statement looks at, whatever fraction of them the broker subscribes to:
/// each statement is an index range walk of at most this many rows, however large the window.
pub const BACKFILL_SCAN_ROWS: i64 = 5_000;

/// What to backfill.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    pub broker_id: String,
    /// Events consumed at or after this time (`events.consumed_at`).
    pub since: DateTime<Utc>,
    /// Events consumed before this time. None: before the backfill started.
    pub until: Option<DateTime<Utc>>,
    /// Only this load's events.
    pub load_id: Option<String>,
    /// Count what would be created, create nothing.
    pub dry_run: bool,
}

/// What one backfill did (or, with `dry_run`, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackfillSummary {
    pub broker_id: String,
    pub dry_run: bool,
    /// Events in the window that were looked at.
    pub events_scanned: i64,
    /// Of those, events of loads the broker subscribes to (and of `load_id`, if given).
    pub events_subscribed: i64,
    /// Deliveries created; with `dry_run`, deliveries that would be created.
    pub deliveries_created: i64,
    /// Statements run: one per `BACKFILL_SCAN_ROWS` events of the window.
    pub batches: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackfillOutcome {
    Done(BackfillSummary),
    UnknownBroker,
    /// Backfilled rows of a disabled broker would only be dead-lettered: re-enable it first.
    BrokerDisabled {
        reason: Option<String>,
    },
}

/// Where the walk through `events` stands: the last event looked at, in index order.
type Cursor = (DateTime<Utc>, i32, i64);

struct Page {
    scanned: i64,
    subscribed: i64,
    created: i64,
    last: Option<Cursor>,
}

impl Ledger {
    /// Creates the broker's missing deliveries for the events consumed in the window, in
    /// batches of `BACKFILL_SCAN_ROWS` events, each batch in (partition, offset) order. Each
    /// batch commits on its own: an interrupted backfill is finished by running it again.
    /// The new rows are pending and due now; the ledger sweep of the instance owning each
    /// partition picks them up.
    pub async fn backfill(
        &self,
        request: &BackfillRequest,
    ) -> Result<BackfillOutcome, LedgerError> {
        let client = self.client().await?;
        let Some(broker) = client
            .query_opt(
                "SELECT enabled, disabled_reason, now() FROM brokers WHERE broker_id = $1",
                &[&request.broker_id],
            )
            .await?
        else {
            return Ok(BackfillOutcome::UnknownBroker);
        };
        if !broker.get::<_, bool>(0) {
            return Ok(BackfillOutcome::BrokerDisabled {
                reason: broker.get(1),
            });
        }
        // Fixed at the start: events consumed after this were claimed with the broker enabled.
        let until = request.until.unwrap_or_else(|| broker.get(2));
        drop(client);

        let mut summary = BackfillSummary {
            broker_id: request.broker_id.clone(),
            dry_run: request.dry_run,
            ..BackfillSummary::default()
        };
        // (since, -1, -1) sorts before every event consumed at `since` itself.
        let mut cursor: Cursor = (request.since, -1, -1);
        loop {
            let page = self.backfill_page(request, until, cursor).await?;
            summary.batches += 1;
            summary.events_scanned += page.scanned;
            summary.events_subscribed += page.subscribed;
            summary.deliveries_created += page.created;
            match page.last {
                Some(last) if page.scanned == BACKFILL_SCAN_ROWS => cursor = last,
                _ => break,
            }
        }
        tracing::info!(
            broker_id = %summary.broker_id,
            dry_run = summary.dry_run,
            events_scanned = summary.events_scanned,
            deliveries_created = summary.deliveries_created,
            "backfill finished"
        );
        Ok(BackfillOutcome::Done(summary))
    }

    /// One batch: the next `BACKFILL_SCAN_ROWS` events after `cursor` (an index range walk on
    /// `events_by_consumed_at`), the broker's subscriptions among them (primary-key probes), and
    /// the deliveries that are missing (unique-key probes).
    async fn backfill_page(
        &self,
        request: &BackfillRequest,
        until: DateTime<Utc>,
        cursor: Cursor,
    ) -> Result<Page, LedgerError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH scanned AS (
                     SELECT idempotency_key, load_id, kafka_partition, kafka_offset, consumed_at
                     FROM events
                     WHERE (consumed_at, kafka_partition, kafka_offset) > ($2, $3, $4)
                       AND consumed_at < $5
                     ORDER BY consumed_at, kafka_partition, kafka_offset
                     LIMIT $7
                     -- Held until the new deliveries commit: the retention cleaner skips locked
                     -- events, so it cannot remove one whose delivery is being created here.
                     FOR KEY SHARE
                 ),
                 subscribed AS (
                     SELECT sc.* FROM scanned sc
                     JOIN broker_subscriptions s ON s.broker_id = $1 AND s.load_id = sc.load_id
                     WHERE $6::text IS NULL OR sc.load_id = $6
                 ),
                 missing AS (
                     SELECT * FROM subscribed sb
                     WHERE NOT EXISTS (SELECT 1 FROM deliveries d
                                       WHERE d.idempotency_key = sb.idempotency_key AND d.broker_id = $1)
                 ),
                 inserted AS (
                     INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
                     SELECT idempotency_key, $1, load_id, kafka_partition, kafka_offset
                     FROM missing WHERE NOT $8
                     ORDER BY kafka_partition, kafka_offset
                     ON CONFLICT (idempotency_key, broker_id) DO NOTHING
                     RETURNING 1
                 ),
                 last AS (
                     SELECT consumed_at, kafka_partition, kafka_offset FROM scanned
                     ORDER BY consumed_at DESC, kafka_partition DESC, kafka_offset DESC LIMIT 1
                 )
                 SELECT (SELECT count(*) FROM scanned),
                        (SELECT count(*) FROM subscribed),
                        CASE WHEN $8 THEN (SELECT count(*) FROM missing)
                             ELSE (SELECT count(*) FROM inserted) END,
                        (SELECT consumed_at FROM last),
                        (SELECT kafka_partition FROM last),
                        (SELECT kafka_offset FROM last)",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[
                    &request.broker_id,
                    &cursor.0,
                    &cursor.1,
                    &cursor.2,
                    &until,
                    &request.load_id,
                    &BACKFILL_SCAN_ROWS,
                    &request.dry_run,
                ],
            )
            .await?;
        let last = match (row.get(3), row.get(4), row.get(5)) {
            (Some(at), Some(partition), Some(offset)) => Some((at, partition, offset)),
            _ => None,
        };
        Ok(Page {
            scanned: row.get(0),
            subscribed: row.get(1),
            created: row.get(2),
            last,
        })
    }
}
