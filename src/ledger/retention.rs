//! Retention's SQL: the statements the cleaner runs (what they remove and how it paces itself
//! is src/retention.rs). Every statement looks at a bounded number of rows (`scan_rows` or
//! `limit`) on an index, so each is short whatever the size of the ledger, and the windows are
//! measured with the database's clock, like every other time in the ledger.
//!
//! The rows a statement removes are handed from its bounded scan to its DELETE as an array
//! (`= ANY (ARRAY(SELECT ...))`), never as a join: a join's plan depends on the planner's guess
//! of the scan's size, and with a prepared (generic) plan it guessed a hash join over the whole
//! table (docs/performance.md "Retention"). An array makes each removal an index probe.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{BoundedClient, Ledger, LedgerError};

/// Arbitrary but fixed: the key of the advisory lock held by the one session that cleans.
/// (The migration lock is another key.)
const RETENTION_LOCK_KEY: i64 = 0x7765_6268_6f6f_6b32;

/// Where the walk through `events` stands: the last event looked at, in the order of the index
/// `events_by_consumed_at`.
pub type EventCursor = (DateTime<Utc>, i32, i64);

/// The position before every event (one consumed before 1970 would be a clock error).
pub const EVENT_WALK_START: EventCursor = (DateTime::<Utc>::UNIX_EPOCH, i32::MIN, i64::MIN);

/// What one statement over `deliveries` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveriesBatch {
    /// Rows looked at (at most `scan_rows`).
    pub scanned: i64,
    /// The highest delivery_id looked at.
    pub last_id: Option<i64>,
    /// The last row looked at was created inside the shorter window: every row after it is
    /// younger still, so nothing further on can be removed yet.
    pub reached_recent: bool,
    pub deliveries_removed: i64,
    pub attempts_removed: i64,
}

/// What one statement over `events` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsBatch {
    pub scanned: i64,
    pub last: Option<EventCursor>,
    pub events_removed: i64,
}

/// A connection holding the cleaner's advisory lock. While it lives no other session (no other
/// instance) can get the lock, so at most one cleaner runs at a time however many pods run.
/// The lock is the session's: `release` lets go; dropping it without `release` (an error, a
/// shutdown mid-pass) closes the connection instead of returning it to the pool, which ends
/// the session and so the lock.
pub struct RetentionSession {
    client: Option<BoundedClient>,
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Ledger {
    /// Takes the cleaner's lock if no other session holds it (never waits).
    pub async fn try_retention_session(&self) -> Result<Option<RetentionSession>, LedgerError> {
        let client = self.client().await?;
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK_KEY])
            .await?
            .get(0);
        Ok(locked.then_some(RetentionSession {
            client: Some(client),
        }))
    }
}

impl RetentionSession {
    fn client(&self) -> &BoundedClient {
        self.client
            .as_ref()
            .expect("the client is only taken by release and drop")
    }

