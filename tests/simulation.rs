//! Deterministic simulation of the delivery scheduler (src/core/scheduler) against a model
//! ledger, a model broker endpoint and a model shell, with a seeded RNG. Every step picks one
//! event at random: claims (delayed, reordered, dropped for a full mailbox; duplicate events
//! that the ledger's unique key turns into no claim),
//! answers (2xx, 4xx, 5xx, 410, timeouts, Retry-After, refusals), outcome writes that commit,
//! fail or are acknowledged late, ledger pages read while outcomes are being written, broker
//! disables and re-enables, replays, lease loss and regain with revokes delivered late, restarts
//! with outcomes unsaved, clock jumps, broker rows pushed unasked (the supervisor's refresh),
//! idle schedulers replaced by fresh ones (an idle actor retiring and starting again), in a
//! third of the seeds database crashes that forget the outcomes committed since the last WAL
//! flush (`postgres.outcome_commit = "async"`), and in another third requests not made for a
//! local shortage (no socket or file descriptor left). After every step the invariants of
//! issue 11 are checked; after the faults stop, every pending delivery must end delivered or
//! dead.
//!
//! `cargo test --test simulation` runs the regression seeds and `SIM_SEEDS` (default 2,000)
//! random ones; `SIM_SEED=n` runs one seed; `SIM_KEEP_GOING=1` runs every seed and counts the
//! failures per invariant; scripts/simulate.sh runs more in release mode. A failure prints the
//! seed and the last lines of its trace.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use webhook_delivery::core::breaker::BreakerConfig;
use webhook_delivery::core::lanes::Head;
use webhook_delivery::core::policy::{AttemptResult, RetryPolicy};
use webhook_delivery::core::scheduler::{
    AttemptToken, Claimed, Command, Decision, Delivery, IoToken, NotMade, Outcome, PartitionCursor,
    Scheduler, SchedulerConfig, Unusable, LOCAL_SHORTAGE_PAUSE,
};
use webhook_delivery::core::Millis;

/// Seeds that catch a past bug: each breaks an invariant when `scripts/sim-mutants.sh` undoes
/// the rule that fixed it (one line of src/core/scheduler/mod.rs), re-derived over 50,000 seeds
/// on 2 Dec 2026 after session 16's held mark changed what sweeps read: 295, 1715 and 43163 no
/// longer caught their rules and were replaced by 728, 791 and 25085 (each checked to catch its
/// rule as a regression seed, without the crashes and shortages random seeds draw). A seed stops
/// replaying its bug when the simulator draws differently or the scheduler acts differently,
/// so run that script again after such a change and replace the seeds that no longer catch
/// theirs. Each rule also has a unit test in src/core/scheduler/tests.rs that replays the seed's
/// interleaving by hand and fails with the rule undone (named after each entry):
/// - 2, 77, 108: a replay racing the save of an outcome (`replay-suspects`; 926 seeds catch it;
///   `a_replay_racing_a_dead_outcome_reads_the_lane_again`);
/// - 728, 791: an evicted load taken back later in the same sweep (`evicted-blocked`; 65;
///   `a_load_evicted_by_a_page_is_not_taken_back_by_it`);
/// - 23283, 25085: a claim joining a lane before the sweep after a replay (`replay-unread`;
///   only 2 of 50,000 seeds catch it, none of CI's 2,000 random ones;
///   `claims_wait_for_the_sweep_after_a_replay_when_the_head_is_saved_first`);
/// - 608, 1295: a claim older than a replay trusted (`replay-stale-claims`; 121;
///   `a_claim_older_than_a_replay_is_not_trusted`);
/// - 123, 263, 1112: a claim older than the last page trusted (`page-stale-claims`; 252;
///   `a_claim_older_than_the_last_page_is_not_trusted`);
/// - 43745: a claim trusting a head kept over a restart, when a replayed row could still be held
///   behind a started head and was dropped with it. Its rule (a restart set the replay's claim
///   guard again) went in session 15: the replay's own guard now lasts until a sweep has read
///   every pending row, and neither this seed, 50,000 others nor
///   `claims_wait_for_the_sweep_after_a_restart` broke without it. Kept for its interleaving;
/// - 12979934 (in `seeds_that_found_scheduler_bugs_in_long_runs`, not here: it needs the
///   crashes and shortages random seeds draw): a claim trusted after a sweep that ended with
///   memory full before the replayed row (`replay-read-partly`; none of 50,000 seeds;
///   `claims_wait_after_a_replay_until_a_sweep_has_read_everything`);
/// - 201157: a replayed delivery earlier than its load's head in flight, held behind that head
///   and sent after it (found on 1 Dec 2026 by the first run of a million seeds; before the fix
///   a page put such a row behind the started head, the one place a lane could not keep it in
///   order; `a_replayed_delivery_earlier_than_a_head_in_flight_waits_and_goes_first`);
/// - 153, 559: a dead outcome's save taking out of its lane a head a replay had made pending
///   again, after the page that followed the replay had counted it held, with the sweep's held
///   mark left past it (`held-suspect`; 92; found by seed 70 before the fix;
///   `a_replay_racing_a_dead_outcome_reads_the_lane_again_from_below_it`);
/// - 427, 813: the held mark raised again over a row given back while the sweep was reading its
///   partition (`held-unbroken`; 244; `a_row_given_back_during_a_sweep_stays_below_the_held_mark`).
///
/// The scheduler once also read the ledger again when a sweep ended having skipped a ready row
/// while a retry waited in memory. No seed caught its removal because it could not happen: a
/// ready row is skipped only when no retry waits (one would have given way), and nothing later
/// in the same sweep makes one wait. A retry that starts waiting afterwards sets
/// `room_changed`, which asks for the read. The rule is gone.
const REGRESSION_SEEDS: &[u64] = &[
    2, 77, 108, 123, 153, 263, 427, 559, 608, 728, 791, 813, 1112, 1295, 23283, 25085, 43745,
    201157,
];

