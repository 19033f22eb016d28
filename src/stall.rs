//! Stall detection: a partition whose committed offset does not move while it has lag, or a
//! broker whose attempt outcomes cannot be written, for longer than `kafka.stall_after_ms`.
//! Either one is reported once (an ERROR line with the last error), shown in a gauge and in
//! `/readyz`, and cleared when it moves again. The watches are pure; `StallBook` is the shared
//! place where the claim path and the outcome writer leave their last error.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A watch changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Stalled,
    Recovered,
}

/// One partition's progress, fed with each observation of its committed offset and lag.
#[derive(Debug, Clone)]
pub struct PartitionWatch {
    committed: Option<i64>,
    moved_at: Instant,
    stalled: bool,
}

impl PartitionWatch {
    pub fn new(committed: Option<i64>, now: Instant) -> PartitionWatch {
        PartitionWatch {
            committed,
            moved_at: now,
            stalled: false,
        }
    }

    /// Stalled when there is lag and the committed offset has not moved for `stall_after`.
    /// Recovered when the offset moves or the lag is gone.
    pub fn observe(
        &mut self,
        committed: Option<i64>,
        lag: i64,
        now: Instant,
        stall_after: Duration,
    ) -> Option<Change> {
        if committed != self.committed || lag == 0 {
            self.committed = committed;
            self.moved_at = now;
            return std::mem::take(&mut self.stalled).then_some(Change::Recovered);
        }
        if !self.stalled && now.duration_since(self.moved_at) >= stall_after {
            self.stalled = true;
            return Some(Change::Stalled);
        }
        None
    }

    pub fn stalled_for(&self, now: Instant) -> Duration {
        now.duration_since(self.moved_at)
    }
}

/// One broker's outcome writes: failing since when, and whether that was reported.
#[derive(Debug, Clone, Default)]
pub struct OutcomeWatch {
    failing_since: Option<Instant>,
    stalled: bool,
}

impl OutcomeWatch {
    pub fn failed(&mut self, now: Instant) {
        self.failing_since.get_or_insert(now);
    }

    /// A write for this broker succeeded.
    pub fn saved(&mut self) -> Option<Change> {
        self.failing_since = None;
        std::mem::take(&mut self.stalled).then_some(Change::Recovered)
    }

    pub fn check(&mut self, now: Instant, stall_after: Duration) -> Option<Change> {
        match self.failing_since {
            Some(since) if !self.stalled && now.duration_since(since) >= stall_after => {
                self.stalled = true;
                Some(Change::Stalled)
            }
            _ => None,
        }
    }
}

/// The last ledger error each partition's claim got, so a stall report can say why.
#[derive(Clone, Default)]
pub struct StallBook {
    claim_errors: Arc<Mutex<HashMap<i32, String>>>,
}

impl StallBook {
    pub fn claim_failed(&self, partition: i32, error: String) {
        self.errors().insert(partition, error);
    }

    pub fn claim_succeeded(&self, partition: i32) {
        self.errors().remove(&partition);
    }

    pub fn last_claim_error(&self, partition: i32) -> Option<String> {
        self.errors().get(&partition).cloned()
    }

    fn errors(&self) -> std::sync::MutexGuard<'_, HashMap<i32, String>> {
        self.claim_errors
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The partition side of the alarm, fed by the lag gauge's refresh loop with the committed
/// offsets of the partitions this instance holds.
pub struct PartitionStalls {
    topic: String,
    book: StallBook,
    health: crate::admin::Health,
    stall_after: Duration,
    watches: HashMap<i32, PartitionWatch>,
}

impl PartitionStalls {
    pub fn new(
        topic: String,
        book: StallBook,
        health: crate::admin::Health,
        stall_after: Duration,
    ) -> PartitionStalls {
        PartitionStalls {
            topic,
            book,
            health,
            stall_after,
            watches: HashMap::new(),
        }
    }

