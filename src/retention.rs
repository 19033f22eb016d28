//! Bounded growth: finished rows leave the ledger after `[retention]`'s windows.
//!
//! What goes, and when (windows measured with the database's clock):
//! - a delivered delivery and its attempts, `delivered_ms` after delivery;
//! - a dead delivery and its attempts, `dead_ms` after it died (a replay makes it pending, and
//!   pending rows are never removed);
//! - an event, once it was consumed more than `delivered_ms` ago and none of its deliveries is
//!   left: deliveries go first, so a report or replay never finds a delivery without its event,
//!   and one pending (or dead) delivery keeps its event however old it is;
//! - a rejected message, `rejected_ms` after it was rejected.
//!
//! How (docs/decisions.md 15): paced, bounded, batched deletes, not time partitions.
//! `events` and `deliveries` carry the idempotency keys (`events` primary key, `deliveries`
//! unique (idempotency_key, broker_id)); a unique index on a partitioned table must contain the
//! partition key, so partitioning them by time would let a redelivered event make a second
//! delivery in another partition. `delivery_attempts` would partition cleanly, but its rows must
//! leave with their delivery (a dead one's attempts stay 30 days, a delivered one's 7), which a
//! time partition cannot express; `rejected_messages` would need its primary key to include the
//! time, which breaks its `ON CONFLICT` idempotency. And turning an existing table into a
//! partitioned one is not an online migration. So each table is walked on an index it already
//! has, a bounded number of rows per statement (`batch_rows`), with a pause between statements
//! (`batch_pause_ms`) and between passes (`interval_ms`): the removal rate is capped, every
//! statement is a short transaction, and autovacuum reclaims the space at the pace it is freed,
//! so the tables stop growing instead of being rewritten in storms.
//!
//! - `deliveries`: a keyset walk in primary-key order (ids grow with time), which costs the
//!   claim and outcome paths no extra index. A pass ends at the first row created inside the
//!   shorter window. It revisits, each pass, the older rows still kept (dead ones inside their
//!   window, pending ones): a read, bounded per statement.
//! - `delivery_attempts`: in the same statement as their delivery, by `delivery_attempts_by_delivery`.
//! - `events`: a keyset walk on `events_by_consumed_at` (migration 8) up to the window edge.
//! - `rejected_messages`: oldest first on `rejected_messages_by_time` (migration 13).
//!
//! A table whose index migration is not applied yet is skipped (logged) until `migrate` runs.
//!
//! One instance cleans at a time: a pass runs on a connection holding a Postgres advisory lock
//! (`pg_try_advisory_lock`); an instance that cannot get it skips the pass. Twelve pods run one
//! cleaner, and a pod that dies mid-pass loses the lock with its connection.
//!
//! A claim or a backfill that adds a delivery to an event the cleaner is looking at at the same
//! moment: both lock the event rows they build on until they commit (the claim only for events
//! already recorded, i.e. consumed again), and the cleaner skips locked events (`SKIP LOCKED`),
//! so it never removes an event under a delivery being created; if the cleaner locked it first,
//! the claim waits and records the event again, the backfill skips it.
//!
//! Retention also bounds idempotency: a Kafka message older than `delivered_ms` that is
//! consumed again (offset reset, re-produce) finds no event row and is delivered again. Keep
//! `delivered_ms` at least the topic's `retention.ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::RetentionSettings;
use crate::ledger::{Ledger, LedgerError, EVENT_WALK_START};
use crate::metrics::Metrics;

/// The tables the cleaner removes rows from: the `table` label of `retention_removed_total`.
pub const TABLES: [&str; 4] = [
    "deliveries",
    "delivery_attempts",
    "events",
    "rejected_messages",
];

/// The migrations whose indexes the events and rejected walks need.
const EVENTS_INDEX_MIGRATION: i32 = 8;
const REJECTED_INDEX_MIGRATION: i32 = 13;

/// Where a keyset walk goes after one statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next<K> {
    /// Continue just after this key.
    After(K),
    /// The walk reached the end of what may be removed: the pass is done with this table.
    Done,
}