const PARTITIONS: i32 = 2;
const FAULT_STEPS: usize = 400;
const CALM_LIMIT: Duration = Duration::from_secs(4 * 3600);

/// SplitMix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high - low + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<T>(&mut self, items: &[T]) -> Option<usize> {
        (!items.is_empty()).then(|| self.below(items.len() as u64) as usize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Pending,
    Delivered,
    Dead,
}

#[derive(Debug)]
struct Row {
    load: String,
    partition: i32,
    offset: i64,
    state: State,
    attempts: u32,
    next_at: Millis,
    /// The step at which it last became pending (claimed or replayed).
    pending_since: u64,
    first_sent: Option<u64>,
    /// Delivered or dead once, then pending again because a database crash forgot the outcome
    /// (an async commit, `postgres.outcome_commit`): sending it again is a duplicate the
    /// receiver already has (or, for a dead one, a replay), so later deliveries of its load
    /// need not wait for it.
    forgotten: bool,
}

/// A row as it was before an outcome commit the WAL has not flushed yet.
struct Unflushed {
    id: i64,
    state: State,
    attempts: u32,
    next_at: Millis,
}

struct Request {
    token: AttemptToken,
    id: i64,
    attempt: u32,
    load: String,
    /// Its incarnation restarted: the shell dropped it; an answer may still straggle in.
    cancelled: bool,
}

struct Write {
    token: IoToken,
    outcomes: Vec<Outcome<()>>,
    committed: bool,
}

struct Page {
    token: IoToken,
    cursors: Vec<PartitionCursor>,
    per_partition: usize,
    /// The rows read, and when: their due times are relative to then.
    snapshot: Option<(Millis, Vec<Delivery<()>>)>,
}

enum LeaseMessage {
    Gained(i32, u64),
    Lost(i32, u64),
}

struct World {
    rng: Rng,
    config: SchedulerConfig,
    now: Millis,
    step: u64,
    faults: bool,
    s: Scheduler<(), ()>,
    rows: BTreeMap<i64, Row>,
    next_id: i64,
    next_offset: [i64; PARTITIONS as usize],
    loads: usize,
    broker_enabled: bool,
    /// Which lease generation this instance truly holds per partition (the LeaseBook).
    lease_truth: [Option<u64>; PARTITIONS as usize],
    next_generation: u64,
    lease_messages: Vec<LeaseMessage>,
    claims_in_transit: Vec<Vec<Claimed<()>>>,
    requests: Vec<Request>,
    writes: Vec<Write>,
    pages: Vec<Page>,
    broker_reads: usize,
    /// Decided delivered or dead, not yet committed.
    decided_final: HashSet<i64>,
    /// Outcome commits since the last WAL flush, oldest first: what a database crash forgets.
    unflushed: Vec<Unflushed>,
    /// Its own stream, so that seeds without crashes draw exactly as they did before crashes
    /// were modelled (and the regression seeds keep replaying their bugs).
    crash_rng: Option<Rng>,
    /// Requests not made for a local shortage (out of file descriptors or connection budget),
    /// in another third of the seeds; its own stream for the same reason as `crash_rng`.
    shortage_rng: Option<Rng>,
    /// A request not made for a local shortage: no send before then, and the delivery's next
    /// attempt number is the one not made.
    paused_until: Option<Millis>,
    not_made_attempt: HashMap<i64, u32>,
    /// Per row, how long its last page took from read to answer: the scheduler adds a row's
    /// due time to the answer's time, so it sees a retry due that much later than the ledger.
    seen_late_by: HashMap<i64, Duration>,
    /// The page the scheduler waits for: the last one it asked. An older page answered late (one
    /// asked before a restart) is ignored by the scheduler, so its lag says nothing of what the
    /// scheduler saw (seed 10328443).
    page_awaited: Option<IoToken>,
    wake: Option<Millis>,
    trace: VecDeque<String>,
}

/// A third of the seeds also crash the database now and then. Not the regression seeds: a
/// crash changes what follows, and they must keep replaying their bugs.
fn crashes_for(seed: u64) -> Option<Rng> {
    let mut rng = Rng(seed ^ 0xDB_C4A5_11ED);
    (!REGRESSION_SEEDS.contains(&seed) && rng.chance(33)).then_some(rng)
}

/// Another third (drawn apart from the crashes) runs short of local resources now and then.
fn shortages_for(seed: u64) -> Option<Rng> {
    let mut rng = Rng(seed ^ 0x5_40C4_15F0);
    (!REGRESSION_SEEDS.contains(&seed) && rng.chance(33)).then_some(rng)
}