    /// Walks `deliveries` in primary-key order from just after `after_id`, `scan_rows` rows,
    /// and removes the delivered ones older than `delivered` and the dead ones older than
    /// `dead`, with their attempts. Pending rows are never touched. The conditions are checked
    /// again on the row being deleted (not only on the scan), so a dead letter replayed at the
    /// same moment stays.
    pub async fn remove_finished_deliveries(
        &self,
        after_id: i64,
        delivered: Duration,
        dead: Duration,
        scan_rows: i64,
    ) -> Result<DeliveriesBatch, LedgerError> {
        let client = self.client();
        let statement = client
            .prepare_cached(
                "WITH scanned AS (
                     SELECT delivery_id, created_at FROM deliveries
                     WHERE delivery_id > $1
                     ORDER BY delivery_id
                     LIMIT $4
                 ),
                 gone AS (
                     DELETE FROM deliveries d
                     WHERE d.delivery_id = ANY (ARRAY(SELECT delivery_id FROM scanned))
                       AND ((d.state = 'delivered'
                             AND d.delivered_at < now() - $2::int8 * interval '1 millisecond')
                         OR (d.state = 'dead'
                             AND d.updated_at < now() - $3::int8 * interval '1 millisecond'))
                     RETURNING d.delivery_id
                 ),
                 attempts_gone AS (
                     DELETE FROM delivery_attempts a
                     WHERE a.delivery_id = ANY (ARRAY(SELECT delivery_id FROM gone))
                     RETURNING 1
                 ),
                 last AS (
                     SELECT delivery_id, created_at FROM scanned ORDER BY delivery_id DESC LIMIT 1
                 )
                 SELECT (SELECT count(*) FROM scanned),
                        (SELECT delivery_id FROM last),
                        COALESCE((SELECT created_at FROM last)
                                     >= now() - LEAST($2, $3)::int8 * interval '1 millisecond', false),
                        (SELECT count(*) FROM gone),
                        (SELECT count(*) FROM attempts_gone)",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[&after_id, &millis(delivered), &millis(dead), &scan_rows],
            )
            .await?;
        Ok(DeliveriesBatch {
            scanned: row.get(0),
            last_id: row.get(1),
            reached_recent: row.get(2),
            deliveries_removed: row.get(3),
            attempts_removed: row.get(4),
        })
    }

    /// Walks `events` consumed more than `delivered` ago, in `events_by_consumed_at` order from
    /// just after `after`, `scan_rows` rows, and removes those that no delivery refers to any
    /// more: an event goes only after the last of its deliveries (so a report or replay never
    /// finds a delivery without its event). An event a claim or a backfill holds (they lock
    /// the events they add deliveries to) is skipped and looked at again on the next pass.
    pub async fn remove_unreferenced_events(
        &self,
        after: EventCursor,
        delivered: Duration,
        scan_rows: i64,
    ) -> Result<EventsBatch, LedgerError> {
        let client = self.client();
        let statement = client
            .prepare_cached(
                "WITH scanned AS (
                     SELECT idempotency_key, consumed_at, kafka_partition, kafka_offset FROM events
                     WHERE (consumed_at, kafka_partition, kafka_offset) > ($1, $2, $3)
                       AND consumed_at < now() - $4::int8 * interval '1 millisecond'
                     ORDER BY consumed_at, kafka_partition, kafka_offset
                     LIMIT $5
                 ),
                 unreferenced AS (
                     SELECT e.idempotency_key FROM events e
                     WHERE e.idempotency_key = ANY (ARRAY(SELECT idempotency_key FROM scanned))
                       AND NOT EXISTS (SELECT 1 FROM deliveries d
                                       WHERE d.idempotency_key = e.idempotency_key)
                     FOR UPDATE SKIP LOCKED
                 ),
                 gone AS (
                     DELETE FROM events e
                     WHERE e.idempotency_key = ANY (ARRAY(SELECT idempotency_key FROM unreferenced))
                     RETURNING 1
                 ),
                 last AS (
                     SELECT consumed_at, kafka_partition, kafka_offset FROM scanned
                     ORDER BY consumed_at DESC, kafka_partition DESC, kafka_offset DESC LIMIT 1
                 )
                 SELECT (SELECT count(*) FROM scanned),
                        (SELECT consumed_at FROM last),
                        (SELECT kafka_partition FROM last),
                        (SELECT kafka_offset FROM last),
                        (SELECT count(*) FROM gone)",
            )
            .await?;
        let row = client
            .query_one(
                &statement,
                &[&after.0, &after.1, &after.2, &millis(delivered), &scan_rows],
            )
            .await?;
        let last = match (row.get(1), row.get(2), row.get(3)) {
            (Some(at), Some(partition), Some(offset)) => Some((at, partition, offset)),
            _ => None,
        };
        Ok(EventsBatch {
            scanned: row.get(0),
            last,
            events_removed: row.get(4),
        })
    }

    /// Removes up to `limit` of the oldest rejected messages recorded more than `rejected` ago
    /// (an index range on `rejected_messages_by_time`). Returns how many went.
    pub async fn remove_rejected(
        &self,
        rejected: Duration,
        limit: i64,
    ) -> Result<i64, LedgerError> {
        let client = self.client();
        let statement = client
            .prepare_cached(
                "WITH gone AS (
                     DELETE FROM rejected_messages
                     WHERE ctid = ANY (ARRAY(
                         SELECT ctid FROM rejected_messages
                         WHERE rejected_at < now() - $1::int8 * interval '1 millisecond'
                         ORDER BY rejected_at
                         LIMIT $2))
                     RETURNING 1
                 )
                 SELECT count(*) FROM gone",
            )
            .await?;
        Ok(client
            .query_one(&statement, &[&millis(rejected), &limit])
            .await?
            .get(0))
    }

    /// Lets go of the lock and returns the connection to the pool.
    pub async fn release(mut self) -> Result<(), LedgerError> {
        let client = self.client.take().expect("released once");
        match client
            .query_one("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK_KEY])
            .await
        {
            Ok(_) => Ok(()),
            Err(error) => {
                // Unknown whether the lock is still held: never pool a session that may hold it.
                detach(client);
                Err(error)
            }
        }
    }
}

impl Drop for RetentionSession {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            detach(client);
        }
    }
}

/// Closes the connection rather than returning it to the pool: the session ends, and with it
/// any advisory lock it holds.
fn detach(client: BoundedClient) {
    drop(deadpool_postgres::Object::take(client.client));
}