/// Decides the next step of a walk from what one statement saw. A statement that looked at
/// fewer rows than its LIMIT reached the end of the table (or of the window); one whose last row
/// is already too young to remove ends the walk too, since every row after it is younger.
pub fn next_step<K>(
    scanned: i64,
    scan_rows: i64,
    last: Option<K>,
    reached_recent: bool,
) -> Next<K> {
    match last {
        Some(key) if scanned >= scan_rows && !reached_recent => Next::After(key),
        _ => Next::Done,
    }
}

/// What one pass removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub deliveries: i64,
    pub attempts: i64,
    pub events: i64,
    pub rejected: i64,
    /// Cleaning statements run (each bounded by `batch_rows`).
    pub statements: u32,
    /// Tables left alone because their index migration is not applied.
    pub skipped: Vec<&'static str>,
}

/// Runs a pass every `interval_ms` until the task is dropped (at shutdown). Errors are logged
/// and the next pass tries again: retention is never urgent.
pub async fn run_cleaner(ledger: Ledger, settings: RetentionSettings, metrics: Arc<Metrics>) {
    if !settings.enabled {
        tracing::info!("retention is off (retention.enabled = false): the ledger keeps every row");
        return;
    }
    loop {
        tokio::time::sleep(settings.interval()).await;
        let started = Instant::now();
        let result = clean_once(&ledger, &settings, &metrics).await;
        let outcome = match &result {
            Ok(Some(_)) => "cleaned",
            Ok(None) => "skipped",
            Err(_) => "failed",
        };
        metrics.retention_passes.with_label_values(&[outcome]).inc();
        match result {
            Ok(Some(report)) => tracing::info!(
                deliveries_removed = report.deliveries,
                attempts_removed = report.attempts,
                events_removed = report.events,
                rejected_removed = report.rejected,
                statements = report.statements,
                skipped_tables = ?report.skipped,
                duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "retention pass finished"
            ),
            Ok(None) => {
                tracing::debug!("retention pass skipped: another instance is cleaning")
            }
            Err(error) => tracing::warn!(
                error.message = %error,
                "retention pass failed; the next pass tries again"
            ),
        }
    }
}

/// One pass over every table, if no other instance is cleaning (`None` then). Removed rows are
/// counted in `retention_removed_total` as each statement commits.
pub async fn clean_once(
    ledger: &Ledger,
    settings: &RetentionSettings,
    metrics: &Metrics,
) -> Result<Option<PassReport>, LedgerError> {
    // Read before taking the lock: the pass then holds one pooled connection, not two.
    let applied = ledger.applied_schema_versions().await?;
    let Some(session) = ledger.try_retention_session().await? else {
        return Ok(None);
    };
    let scan_rows = i64::from(settings.batch_rows);
    let count = |table: &str, removed: i64| {
        metrics
            .retention_removed
            .with_label_values(&[table])
            .inc_by(u64::try_from(removed).unwrap_or(0));
    };
    let mut report = PassReport::default();

    let mut after_id = i64::MIN;
    loop {
        let batch = session
            .remove_finished_deliveries(after_id, settings.delivered(), settings.dead(), scan_rows)
            .await?;
        report.statements += 1;
        report.deliveries += batch.deliveries_removed;
        report.attempts += batch.attempts_removed;
        count("deliveries", batch.deliveries_removed);
        count("delivery_attempts", batch.attempts_removed);
        tokio::time::sleep(settings.batch_pause()).await;
        match next_step(
            batch.scanned,
            scan_rows,
            batch.last_id,
            batch.reached_recent,
        ) {
            Next::After(id) => after_id = id,
            Next::Done => break,
        }
    }

    if applied.contains(&EVENTS_INDEX_MIGRATION) {
        let mut after = EVENT_WALK_START;
        loop {
            let batch = session
                .remove_unreferenced_events(after, settings.delivered(), scan_rows)
                .await?;
            report.statements += 1;
            report.events += batch.events_removed;
            count("events", batch.events_removed);
            tokio::time::sleep(settings.batch_pause()).await;
            // The statement only looks inside the window, so it ends by looking at fewer rows.
            match next_step(batch.scanned, scan_rows, batch.last, false) {
                Next::After(cursor) => after = cursor,
                Next::Done => break,
            }
        }
    } else {
        report.skipped.push("events");
    }

    if applied.contains(&REJECTED_INDEX_MIGRATION) {
        loop {
            let removed = session
                .remove_rejected(settings.rejected(), scan_rows)
                .await?;
            report.statements += 1;
            report.rejected += removed;
            count("rejected_messages", removed);
            tokio::time::sleep(settings.batch_pause()).await;
            if removed < scan_rows {
                break;
            }
        }
    } else {
        report.skipped.push("rejected_messages");
    }
    if !report.skipped.is_empty() {
        tracing::warn!(
            skipped_tables = ?report.skipped,
            "retention skipped tables whose index migration is not applied; run `webhook-delivery migrate`"
        );
    }

    session.release().await?;
    Ok(Some(report))
}