fn config_for(rng: &mut Rng) -> SchedulerConfig {
    SchedulerConfig {
        capacity: rng.range(1, 8) as usize,
        max_in_flight: rng.range(1, 4) as usize,
        request_timeout: Duration::from_millis(rng.range(500, 5_000)),
        endpoint_refresh: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: rng.range(1, 5) as u32,
            base_delay: Duration::from_millis(rng.range(100, 3_000)),
            max_delay: Duration::from_millis(rng.range(3_000, 60_000)),
        },
        breaker: BreakerConfig {
            failure_threshold: rng.range(1, 4) as u32,
            failure_ratio: 0.5,
            min_requests: rng.range(3, 20) as u32,
            window: Duration::from_secs(30),
            open: Duration::from_millis(rng.range(500, 5_000)),
            max_open: Duration::from_secs(30),
            half_open_probes: rng.range(1, 2) as u32,
        },
        adaptive_in_flight: rng.chance(50),
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed);
        let config = config_for(&mut rng);
        let loads = rng.range(1, 6) as usize;
        let mut world = World {
            s: Scheduler::new(config, Millis(0)),
            rng,
            config,
            now: Millis(0),
            step: 0,
            faults: true,
            rows: BTreeMap::new(),
            next_id: 1,
            next_offset: [0; PARTITIONS as usize],
            loads,
            broker_enabled: true,
            lease_truth: [None; PARTITIONS as usize],
            next_generation: 1,
            lease_messages: Vec::new(),
            claims_in_transit: Vec::new(),
            requests: Vec::new(),
            writes: Vec::new(),
            pages: Vec::new(),
            broker_reads: 0,
            decided_final: HashSet::new(),
            unflushed: Vec::new(),
            crash_rng: crashes_for(seed),
            shortage_rng: shortages_for(seed),
            paused_until: None,
            not_made_attempt: HashMap::new(),
            seen_late_by: HashMap::new(),
            page_awaited: None,
            wake: None,
            trace: VecDeque::new(),
        };
        for partition in 0..PARTITIONS {
            world.grant(partition);
        }
        world
    }

    fn log(&mut self, line: String) {
        if self.trace.len() >= 80 {
            self.trace.pop_front();
        }
        self.trace
            .push_back(format!("#{} t={} {line}", self.step, self.now.0));
    }

    fn fail(&self, seed: u64, what: &str) -> ! {
        let trace: Vec<&str> = self.trace.iter().map(String::as_str).collect();
        let lanes: Vec<String> = self
            .s
            .lanes()
            .loads()
            .map(|(load, head, len)| {
                let ids: Vec<i64> = self.s.lanes().entries(load).map(|e| e.id).collect();
                let due = self.s.lanes().head(load).map(|(e, _)| e.not_before.0);
                format!("{load}: {head:?} {ids:?} (len {len}, head due {due:?})")
            })
            .collect();
        panic!(
            "simulation seed {seed} broke an invariant: {what}\nconfig: {:?}\nlast steps:\n{}\nlanes at t={}: {lanes:#?}",
            self.config,
            trace.join("\n"),
            self.now.0,
        );
    }

    fn grant(&mut self, partition: i32) {
        let generation = self.next_generation;
        self.next_generation += 1;
        self.lease_truth[partition as usize] = Some(generation);
        self.lease_messages
            .push(LeaseMessage::Gained(partition, generation));
    }

    fn revoke(&mut self, partition: i32) {
        if let Some(generation) = self.lease_truth[partition as usize].take() {
            self.lease_messages
                .push(LeaseMessage::Lost(partition, generation));
        }
    }

    // ---- the model shell: carry out commands --------------------------------------------

    fn pump(&mut self, seed: u64) {
        while let Some(command) = self.s.poll_command() {
            match command {
                Command::Send {
                    token,
                    delivery_id,
                    load,
                    attempt,
                    ..
                } => self.on_send(seed, token, delivery_id, load, attempt),
                Command::Decided { outcome, .. } => {
                    self.log(format!(
                        "decided {} attempt {} {:?}",
                        outcome.delivery_id, outcome.attempt, outcome.decision
                    ));
                    if !matches!(outcome.decision, Decision::RetryIn(_)) {
                        self.decided_final.insert(outcome.delivery_id);
                    }
                }
                Command::WriteOutcomes { token, outcomes } => {
                    self.writes.push(Write {
                        token,
                        outcomes,
                        committed: false,
                    });
                }
                Command::LoadPending {
                    token,
                    cursors,
                    per_partition,
                } => {
                    self.log(format!("page asked: {per_partition} after {cursors:?}"));
                    self.page_awaited = Some(token);
                    self.pages.push(Page {
                        token,
                        cursors,
                        per_partition,
                        snapshot: None,
                    })
                }
                Command::LoadBroker => self.broker_reads += 1,
                Command::DisableBroker { delivery_id } => {
                    self.log(format!("410 from {delivery_id}: broker disabled"));
                    self.broker_enabled = false;
                }
                Command::BreakerChanged(t) => {
                    self.log(format!("breaker {} -> {} ({})", t.from, t.to, t.reason))
                }
            }
        }
        self.wake = self.s.next_wakeup(self.now);
    }

    fn on_send(&mut self, seed: u64, token: AttemptToken, id: i64, load: String, attempt: u32) {
        self.log(format!("send {id} ({load}) attempt {attempt}"));
        let row = &self.rows[&id];
        let partition = row.partition;
        // The shell's lease check at send time (the LeaseBook).
        if self.lease_truth[partition as usize].is_none() {
            self.log(format!("  not made: partition {partition} not leased"));
            self.s
                .attempt_not_made(self.now, token, NotMade::LeaseLapsed);
            return;
        }
        if row.state != State::Pending || self.decided_final.contains(&id) {
            self.fail(
                seed,
                &format!("delivery {id} sent after it was delivered or dead"),
            );
        }
        if self.paused_until.is_some_and(|until| self.now < until) {
            self.fail(
                seed,
                &format!("delivery {id} sent while paused for a local shortage"),
            );
        }
        if let Some(not_made) = self.not_made_attempt.remove(&id) {
            if attempt != not_made {
                self.fail(
                    seed,
                    &format!(
                        "delivery {id} sent as attempt {attempt} after attempt {not_made} was not made"
                    ),
                );
            }
        }
        if attempt > self.config.retry.max_attempts {
            self.fail(
                seed,
                &format!("delivery {id} attempt {attempt} > max_attempts"),
            );
        }
        if self.requests.iter().any(|r| !r.cancelled && r.load == load) {
            self.fail(seed, &format!("two deliveries of {load} in flight"));
        }
        let sent_since = row.first_sent.unwrap_or(self.step);
        let earlier = self.rows.iter().find(|(other, r)| {
            **other != id
                && r.load == row.load
                && r.offset < row.offset
                && r.state == State::Pending
                && r.pending_since <= sent_since
                && !r.forgotten
        });
        if let Some((earlier, _)) = earlier {
            self.fail(
                seed,
                &format!("delivery {id} of {load} sent while earlier {earlier} is pending"),
            );
        }
        let step = self.step;
        self.rows
            .get_mut(&id)
            .expect("sent rows exist")
            .first_sent
            .get_or_insert(step);
        self.requests.push(Request {
            token,
            id,
            attempt,
            load,
            cancelled: false,
        });
    }

    // ---- the model ledger -----------------------------------------------------------------

    fn claim(&mut self, seed: u64) {
        // A claim's commit waits for the WAL flush, which takes every earlier commit with it.
        self.unflushed.clear();
        let load = format!("L{}", self.rng.below(self.loads as u64));
        let partition = (load[1..].parse::<i32>().expect("load names are L<n>")) % PARTITIONS;
        let offset = self.next_offset[partition as usize];
        self.next_offset[partition as usize] += 1;
        if !self.broker_enabled {
            self.log(format!(
                "event {load}@{offset}: broker disabled, no delivery"
            ));
            return;
        }
        if self.faults && self.rng.chance(5) {
            // The same event again (Kafka redelivery): the ledger's unique key makes the
            // claim a no-op, so the scheduler hears nothing.
            self.log(format!("event {load}@{offset}: duplicate, no new delivery"));
            return;
        }
        let predecessor = self
            .rows
            .values()
            .filter(|r| r.load == load && r.state == State::Pending)
            .map(|r| r.offset)
            .max();
        let id = self.next_id;
        self.next_id += 1;
        self.rows.insert(
            id,
            Row {
                load: load.clone(),
                partition,
                offset,
                state: State::Pending,
                attempts: 0,
                next_at: self.now,
                pending_since: self.step,
                first_sent: None,
                forgotten: false,
            },
        );
        let claimed = Claimed {
            delivery: Delivery {
                id,
                load: load.clone(),
                partition,
                offset,
                attempts: 0,
                due_in: Duration::ZERO,
                item: (),
            },
            pending_predecessor: predecessor,
            claimed_at: self.now,
        };
        self.log(format!(
            "claim {id} {load}@{partition}/{offset} after {predecessor:?}"
        ));
        match self.rng.below(10) {
            // The mailbox was full: the shell sends "the ledger has more" instead.
            0 if self.faults => {
                self.log("  dropped (mailbox full)".into());
                self.s.ledger_has_more(self.now);
            }
            1..=3 if self.faults => self.claims_in_transit.push(vec![claimed]),
            _ => self.s.claimed(self.now, vec![claimed]),
        }
        self.pump(seed);
    }

    fn commit(&mut self, index: usize) {
        let write = &mut self.writes[index];
        write.committed = true;
        let outcomes = write.outcomes.clone();
        for outcome in outcomes {
            self.decided_final.remove(&outcome.delivery_id);
            let now = self.now;
            let row = self.rows.get_mut(&outcome.delivery_id).expect("rows exist");
            if row.state != State::Pending {
                continue;
            }
            self.unflushed.push(Unflushed {
                id: outcome.delivery_id,
                state: row.state,
                attempts: row.attempts,
                next_at: row.next_at,
            });
            row.attempts = outcome.attempt;
            match outcome.decision {
                Decision::Delivered => row.state = State::Delivered,
                Decision::Dead { .. } => row.state = State::Dead,
                Decision::RetryIn(delay) => row.next_at = now + delay,
            }
        }
    }

    fn snapshot(&self, page: &Page) -> Vec<Delivery<()>> {
        let mut rows: Vec<(&i64, &Row)> = page
            .cursors
            .iter()
            .flat_map(|cursor| {
                let mut of_partition: Vec<(&i64, &Row)> = self
                    .rows
                    .iter()
                    .filter(|(_, r)| r.state == State::Pending && r.partition == cursor.partition)
                    .filter(|(_, r)| cursor.after.is_none_or(|a| r.offset > a))
                    .collect();
                of_partition.sort_by_key(|(_, r)| r.offset);
                of_partition.truncate(page.per_partition);
                of_partition
            })
            .collect();
        rows.sort_by_key(|(_, r)| (r.partition, r.offset));
        rows.into_iter()
            .map(|(id, r)| Delivery {
                id: *id,
                load: r.load.clone(),
                partition: r.partition,
                offset: r.offset,
                attempts: r.attempts,
                due_in: r.next_at.since(self.now),
                item: (),
            })
            .collect()
    }

    // ---- one random step ----------------------------------------------------------------------

    fn answer_request(&mut self, seed: u64) {
        let Some(i) = self.rng.pick(&self.requests) else {
            return;
        };
        if self.requests[i].cancelled && self.rng.chance(80) {
            // An answer from a previous incarnation straggles: it comes much later, if at all.
            return;
        }
        let request = self.requests.swap_remove(i);
        if request.cancelled && self.rng.chance(50) {
            return; // dropped with its incarnation
        }
        if self.faults && !request.cancelled {
            if let Some(shortage) = &mut self.shortage_rng {
                if shortage.chance(20) {
                    return self.shortage(seed, request);
                }
            }
        }
        let result = if !self.faults {
            AttemptResult::Responded {
                status: 200,
                retry_after: None,
            }
        } else {
            match self.rng.below(100) {
                0..=49 => AttemptResult::Responded {
                    status: 200,
                    retry_after: None,
                },
                50..=64 => AttemptResult::Responded {
                    status: 503,
                    retry_after: None,
                },
                65..=69 => AttemptResult::Responded {
                    status: 429,
                    retry_after: Some(Duration::from_millis(self.rng.range(0, 120_000))),
                },
                70..=74 => AttemptResult::Responded {
                    status: 400,
                    retry_after: None,
                },
                75 => AttemptResult::Responded {
                    status: 410,
                    retry_after: None,
                },
                76..=77 => AttemptResult::RequestInvalid,
                _ => AttemptResult::TransportFailed,
            }
        };
        self.log(format!(
            "answer {:?} for {}{}",
            result,
            request.load,
            if request.cancelled {
                " (old incarnation)"
            } else {
                ""
            }
        ));
        let jitter = self.rng.unit();
        self.s
            .attempt_finished(self.now, request.token, result, jitter, ());
        if !request.cancelled {
            // Its socket is free: a pause for a local shortage ends.
            self.paused_until = None;
        }
        self.pump(seed);
    }

    /// The connect failed for want of local resources: no request was made.
    fn shortage(&mut self, seed: u64, request: Request) {
        let failures = self.s.breaker().consecutive_failures();
        let state = self.s.breaker().state().name();
        self.log(format!("not made: local shortage ({})", request.load));
        self.s
            .attempt_not_made(self.now, request.token, NotMade::LocalShortage);
        if self.s.breaker().consecutive_failures() > failures
            || (state == "closed" && self.s.breaker().state().name() != "closed")
        {
            self.fail(seed, "a local shortage counted against the broker");
        }
        if self.config.adaptive_in_flight && self.s.in_flight_limit() > self.s.in_flight().max(1) {
            self.fail(
                seed,
                "after a local shortage the in-flight limit is above the sockets held",
            );
        }
        self.paused_until = Some(self.now + LOCAL_SHORTAGE_PAUSE);
        // Held to its number only where the ledger agrees: an earlier database crash may have
        // forgotten the outcome the scheduler counted, and a reload then numbers from the row.
        if self.rows[&request.id].attempts + 1 == request.attempt {
            self.not_made_attempt.insert(request.id, request.attempt);
        }
        self.pump(seed);
    }

    fn advance_write(&mut self, seed: u64) {
        let Some(i) = self.rng.pick(&self.writes) else {
            return;
        };
        if !self.writes[i].committed {
            if self.faults && self.rng.chance(15) {
                let write = self.writes.swap_remove(i);
                self.log(format!("write {:?} failed", write.token));
                self.s.outcomes_save_failed(self.now, write.token);
            } else {
                self.log(format!("write {:?} committed", self.writes[i].token));
                self.commit(i);
            }
        } else {
            let write = self.writes.swap_remove(i);
            self.log(format!("write {:?} acknowledged", write.token));
            self.s.outcomes_saved(self.now, write.token);
        }
        self.pump(seed);
    }

    fn advance_page(&mut self, seed: u64) {
        let Some(i) = self.rng.pick(&self.pages) else {
            return;
        };
        if self.pages[i].snapshot.is_none() {
            let rows = self.snapshot(&self.pages[i]);
            self.log(format!(
                "page read: {:?}",
                rows.iter().map(|r| r.id).collect::<Vec<_>>()
            ));
            self.pages[i].snapshot = Some((self.now, rows));
            return;
        }
        let page = self.pages.swap_remove(i);
        if self.faults && self.rng.chance(5) {
            self.log("page failed".into());
            self.s.load_failed(self.now, page.token);
        } else {
            self.log("page answered".into());
            let (read_at, rows) = page.snapshot.expect("checked above");
            if self.page_awaited == Some(page.token) {
                let late_by = self.now.since(read_at);
                for row in &rows {
                    self.seen_late_by.insert(row.id, late_by);
                }
            }
            self.s.loaded(self.now, page.token, rows);
        }
        self.pump(seed);
    }

    fn answer_broker_read(&mut self, seed: u64) {
        if self.broker_reads > 0 {
            self.broker_reads -= 1;
        } else if self.faults && self.rng.chance(30) {
            // The supervisor's periodic refresh: every actor gets its row, asked for or not.
            self.log("broker row pushed".into());
        } else {
            return;
        }
        if self.faults && self.rng.chance(10) {
            self.s.broker_load_failed(self.now);
        } else if self.broker_enabled {
            self.s.broker_loaded(self.now, self.now, Ok(()));
        } else {
            self.s.broker_loaded(
                self.now,
                self.now,
                Err(Unusable {
                    class: "broker_disabled",
                    reason: "broker disabled".into(),
                }),
            );
        }
        self.pump(seed);
    }

    fn deliver_lease_message(&mut self, seed: u64) {
        let Some(i) = self.rng.pick(&self.lease_messages) else {
            return;
        };
        match self.lease_messages.swap_remove(i) {
            LeaseMessage::Gained(p, g) => {
                self.log(format!("lease gained {p} gen {g}"));
                self.s.lease_gained(self.now, p, g);
            }
            LeaseMessage::Lost(p, g) => {
                self.log(format!("lease lost {p} gen {g}"));
                self.s.lease_lost(self.now, p, g);
            }
        }
        self.pump(seed);
    }

    fn advance_time(&mut self, seed: u64, by: Duration) {
        self.now = self.now + by;
        if self.wake.is_some_and(|at| at <= self.now) {
            self.s.tick(self.now);
            self.pump(seed);
        }
    }

    /// The database crashes: the outcome commits the WAL had not flushed are forgotten, every
    /// write and page under way fails with its connection. Leases and claims are untouched
    /// (their commits waited for the flush).
    fn crash_database(&mut self, seed: u64) {
        self.log(format!(
            "database crash: {} unflushed outcome commits forgotten",
            self.unflushed.len()
        ));
        let step = self.step;
        for before in std::mem::take(&mut self.unflushed).into_iter().rev() {
            let row = self.rows.get_mut(&before.id).expect("rows exist");
            if row.state != State::Pending {
                row.forgotten = true;
                row.pending_since = step;
            }
            row.state = before.state;
            row.attempts = before.attempts;
            row.next_at = before.next_at;
        }
        for write in std::mem::take(&mut self.writes) {
            self.s.outcomes_save_failed(self.now, write.token);
        }
        // The rows' attempt counts went back with the commits.
        self.not_made_attempt.clear();
        for page in std::mem::take(&mut self.pages) {
            self.s.load_failed(self.now, page.token);
        }
        // The crash closed the replay listener's connection too; once it listens again the
        // shell tells every scheduler, as after a replay (src/startup.rs), so the forgotten
        // rows are read even where a scheduler's sweeps would start after what it holds.
        self.s.replayed(self.now);
        self.pump(seed);
    }

    fn fault_step(&mut self, seed: u64) {
        self.step += 1;
        if let Some(crash) = &mut self.crash_rng {
            match crash.below(100) {
                0..=1 => return self.crash_database(seed),
                // The WAL writer flushes on its own (wal_writer_delay).
                2..=3 => self.unflushed.clear(),
                _ => {}
            }
        }
        match self.rng.below(100) {
            0..=17 => self.claim(seed),
            18..=21 => {
                if let Some(i) = self.rng.pick(&self.claims_in_transit) {
                    let batch = self.claims_in_transit.swap_remove(i);
                    self.log(format!("late claim {}", batch[0].delivery.id));
                    self.s.claimed(self.now, batch);
                    self.pump(seed);
                }
            }
            22..=37 => self.answer_request(seed),
            38..=49 => self.advance_write(seed),
            50..=59 => self.advance_page(seed),
            60..=63 => self.answer_broker_read(seed),
            64..=65 => {
                self.broker_enabled = !self.broker_enabled;
                self.log(format!("broker enabled = {}", self.broker_enabled));
                if self.rng.chance(50) {
                    self.s.broker_changed(self.now);
                    self.pump(seed);
                }
            }
            66..=67 => {
                let dead: Vec<i64> = self
                    .rows
                    .iter()
                    .filter(|(_, r)| r.state == State::Dead)
                    .map(|(id, _)| *id)
                    .collect();
                if let Some(i) = self.rng.pick(&dead) {
                    let step = self.step;
                    let row = self.rows.get_mut(&dead[i]).expect("rows exist");
                    row.state = State::Pending;
                    row.attempts = 0;
                    row.pending_since = step;
                    row.next_at = self.now;
                    self.not_made_attempt.remove(&dead[i]);
                    self.log(format!("replay {}", dead[i]));
                    self.s.replayed(self.now);
                    self.pump(seed);
                }
            }
            68..=69 => {
                let partition = self.rng.below(PARTITIONS as u64) as i32;
                if self.lease_truth[partition as usize].is_some() {
                    self.log(format!("revoke {partition}"));
                    self.revoke(partition);
                } else {
                    self.log(format!("grant {partition}"));
                    self.grant(partition);
                }
            }
            70..=73 => self.deliver_lease_message(seed),
            74 => {
                self.log("restart".into());
                for request in &mut self.requests {
                    request.cancelled = true;
                }
                self.s.restarted(self.now);
                self.pump(seed);
            }
            75..=77 => {
                self.s.ledger_has_more(self.now);
                self.pump(seed);
            }
            78 => {
                let jump = Duration::from_millis(self.rng.range(1_000, 120_000));
                self.log(format!("clock jumps {} ms", jump.as_millis()));
                self.advance_time(seed, jump);
            }
            _ => {
                let by = Duration::from_millis(self.rng.range(0, 300));
                self.advance_time(seed, by);
                self.retire_if_idle(seed);
            }
        }
    }

    /// An idle actor retires and a new one starts on demand: the scheduler is replaced by a
    /// fresh one with the leases the LeaseBook holds. The supervisor retires an actor only when
    /// every message it sent was received (no claim or lease message in transit), and whatever
    /// the old actor still had running (cancelled requests, abandoned pages) ends with it.
    fn retire_if_idle(&mut self, seed: u64) {
        if !self.s.is_idle()
            || !self.lease_messages.is_empty()
            || !self.claims_in_transit.is_empty()
        {
            return;
        }
        self.log("idle: retired, a fresh scheduler starts".into());
        self.paused_until = None;
        self.requests.clear();
        self.pages.clear();
        self.writes.clear();
        self.s = Scheduler::new(self.config, self.now);
        for partition in 0..PARTITIONS {
            if let Some(generation) = self.lease_truth[partition as usize] {
                self.s.lease_gained(self.now, partition, generation);
            }
        }
        self.pump(seed);
    }

    // ---- invariants -------------------------------------------------------------------------

    fn check(&self, seed: u64) {
        let s = &self.s;
        if s.held() > self.config.capacity {
            self.fail(
                seed,
                &format!("{} held > capacity {}", s.held(), self.config.capacity),
            );
        }
        if s.in_flight() > self.config.max_in_flight {
            self.fail(seed, "more requests in flight than allowed");
        }
        if !(1..=self.config.max_in_flight).contains(&s.in_flight_limit()) {
            self.fail(seed, "the concurrency limit left [1, max_in_flight]");
        }
        let mut started = HashMap::new();
        for (load, head, _) in s.lanes().loads() {
            if head != Head::Idle {
                *started.entry(load).or_insert(0) += 1;
            }
        }
        let breaker = s.breaker();
        if breaker.state().name() == "half_open" && breaker.probes_in_flight() == 0 {
            // A probe is due: nothing may be ready and left unsent while requests are allowed.
            let ready = s
                .lanes()
                .next_ready(self.now)
                .and_then(|l| s.lanes().head(l))
                .is_some_and(|(e, _)| s.holds_lease(e.order.0));
            let paused = self.paused_until.is_some_and(|until| self.now < until);
            if ready && s.in_flight() < s.in_flight_limit() && s.endpoint_usable() && !paused {
                self.fail(seed, "half-open with no probe in flight while one is ready");
            }
        }
        self.check_room(seed);
    }

    /// Retries never keep a ready head of another load out of memory once the scheduler has
    /// read the ledger.
    fn check_room(&self, seed: u64) {
        let s = &self.s;
        // While a sweep is reading, it may not have reached the ready row yet.
        if s.ledger_read_in_flight() || s.held() < self.config.capacity {
            return;
        }
        // Nothing is ready while the breaker is open: the scheduler reads again once it
        // half-opens (in that same step, so the read is in flight by the next check).
        if s.breaker().open_until().is_some() {
            return;
        }
        // Waiting for a retry by the scheduler's clock and by the ledger's (a page's relative
        // due times reach the scheduler late, so it may see a retry due a little later).
        let waiting = s.lanes().loads().any(|(load, head, _)| {
            head == Head::Idle
                && s.lanes().head(load).is_some_and(|(e, _)| {
                    e.not_before > self.now && self.rows[&e.id].next_at > self.now
                })
        });
        if !waiting {
            return;
        }
        let in_transit: HashSet<&str> = self
            .claims_in_transit
            .iter()
            .flatten()
            .map(|c| c.delivery.load.as_str())
            .collect();
        let mut first_pending: HashMap<&str, (i64, &Row)> = HashMap::new();
        for (&id, row) in &self.rows {
            if row.state == State::Pending {
                let entry = first_pending.entry(row.load.as_str()).or_insert((id, row));
                if row.offset < entry.1.offset {
                    *entry = (id, row);
                }
            }
        }
        for (load, (id, row)) in first_pending {
            // Due by the scheduler's clock too: a page's relative due time reaches it late
            // (seed 6645970: due 459 ms after a read answered 553 ms later).
            let late_by = self.seen_late_by.get(&id).copied().unwrap_or_default();
            let held = s.lanes().has_lane(load);
            // A forgotten outcome is found by the next sweep, not by the scheduler's memory;
            // until then its load waits behind it (it is the load's head, in order), so the
            // load's later rows are not ready either (seed 5100680).
            if !held
                && !row.forgotten
                && !in_transit.contains(load)
                && row.next_at + late_by <= self.now
                && s.lease_generation(row.partition).is_some()
                && s.lease_generation(row.partition) == self.lease_truth[row.partition as usize]
            {
                self.fail(
                    seed,
                    &format!("retries fill memory while {load} has a ready delivery in the ledger"),
                );
            }
        }
    }

    // ---- the calm phase ----------------------------------------------------------------------

    fn calm_down(&mut self, seed: u64) {
        self.faults = false;
        self.log("---- faults stop ----".into());
        for partition in 0..PARTITIONS {
            if self.lease_truth[partition as usize].is_none() {
                self.grant(partition);
            }
        }
        while !self.lease_messages.is_empty() {
            self.deliver_lease_message(seed);
        }
        self.broker_enabled = true;
        self.s.broker_changed(self.now);
        for batch in std::mem::take(&mut self.claims_in_transit) {
            self.s.claimed(self.now, batch);
        }
        self.pump(seed);
        let start = self.now;
        let mut next_sweep = self.now;
        while self.rows.values().any(|r| r.state == State::Pending) {
            if self.now.since(start) > CALM_LIMIT {
                let stuck: Vec<_> = self
                    .rows
                    .iter()
                    .filter(|(_, r)| r.state == State::Pending)
                    .map(|(id, r)| format!("{id}:{}@{}", r.load, r.offset))
                    .collect();
                self.fail(
                    seed,
                    &format!("deliveries still pending after the faults stopped: {stuck:?}"),
                );
            }
            self.step += 1;
            if self.now >= next_sweep {
                // The supervisor's periodic sweep.
                next_sweep = self.now + Duration::from_secs(5);
                self.s.ledger_has_more(self.now);
                self.pump(seed);
            }
            let busy = !self.requests.is_empty()
                || !self.writes.is_empty()
                || !self.pages.is_empty()
                || self.broker_reads > 0;
            match self.rng.below(5) {
                0 => self.answer_request(seed),
                1 => self.advance_write(seed),
                2 => self.advance_page(seed),
                3 => self.answer_broker_read(seed),
                _ => self.retire_if_idle(seed),
            }
            if !busy || self.rng.chance(20) {
                let to_wake = self
                    .wake
                    .map_or(Duration::from_secs(1), |at| at.since(self.now))
                    .clamp(Duration::from_millis(1), Duration::from_secs(1));
                self.advance_time(seed, to_wake);
            }
            self.check(seed);
        }
    }
}