    /// One observation of every partition's committed offset and lag; `held` are the partitions
    /// this instance is responsible for (others are forgotten).
    pub fn observe(
        &mut self,
        offsets: &[crate::offsets::PartitionOffsets],
        held: &[i32],
        metrics: &crate::metrics::Metrics,
    ) {
        let now = Instant::now();
        let gone: Vec<i32> = self
            .watches
            .keys()
            .filter(|p| !held.contains(p))
            .copied()
            .collect();
        for partition in gone {
            self.watches.remove(&partition);
            self.clear(partition, metrics);
        }
        for offsets in offsets.iter().filter(|o| held.contains(&o.partition)) {
            let partition = offsets.partition;
            let Some(watch) = self.watches.get_mut(&partition) else {
                self.watches
                    .insert(partition, PartitionWatch::new(offsets.committed, now));
                // Exported from the start, so dashboards show 0 rather than no data.
                metrics
                    .partition_stalled
                    .with_label_values(&[partition.to_string()])
                    .set(0);
                continue;
            };
            match watch.observe(offsets.committed, offsets.lag, now, self.stall_after) {
                Some(Change::Stalled) => {
                    let last_error = self.book.last_claim_error(partition).unwrap_or_else(|| {
                        "no ledger error recorded (a batch may still be in flight)".to_owned()
                    });
                    tracing::error!(
                        topic = %self.topic,
                        partition,
                        offset = offsets.committed,
                        lag = offsets.lag,
                        stalled_ms = watch.stalled_for(now).as_millis() as u64,
                        error.message = %last_error,
                        "partition stalled: it has lag and its committed offset has not moved (RUNBOOK: stalled partition)"
                    );
                    metrics
                        .partition_stalled
                        .with_label_values(&[partition.to_string()])
                        .set(1);
                    self.health.mark_stalled(
                        format!("partition {partition}"),
                        format!(
                            "offset {} has not moved for {} s with lag {}; last error: {last_error}",
                            offsets.committed.unwrap_or(-1),
                            watch.stalled_for(now).as_secs(),
                            offsets.lag
                        ),
                    );
                }
                Some(Change::Recovered) => {
                    tracing::info!(
                        topic = %self.topic,
                        partition,
                        offset = offsets.committed,
                        "partition moves again; stall cleared"
                    );
                    self.clear(partition, metrics);
                }
                None => {}
            }
        }
    }

    fn clear(&self, partition: i32, metrics: &crate::metrics::Metrics) {
        metrics
            .partition_stalled
            .with_label_values(&[partition.to_string()])
            .set(0);
        self.health.clear_stalled(&format!("partition {partition}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AFTER: Duration = Duration::from_secs(10);

    #[test]
    fn a_partition_with_lag_and_no_progress_stalls_once_then_recovers() {
        let t0 = Instant::now();
        let mut watch = PartitionWatch::new(Some(5), t0);
        assert_eq!(
            watch.observe(Some(5), 3, t0 + Duration::from_secs(5), AFTER),
            None
        );
        assert_eq!(
            watch.observe(Some(5), 3, t0 + Duration::from_secs(10), AFTER),
            Some(Change::Stalled)
        );
        assert_eq!(
            watch.observe(Some(5), 3, t0 + Duration::from_secs(15), AFTER),
            None
        );
        assert_eq!(
            watch.observe(Some(9), 0, t0 + Duration::from_secs(16), AFTER),
            Some(Change::Recovered)
        );
        assert_eq!(
            watch.observe(Some(9), 0, t0 + Duration::from_secs(60), AFTER),
            None
        );
    }

    #[test]
    fn no_lag_is_never_a_stall() {
        let t0 = Instant::now();
        let mut watch = PartitionWatch::new(Some(5), t0);
        assert_eq!(
            watch.observe(Some(5), 0, t0 + Duration::from_secs(100), AFTER),
            None
        );
    }

    #[test]
    fn a_moving_offset_is_never_a_stall() {
        let t0 = Instant::now();
        let mut watch = PartitionWatch::new(Some(0), t0);
        for step in 1..20 {
            let now = t0 + Duration::from_secs(step * 5);
            assert_eq!(watch.observe(Some(step as i64), 100, now, AFTER), None);
        }
    }

    #[test]
    fn outcome_writes_stall_after_failing_long_enough() {
        let t0 = Instant::now();
        let mut watch = OutcomeWatch::default();
        watch.failed(t0);
        watch.failed(t0 + Duration::from_secs(5));
        assert_eq!(watch.check(t0 + Duration::from_secs(9), AFTER), None);
        assert_eq!(
            watch.check(t0 + Duration::from_secs(10), AFTER),
            Some(Change::Stalled)
        );
        assert_eq!(watch.check(t0 + Duration::from_secs(11), AFTER), None);
        assert_eq!(watch.saved(), Some(Change::Recovered));
        assert_eq!(watch.saved(), None);
    }
}