/// What the ledger keeps, in one sentence, for the commands that read it (reports, dead-letter
/// list and replay, backfill): they see nothing older.
pub fn kept_note(settings: &RetentionSettings) -> String {
    if !settings.enabled {
        return "retention is off (retention.enabled = false): the ledger keeps every row".into();
    }
    format!(
        "the ledger keeps delivered deliveries for {}, dead ones for {}, and an event until its \
         last delivery is gone ({} after it was consumed at the earliest); older rows are removed \
         ([retention] in the config)",
        human(settings.delivered()),
        human(settings.dead()),
        human(settings.delivered()),
    )
}

/// A window the way people say it: "7 days", "36 hours", "90 s".
pub fn human(duration: Duration) -> String {
    const UNITS: [(u128, &str, &str); 4] = [
        (86_400_000, "day", "days"),
        (3_600_000, "hour", "hours"),
        (60_000, "minute", "minutes"),
        (1_000, "s", "s"),
    ];
    let ms = duration.as_millis();
    for (size, one, many) in UNITS {
        if ms >= size && ms.is_multiple_of(size) {
            let n = ms / size;
            return format!("{n} {}", if n == 1 { one } else { many });
        }
    }
    format!("{ms} ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_batch_continues_after_its_last_key() {
        assert_eq!(next_step(500, 500, Some(42_i64), false), Next::After(42));
    }

    #[test]
    fn a_short_batch_ends_the_walk() {
        assert_eq!(next_step(499, 500, Some(42_i64), false), Next::Done);
        assert_eq!(next_step::<i64>(0, 500, None, false), Next::Done);
    }

    #[test]
    fn a_batch_that_reached_rows_inside_the_window_ends_the_walk() {
        assert_eq!(next_step(500, 500, Some(42_i64), true), Next::Done);
    }

    #[test]
    fn windows_read_the_way_people_say_them() {
        assert_eq!(human(Duration::from_millis(604_800_000)), "7 days");
        assert_eq!(human(Duration::from_millis(86_400_000)), "1 day");
        assert_eq!(human(Duration::from_millis(2_592_000_000)), "30 days");
        assert_eq!(human(Duration::from_secs(36 * 3600)), "36 hours");
        assert_eq!(human(Duration::from_secs(90)), "90 s");
        assert_eq!(human(Duration::from_secs(120)), "2 minutes");
        assert_eq!(human(Duration::from_millis(1_500)), "1500 ms");
    }

    #[test]
    fn the_note_names_both_windows_or_says_retention_is_off() {
        let mut settings = RetentionSettings {
            enabled: true,
            delivered_ms: 604_800_000,
            dead_ms: 2_592_000_000,
            rejected_ms: 2_592_000_000,
            interval_ms: 60_000,
            batch_rows: 5_000,
            batch_pause_ms: 100,
        };
        let note = kept_note(&settings);
        assert!(note.contains("delivered deliveries for 7 days"), "{note}");
        assert!(note.contains("dead ones for 30 days"), "{note}");
        settings.enabled = false;
        assert!(kept_note(&settings).contains("keeps every row"));
    }
}