fn run(seed: u64) {
    let mut world = World::new(seed);
    while !world.lease_messages.is_empty() {
        world.deliver_lease_message(seed);
    }
    for _ in 0..FAULT_STEPS {
        world.fault_step(seed);
        world.check(seed);
    }
    world.calm_down(seed);
}

#[test]
fn regression_seeds() {
    for &seed in REGRESSION_SEEDS {
        run(seed);
    }
}

/// Seeds on which the simulator once reported a violation the scheduler did not commit:
/// 150220 (a not-made request held to an attempt number the ledger no longer had, after a
/// database crash forgot an outcome), 5100680 (a load's second row taken for its head when the
/// first was such a forgotten outcome), 6645970 (a retry counted as due by the ledger's clock
/// before the page that carried it could have told the scheduler) and 10328443 (that page's
/// lag taken from a stale page, asked before a restart, which the scheduler ignored). They must
/// keep passing, so a check loosened or tightened the wrong way shows here and not a million
/// seeds later. Run as random seeds are (with crashes and shortages), unlike
/// `REGRESSION_SEEDS`.
#[test]
fn seeds_the_simulator_once_misjudged() {
    for seed in [150_220, 5_100_680, 6_645_970, 10_328_443] {
        run(seed);
    }
}

/// Seeds of long runs (scripts/simulate.sh, a million at a time) that found a scheduler bug,
/// run as random seeds are (with crashes and shortages), which is how they found it:
/// 12979934, a claim trusted after a replay because the sweep after it had ended, though it
/// ended with memory full before reaching the replayed row (a later delivery of that load was
/// sent with an earlier one pending; fixed by `read_through`,
/// `claims_wait_after_a_replay_until_a_sweep_has_read_everything`).
#[test]
fn seeds_that_found_scheduler_bugs_in_long_runs() {
    run(12_979_934);
}

