//! LedgerGateway: the running service's one door to the ledger. It owns the Postgres pool, and
//! every ledger read and write of the actors goes through its messages: claims, outcome writes
//! (group-committed), leases, breaker transitions, broker rows, pending loads. Handlers run
//! concurrently (up to the pool size); the ledger's unique constraints, not this actor, are what
//! make claims idempotent.

mod claim;
mod handlers;
mod outcomes;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};
use chrono::Utc;
use tokio::sync::oneshot;

pub use claim::claim_until_stored;
pub use handlers::*;

use crate::admin::Health;
use crate::ledger::{AttemptRecord, ErrorKind, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::stall::{Change, OutcomeWatch, StallBook};

/// How often outcome-write stalls are checked.
const STALL_CHECK: Duration = Duration::from_secs(1);

/// Group-commit statements under way at once. With one, an outcome decided just after a write
/// started waits for that write and then its own, about 1.5 writes, and its load's next
/// delivery waits with it; with two, a large queue (`SECOND_WRITE_MIN_OUTCOMES`) starts at once
/// (it may still wait for the first's commit on a shared `delivery_counts` row). No row is in
/// two statements: a delivery's next attempt waits for its outcome to be saved.
/// With `postgres.outcome_commit = "async"`, the outcome writers' own connections
/// (`Ledger::for_outcomes`) are this many.
pub const MAX_GROUP_WRITES: usize = 2;

/// Outcomes that must be queued before a second statement starts beside one under way. Each
/// statement costs Postgres fixed work (its commit, the counting trigger, the arrays), about as
/// much as ten outcomes' own; a handful queued behind a statement are cheaper in the next one
/// than in a statement of their own, and a backlog drain (hundreds queued) still gets its
/// second statement. Measured against no minimum and 100 (docs/performance.md "Session 13"):
/// `deepload` faster in 4 rounds of 4, `hotload` and `backlog` unchanged; 100 starved
/// `deepload`'s 150 lanes of their second statement.
const SECOND_WRITE_MIN_OUTCOMES: usize = 30;

/// Whether the queued outcomes go out now, in a statement of their own: always when nothing is
/// being written, beside one statement only when enough are waiting, never beyond
/// `MAX_GROUP_WRITES`.
fn may_start_outcome_write(under_way: usize, queued: usize) -> bool {
    if queued == 0 || under_way >= MAX_GROUP_WRITES {
        return false;
    }
    under_way == 0 || queued >= SECOND_WRITE_MIN_OUTCOMES
}

/// What the actor reports to: metrics, `/readyz`, and the stall threshold.
#[derive(Clone)]
pub struct LedgerWatch {
    pub metrics: Arc<Metrics>,
    pub health: Health,
    pub stalls: StallBook,
    pub stall_after: Duration,
}

impl LedgerWatch {
    /// Counts a failed call in `webhook_delivery_ledger_errors_total{operation,kind}`.
    pub fn count(&self, operation: &'static str, error: &LedgerError) {
        self.count_kind(operation, error.kind());
    }

    pub fn count_kind(&self, operation: &'static str, kind: ErrorKind) {
        self.metrics
            .ledger_errors
            .with_label_values(&[operation, kind.as_str()])
            .inc();
    }
}

pub struct LedgerGateway {
    ledger: Ledger,
    /// Where outcome writes go: `ledger` itself, or connections of their own with
    /// `postgres.outcome_commit = "async"`.
    outcome_ledger: Ledger,
    watch: LedgerWatch,
    /// Attempt outcomes from every DeliveryActor wait here while a write is in flight, and all
    /// of them go out in the next single statement (group commit): a few large writes instead
    /// of one per broker at a time.
    queued_outcomes: Vec<QueuedOutcomes>,
    /// The records in `queued_outcomes`, kept as they arrive: summing the queue on every
    /// arrival would cost the square of the messages queued behind a statement (thousands with
    /// 10,000 brokers).
    queued_records: usize,
    /// Group-commit statements under way (at most `MAX_GROUP_WRITES`).
    outcome_writes_under_way: usize,
    /// Per broker: whether its outcomes are failing to be written, and the last error.
    outcome_watches: HashMap<String, (OutcomeWatch, String)>,
    /// Brokers whose `outcome_write_stalled` series exists (set to 0 on their first written
    /// outcome, so dashboards show 0 rather than no data).
    outcome_gauges: HashSet<String>,
}

struct QueuedOutcomes {
    records: Vec<AttemptRecord>,
    saved: oneshot::Sender<Result<(), String>>,
}

impl LedgerGateway {
    pub fn new(ledger: Ledger, outcome_ledger: Ledger, watch: LedgerWatch) -> Self {
        LedgerGateway {
            ledger,
            outcome_ledger,
            watch,
            queued_outcomes: Vec::new(),
            queued_records: 0,
            outcome_writes_under_way: 0,
            outcome_watches: HashMap::new(),
            outcome_gauges: HashSet::new(),
        }
    }

    /// Writes everything queued in one statement (a second one beside it only when at least
    /// `SECOND_WRITE_MIN_OUTCOMES` wait), then the next batch, until none is left. A
    /// data error in the group commit is not the other brokers' problem: the batch is split to
    /// find the rows the database refuses (see `outcomes::save_around_bad_rows`), so every
    /// queued batch is answered as saved. Only a database that is away fails them all (their
    /// DeliveryActors retry).
    fn write_outcomes(&mut self, ctx: &mut Context<Self>) {
        if !may_start_outcome_write(self.outcome_writes_under_way, self.queued_records) {
            return;
        }
        self.outcome_writes_under_way += 1;
        let batch = std::mem::take(&mut self.queued_outcomes);
        self.queued_records = 0;
        let records: Vec<AttemptRecord> = batch
            .iter()
            .flat_map(|queued| queued.records.iter().cloned())
            .collect();
        let ledger = self.outcome_ledger.clone();
        let watch = self.watch.clone();
        let write = async move {
            let started = Instant::now();
            let written = ledger.record_attempts(&records).await;
            watch
                .metrics
                .outcome_write_duration
                .observe(started.elapsed().as_secs_f64());
            match written {
                Ok(()) => Ok(()),
                Err(error) => {
                    watch.count("record_attempts", &error);
                    if error.kind() != ErrorKind::Data {
                        return Err(error);
                    }
                    outcomes::save_around_bad_rows(&ledger, &records, &watch, &error).await;
                    Ok(())
                }
            }
        };
        ctx.spawn(write.into_actor(self).map(|result, act, ctx| {
            act.outcome_writes_under_way -= 1;
            let result = result.map_err(|error| error.to_string());
            let now = Instant::now();
            let wall_now = Utc::now();
            for queued in batch {
                for record in &queued.records {
                    act.outcome_written(&record.broker_id, &result, now);
                    if result.is_ok() {
                        act.watch
                            .metrics
                            .outcome_save_wait
                            .observe(record.save_wait(wall_now).as_secs_f64());
                    }
                }
                let _ = queued.saved.send(result.clone());
            }
            act.write_outcomes(ctx);
        }));
    }

    fn outcome_written(&mut self, broker_id: &str, result: &Result<(), String>, now: Instant) {
        match result {
            Err(error) => {
                let (watch, last_error) = self
                    .outcome_watches
                    .entry(broker_id.to_owned())
                    .or_insert_with(|| (OutcomeWatch::default(), String::new()));
                watch.failed(now);
                error.clone_into(last_error);
            }
            Ok(()) => {
                if !self.outcome_gauges.contains(broker_id) {
                    self.outcome_gauges.insert(broker_id.to_owned());
                    self.watch
                        .metrics
                        .outcome_write_stalled
                        .with_label_values(&[broker_id])
                        .set(0);
                }
                let Some((watch, _)) = self.outcome_watches.get_mut(broker_id) else {
                    return;
                };
                if watch.saved() == Some(Change::Recovered) {
                    tracing::info!(
                        broker_id,
                        "attempt outcomes of this broker are written again; stall cleared"
                    );
                    self.watch
                        .metrics
                        .outcome_write_stalled
                        .with_label_values(&[broker_id])
                        .set(0);
                    self.watch
                        .health
                        .clear_stalled(&outcome_stall_name(broker_id));
                }
                self.outcome_watches.remove(broker_id);
            }
        }
    }

    /// Reports brokers whose outcomes have been failing to be written for `stall_after`.
    fn check_outcome_stalls(&mut self, _: &mut Context<Self>) {
        let now = Instant::now();
        for (broker_id, (watch, last_error)) in &mut self.outcome_watches {
            if watch.check(now, self.watch.stall_after) == Some(Change::Stalled) {
                tracing::error!(
                    broker_id = %broker_id,
                    stalled_ms = self.watch.stall_after.as_millis() as u64,
                    error.message = %last_error,
                    "attempt outcomes of this broker cannot be written; its deliveries wait (RUNBOOK: outcome-write stall)"
                );
                self.watch
                    .metrics
                    .outcome_write_stalled
                    .with_label_values(&[broker_id.as_str()])
                    .set(1);
                self.watch.health.mark_stalled(
                    outcome_stall_name(broker_id),
                    format!("outcomes cannot be written: {last_error}"),
                );
            }
        }
    }
}

fn outcome_stall_name(broker_id: &str) -> String {
    format!("outcome writes of broker {broker_id}")
}

impl Actor for LedgerGateway {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(STALL_CHECK, Self::check_outcome_stalls);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_outcome_write_starts_only_for_a_large_queue() {
        assert!(!may_start_outcome_write(0, 0), "nothing to write");
        assert!(
            may_start_outcome_write(0, 1),
            "an idle writer takes even one"
        );
        assert!(
            !may_start_outcome_write(1, 15),
            "a few wait for the next statement"
        );
        assert!(!may_start_outcome_write(1, SECOND_WRITE_MIN_OUTCOMES - 1));
        assert!(may_start_outcome_write(1, SECOND_WRITE_MIN_OUTCOMES));
        assert!(
            !may_start_outcome_write(MAX_GROUP_WRITES, 10_000),
            "never more than MAX_GROUP_WRITES at once"
        );
    }
}