#[test]
fn random_seeds() {
    if let Ok(seed) = std::env::var("SIM_SEED") {
        run(seed.parse().expect("SIM_SEED is a number"));
        return;
    }
    let seeds: u64 = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let first: u64 = std::env::var("SIM_FIRST_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    if std::env::var("SIM_KEEP_GOING").is_err() {
        for seed in first..first + seeds {
            run(seed);
        }
        return;
    }
    // Every seed, failures counted by the invariant they broke (for comparing variants).
    std::panic::set_hook(Box::new(|_| {}));
    let mut broken: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for seed in first..first + seeds {
        if let Err(panic) = std::panic::catch_unwind(|| run(seed)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "non-string panic".to_owned());
            // The first line without its numbers names the invariant.
            let invariant: String = message
                .lines()
                .next()
                .and_then(|line| line.split_once("invariant: "))
                .map_or("?", |(_, what)| what)
                .chars()
                .filter(|c| !c.is_ascii_digit())
                .collect();
            broken.entry(invariant).or_default().push(seed);
        }
    }
    let _ = std::panic::take_hook();
    for (invariant, seeds) in &broken {
        let first_few: Vec<u64> = seeds.iter().copied().take(5).collect();
        let regression: Vec<u64> = seeds
            .iter()
            .copied()
            .filter(|seed| REGRESSION_SEEDS.contains(seed))
            .collect();
        println!(
            "{:>5} seeds: {invariant}… (first: {first_few:?}; regression seeds among them: {regression:?})",
            seeds.len()
        );
    }
    assert!(broken.is_empty(), "some seeds broke an invariant");
}
