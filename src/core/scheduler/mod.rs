//! The delivery scheduler of one broker, without I/O (in the style of quinn-proto): the shell
//! feeds it inputs (deliveries claimed or loaded, attempts finished, outcomes saved, leases,
//! broker row changes, timers, restarts) with the time, and carries out the commands it queues
//! (send, write outcomes, load from the ledger, load the broker row, disable the broker, log a
//! breaker transition). `next_wakeup` says when to call `tick` if nothing else happens.
//!
//! What it decides, and the rules that keep it right:
//! - **Lanes** (one per load, [`Lanes`]): at most one delivery of a load started and not yet
//!   saved; a lane holds a prefix of its load's pending deliveries in offset order.
//! - **Slots**: at most the broker's concurrency limit of requests out ([`ConcurrencyLimit`]:
//!   adaptive up to `max_in_flight`, or fixed at it). A slot is free as soon as the answer is
//!   in; only that load's lane waits for the outcome to be saved.
//! - **Outcome writes**: up to two under way at once, so a decided outcome seldom waits for
//!   the rest of the broker's previous write before its own starts, and more while those hold
//!   only a few outcomes (a broker with few lanes has nothing to batch). A lane has at most one
//!   outcome unsaved, so no two writes touch the same lane, and they may commit in any order.
//! - **Breaker** ([`CircuitBreaker`]): a probe slot is taken only for a request really made.
//! - **Room**: at most `capacity` deliveries held. Deliveries waiting for a retry give way to a
//!   ready delivery of another load (they are evicted; the ledger still has them). A claimed
//!   delivery of a load holding less than its fair share of memory takes the place of the
//!   last delivery of the longest lane, so the first load claimed cannot fill memory while
//!   the others wait for a sweep.
//! - **Ledger loads** walk the broker's pending rows with a cursor per partition, page by page,
//!   so rows that cannot be used now (behind a retry) do not hide the ones that can. A page
//!   gives every partition still being read an equal share, so one deep load cannot fill memory
//!   while the broker's loads in other partitions wait. A row whose outcome was saved while the
//!   page was being read is not taken back. Nothing is read while the breaker is open. A sweep
//!   starts each partition after the rows known to be held ([`Lanes::held_through`]: lowered by
//!   an eviction, forgotten on a replay, a restart or a lease change) and a page asks for what
//!   fits, so a pending row is read about once, not once per sweep.
//! - **Generations**: a lease is (partition, generation), so a stale revoke cannot drop a newer
//!   lease; requests carry the incarnation (`epoch`) that started them, so after a restart the
//!   answers to the old incarnation's requests are ignored.

use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use super::breaker::{BreakerConfig, CircuitBreaker, ProbeId, RequestOutcome, Transition};
use super::concurrency::{ConcurrencyConfig, ConcurrencyLimit, Response};
use super::lanes::{Entry, Head, Lanes, Order};
use super::Millis;
use crate::core::policy::{classify, AttemptResult, RetryPolicy, Verdict};

#[cfg(test)]
mod tests;

/// How long to wait before retrying a failed outcome write, ledger page or broker row read.
const RETRY_IO_AFTER: Duration = Duration::from_secs(1);
/// How long a broker starts no request after one could not be made for want of local resources
/// (no file descriptor, no outbound connection left in the budget), unless one of its requests
/// finishes first and frees a socket of its own. Our shortage, not the broker's fault: nothing
/// counts against its breaker or its attempts; the pause keeps a process out of sockets from
/// spinning on every ready load of every broker.
pub const LOCAL_SHORTAGE_PAUSE: Duration = Duration::from_secs(1);
/// Outcome writes under way at once, normally. More than one, so a decided outcome need not
/// wait for the rest of the previous write; few, so a busy broker's outcomes still go out in
/// batches.
const MAX_WRITES_IN_FLIGHT: usize = 2;
/// While the writes under way hold fewer outcomes than this, another may start anyway. A broker
/// with few lanes (a few deep loads) has about one outcome per write, so there is nothing to
/// batch, and with only two writes its third lane's outcome would wait for another lane's save
/// before its own started whenever the other two were saving (`hotload`, docs/performance.md
/// "Session 7").
const SMALL_WRITES_OUTCOMES: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SchedulerConfig {
    /// Deliveries held in memory at most (`delivery.mailbox_capacity`).
    pub capacity: usize,
    /// Requests out at once at most (`delivery.max_in_flight_per_broker`).
    pub max_in_flight: usize,
    /// Whether the limit adapts to the endpoint's round trips below `max_in_flight`
    /// (`delivery.adaptive_in_flight`).
    pub adaptive_in_flight: bool,
    /// A request's time limit; a half-open probe unanswered for longer than this (plus a
    /// second) counts as failed.
    pub request_timeout: Duration,
    /// How long a loaded broker row is trusted before it is read again.
    pub endpoint_refresh: Duration,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
}

/// A pending delivery as the scheduler sees it; `item` is whatever the shell needs to send it.
#[derive(Debug, Clone)]
pub struct Delivery<P> {
    pub id: i64,
    pub load: String,
    pub partition: i32,
    pub offset: i64,
    /// Attempts already made.
    pub attempts: u32,
    /// How long until it may be attempted (zero when due).
    pub due_in: Duration,
    pub item: P,
}

/// A delivery fresh from a claim, with the offset of the newest earlier delivery of the same
/// (broker, load) that was pending when it was claimed.
#[derive(Debug, Clone)]
pub struct Claimed<P> {
    pub delivery: Delivery<P>,
    pub pending_predecessor: Option<i64>,
    /// When the claim was sent to the ledger (before it committed). A ledger page read after
    /// that may have loaded, sent and finished the delivery already.
    pub claimed_at: Millis,
}

/// Why a broker gets no requests (a broken row, a disabled broker, a URL the SSRF guard
/// refuses): its deliveries are dead-lettered with this, without a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unusable {
    pub class: &'static str,
    pub reason: String,
}

/// Identifies one request: the incarnation that started it and a sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AttemptToken {
    pub epoch: u32,
    pub seq: u64,
}

/// Identifies one ledger read or outcome write, so a late answer from before a restart (or
/// from an abandoned load) is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IoToken(u64);

/// What the scheduler decided for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Delivered,
    RetryIn(Duration),
    Dead { reason: String },
}

/// A decided attempt, to be written to the ledger. `report` is the shell's record of the
/// request (timings, status, error); `None` for a delivery dead-lettered without a request.
#[derive(Debug, Clone)]
pub struct Outcome<R> {
    pub delivery_id: i64,
    pub load: String,
    pub order: Order,
    pub attempt: u32,
    pub decision: Decision,
    /// When it was decided; a retry's delay counts from here.
    pub decided_at: Millis,
    /// Why no request was made, when none was.
    pub not_sent: Option<Unusable>,
    pub report: Option<R>,
}

/// Why a started request was not made after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotMade {
    /// The partition's lease no longer covers a request started now: the delivery stays
    /// pending for the partition's owner.
    LeaseLapsed,
    /// This process could not open a connection (out of file descriptors, or of its outbound
    /// connection budget): the delivery waits in its lane, the attempt is not counted, the
    /// breaker hears nothing, the broker starts no request for `LOCAL_SHORTAGE_PAUSE` or until
    /// one of its requests finishes, and an adaptive in-flight limit comes down to the requests
    /// it has in flight (the sockets it holds).
    LocalShortage,
}

#[derive(Debug, Clone)]
pub enum Command<P, R> {
    /// Make this request. Answer with `attempt_finished` or `attempt_not_made`.
    Send {
        token: AttemptToken,
        delivery_id: i64,
        load: String,
        attempt: u32,
        item: P,
    },
    /// The decision for an attempt, for the log line and the metrics (written later, in a
    /// `WriteOutcomes`).
    Decided { outcome: Outcome<R>, item: P },
    /// Write these outcomes in one round trip. Answer with `outcomes_saved` or
    /// `outcomes_save_failed`.
    WriteOutcomes {
        token: IoToken,
        outcomes: Vec<Outcome<R>>,
    },
    /// Read up to `per_partition` pending rows of this broker from each cursor's partition, in
    /// offset order after the cursor; the page is in (partition, offset) order. Answer with
    /// `loaded` or `load_failed`.
    LoadPending {
        token: IoToken,
        cursors: Vec<PartitionCursor>,
        per_partition: usize,
    },
    /// Read the broker row. Answer with `broker_loaded` or `broker_load_failed`. (The shell
    /// may also pass in rows it read unasked, the periodic refresh.)
    LoadBroker,
    /// The broker answered 410 Gone to this delivery: disable it in the ledger.
    DisableBroker { delivery_id: i64 },
    /// Log (and store) a breaker state change.
    BreakerChanged(Transition),
}

/// Where a sweep stands in one partition: its next rows are the ones after `after` (all of them
/// when `None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionCursor {
    pub partition: i32,
    pub after: Option<i64>,
}

#[derive(Debug)]
struct InFlight {
    id: i64,
    started: Millis,
    load: String,
    attempt: u32,
    probe: Option<ProbeId>,
}

#[derive(Debug)]
enum EndpointState {
    Unknown,
    Known {
        usable: Result<(), Unusable>,
        at: Millis,
    },
}

/// One walk over the ledger's pending rows, page by page.
#[derive(Debug)]
struct Sweep {
    /// The `wanted` count when it started: everything wanted before is covered once it ends.
    started_at: u64,
    /// The partitions not read to the end yet, each with the offset its next page starts after.
    cursors: BTreeMap<i32, Option<i64>>,
    /// Rows asked of each partition for the page being read: one that returns fewer is read to
    /// the end.
    per_partition: usize,
    /// Loads with a pending row this sweep saw but did not take: their later rows must not be
    /// taken either (a lane is a prefix).
    blocked: HashSet<String>,
    /// A row was left in the ledger for lack of room.
    skipped: bool,
    /// The partitions where every row this sweep has read was held (it started after
    /// `Lanes::held_through`), with the mark as this sweep last set it.
    prefix: BTreeMap<i32, Option<i64>>,
}

pub struct Scheduler<P, R> {
    config: SchedulerConfig,
    epoch: u32,
    next_seq: u64,
    lanes: Lanes<P>,
    breaker: CircuitBreaker,
    in_flight_limit: ConcurrencyLimit,
    /// Partitions whose lease this instance holds, with the lease's generation.
    leases: BTreeMap<i32, u64>,
    /// The newest lease generation seen per partition (a stale grant is ignored too).
    newest_lease: HashMap<i32, u64>,
    endpoint: EndpointState,
    loading_endpoint: bool,
    /// The row is known to have changed at this time, after it was read (see
    /// `broker_changed`): only a read started later is trusted.
    endpoint_outdated: Option<Millis>,
    endpoint_retry_at: Option<Millis>,
    in_flight: HashMap<AttemptToken, InFlight>,
    outbox: Vec<Outcome<R>>,
    /// Outcome writes under way (`MAX_WRITES_IN_FLIGHT`, more while they are small); no two
    /// hold outcomes of the same lane.
    saving: HashMap<IoToken, Vec<Outcome<R>>>,
    save_retry_at: Option<Millis>,
    /// Bumped whenever the ledger may hold pending rows that are not in memory.
    wanted: u64,
    /// The `wanted` value covered by the last finished sweep.
    done: u64,
    /// The `wanted` value covered by the last sweep that took in every pending row it found:
    /// read to the end of every partition, nothing left for want of room, no load skipped. A
    /// sweep that stops with memory full is done too, but may not have reached a replayed row.
    read_through: u64,
    sweep: Option<Sweep>,
    loading: Option<IoToken>,
    /// A ledger read failed: the next one waits until then (a database outage must not become
    /// a hot loop of failing reads).
    load_retry_at: Option<Millis>,
    /// Deliveries whose outcome was saved while a ledger page was being read: that page may
    /// still show them as pending.
    saved_during_load: HashSet<i64>,
    /// When the last ledger page was taken in, or dead letters were last replayed. A claim
    /// made before that is not trusted: the page may have brought its delivery in (and it may
    /// be finished already), or the replay made an earlier delivery of its load pending again.
    claims_stale_before: Option<Millis>,
    /// The earliest retry time of a delivery given back to the ledger to make room.
    parked_until: Option<Millis>,
    /// No request starts before then, or before a request in flight finishes: the last one
    /// could not be made for want of local resources ([`NotMade::LocalShortage`]).
    sends_paused_until: Option<Millis>,
    /// The `wanted` count whose sweep reads what the last replay made pending.
    replay_read_by: Option<u64>,
    /// Loads whose lane a replay may have put out of order, read again from the ledger once
    /// their started head's outcome is saved instead of moving on: a head awaiting the save of
    /// its outcome when dead letters were replayed (if the outcome was already committed as
    /// dead, the replay made it pending again), and a load whose page showed a row earlier
    /// than its head in flight or awaiting its save (a replayed dead letter, left out).
    replay_suspects: HashSet<String>,
    /// A sweep stopped for lack of room: look again once half the room is free.
    overflowed: bool,
    /// Since the last sweep, a lane ended or a retry started waiting.
    room_changed: bool,
    draining: bool,
    commands: VecDeque<Command<P, R>>,
}

impl<P: Clone, R: Clone> Scheduler<P, R> {
    pub fn new(config: SchedulerConfig, now: Millis) -> Self {
        let probe_timeout = config.request_timeout + Duration::from_secs(1);
        Scheduler {
            config,
            epoch: 0,
            next_seq: 0,
            lanes: Lanes::default(),
            breaker: CircuitBreaker::new(config.breaker, probe_timeout, now),
            in_flight_limit: ConcurrencyLimit::new(ConcurrencyConfig {
                max: config.max_in_flight,
                adaptive: config.adaptive_in_flight,
            }),
            leases: BTreeMap::new(),
            newest_lease: HashMap::new(),
            endpoint: EndpointState::Unknown,
            loading_endpoint: false,
            endpoint_outdated: None,
            endpoint_retry_at: None,
            in_flight: HashMap::new(),
            outbox: Vec::new(),
            saving: HashMap::new(),
            save_retry_at: None,
            // A new scheduler knows nothing yet: look in the ledger first.
            wanted: 1,
            done: 0,
            read_through: 0,
            sweep: None,
            loading: None,
            load_retry_at: None,
            saved_during_load: HashSet::new(),
            claims_stale_before: None,
            parked_until: None,
            sends_paused_until: None,
            replay_read_by: None,
            replay_suspects: HashSet::new(),
            overflowed: false,
            room_changed: false,
            draining: false,
            commands: VecDeque::new(),
        }
    }

    // ---- outputs -------------------------------------------------------------------------

    /// The next command to carry out, oldest first.
    pub fn poll_command(&mut self) -> Option<Command<P, R>> {
        self.commands.pop_front()
    }

    /// When to call `tick` if no other input arrives first. Only times after `now`: whatever
    /// is due already and still waiting waits for an input (an answer, a save, a row).
    pub fn next_wakeup(&self, now: Millis) -> Option<Millis> {
        let lanes_due = self
            .lanes
            .next_due()
            .filter(|_| self.may_start_request(now));
        let endpoint_due = match &self.endpoint {
            EndpointState::Known { at, .. } if !self.lanes.is_empty() && !self.loading_endpoint => {
                let refresh = if self.endpoint_outdated.is_some() {
                    Millis(0)
                } else {
                    *at + self.config.endpoint_refresh
                };
                Some(
                    self.endpoint_retry_at
                        .map_or(refresh, |retry| retry.max(refresh)),
                )
            }
            EndpointState::Unknown if !self.lanes.is_empty() && !self.loading_endpoint => {
                self.endpoint_retry_at
            }
            _ => None,
        };
        let ledger_due = self
            .load_retry_at
            .filter(|_| self.loading.is_none() && self.wanted > self.done);
        [
            lanes_due,
            self.breaker.deadline(),
            ledger_due,
            self.save_retry_at,
            self.parked_until,
            self.sends_paused_until,
            endpoint_due,
        ]
        .into_iter()
        .flatten()
        .filter(|at| *at > now)
        .min()
    }

    // ---- what the admin API and the invariants look at --------------------------------------

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Requests allowed at once now (the adaptive limit, or `max_in_flight`).
    pub fn in_flight_limit(&self) -> usize {
        self.in_flight_limit.current()
    }

    pub fn held(&self) -> usize {
        self.lanes.len()
    }

    pub fn lanes(&self) -> &Lanes<P> {
        &self.lanes
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Is the broker row known to be usable (requests may be made)?
    pub fn endpoint_usable(&self) -> bool {
        matches!(self.endpoint, EndpointState::Known { usable: Ok(()), .. })
    }

    pub fn holds_lease(&self, partition: i32) -> bool {
        self.leases.contains_key(&partition)
    }

    /// The generation of the lease held on `partition`, if one is.
    pub fn lease_generation(&self, partition: i32) -> Option<u64> {
        self.leases.get(&partition).copied()
    }

    /// True while a sweep of the ledger is under way (a page asked for or more to read), or
    /// waits to be tried again after a failed page.
    pub fn ledger_read_in_flight(&self) -> bool {
        self.loading.is_some()
            || self.sweep.is_some()
            || (self.load_retry_at.is_some() && self.wanted > self.done)
    }

    /// Draining and nothing left to finish: every request answered, every outcome saved.
    pub fn is_drained(&self) -> bool {
        self.draining
            && self.in_flight.is_empty()
            && self.outbox.is_empty()
            && self.saving.is_empty()
    }

    /// Nothing to do and nothing to remember: nothing held, requested, decided but unsaved or
    /// being saved, no ledger read under way or wanted, no retry parked in the ledger, no
    /// replay to check, the breaker closed with no failure counted, no broker row asked for.
    /// A fresh scheduler (with the same leases) would behave the same, so the shell may stop
    /// (an idle actor retires) and start again on demand.
    pub fn is_idle(&self) -> bool {
        self.lanes.is_empty()
            && self.in_flight.is_empty()
            && self.outbox.is_empty()
            && self.saving.is_empty()
            && self.loading.is_none()
            && self.sweep.is_none()
            && self.wanted <= self.done
            && self.parked_until.is_none()
            && self.replay_suspects.is_empty()
            && !self.loading_endpoint
            && self.breaker.state().name() == "closed"
            && self.breaker.consecutive_failures() == 0
    }

    // ---- inputs --------------------------------------------------------------------------

    /// Deliveries fresh from a claim (the fast path). One joins its lane only when its newest
    /// pending predecessor is held here and nothing since it was claimed makes that stale (see
    /// `claims_stale_before`); otherwise, or when there is no room, it stays in the ledger for a
    /// page to pick up behind its predecessors.
    pub fn claimed(&mut self, now: Millis, claimed: Vec<Claimed<P>>) {
        // The lanes that may give up places, longest first: built once per batch, on the first
        // delivery that finds memory full.
        let mut donors = None;
        for Claimed {
            delivery,
            pending_predecessor,
            claimed_at,
        } in claimed
        {
            // A claim creates deliveries only for enabled brokers: one made after we read the
            // row as unusable says the row changed (re-enabled). Read it again before acting.
            if let EndpointState::Known { usable: Err(_), at } = &self.endpoint {
                if claimed_at > *at {
                    self.endpoint_outdated = self.endpoint_outdated.max(Some(claimed_at));
                }
            }
            if self.lanes.holds(delivery.id) || !self.holds_lease(delivery.partition) {
                continue;
            }
            if self.claims_stale_before.is_some_and(|at| at >= claimed_at) {
                self.wanted += 1;
                continue;
            }
            let follows = match pending_predecessor {
                None => true,
                Some(offset) => self
                    .lanes
                    .holds_order(&delivery.load, (delivery.partition, offset)),
            };
            // Until a sweep after a replay has taken in every pending row, a held predecessor
            // says nothing about earlier deliveries the replay made pending again. A sweep
            // stopped by a full memory is not enough: it may end before a replayed row, and a
            // claim would then follow the load's started head past it (seed 12,979,934).
            let replay_unread = self.replay_read_by.is_some_and(|w| self.read_through < w)
                && self.lanes.has_lane(&delivery.load);
            let blocked = replay_unread
                || self
                    .sweep
                    .as_ref()
                    .is_some_and(|sweep| sweep.blocked.contains(&delivery.load));
            if !follows || blocked {
                self.wanted += 1;
                continue;
            }
            let room = self
                .make_room_for(&delivery, now)
                .or_else(|| self.take_fair_share(&delivery.load, &mut donors));
            match room {
                None => self.wanted += 1,
                Some(evicted) => {
                    if let (Some(sweep), Some(load)) = (&mut self.sweep, evicted) {
                        sweep.blocked.insert(load);
                    }
                    self.hold(delivery, now);
                }
            }
        }
        self.drive(now);
    }

    /// Memory is full: if `load` holds less than its fair share (capacity / lanes), the
    /// longest lane gives up its last delivery for it (it stays pending in the ledger, and the
    /// next sweep reads it again). `Some(Some(donor))` when a place was freed.
    fn take_fair_share(
        &mut self,
        load: &str,
        donors: &mut Option<BinaryHeap<(usize, String)>>,
    ) -> Option<Option<String>> {
        let own = self.lanes.lane_len(load);
        let lanes = self.lanes.lane_count() + usize::from(own == 0);
        let fair = self.config.capacity / lanes.max(1);
        if own >= fair {
            return None;
        }
        let lanes = &self.lanes;
        let donors = donors.get_or_insert_with(|| {
            lanes
                .loads()
                .map(|(donor, _, len)| (len, donor.to_owned()))
                .collect()
        });
        let (len, donor) = donors.pop()?;
        // A donor keeps more than the fair share, and never gives to itself.
        if len <= fair + 1 || donor == load || self.lanes.evict_back(&donor, 1) == 0 {
            donors.push((len, donor));
            return None;
        }
        donors.push((len - 1, donor.clone()));
        self.overflowed = true;
        Some(Some(donor))
    }

    /// The ledger may hold pending deliveries that are not in memory (a claim did not fit, the
    /// sweep found overdue work).
    pub fn ledger_has_more(&mut self, now: Millis) {
        self.wanted += 1;
        self.drive(now);
    }

    /// Dead letters were put back in the queue. The replayed rows are earlier than what this
    /// scheduler may hold of their loads, so everything not started is given back and read
    /// again in order.
    pub fn replayed(&mut self, now: Millis) {
        let loads: Vec<(String, Head)> = self
            .lanes
            .loads()
            .map(|(load, head, _)| (load.to_owned(), head))
            .collect();
        for (load, head) in loads {
            if head == Head::AwaitingSave {
                self.replay_suspects.insert(load.clone());
            }
            self.lanes.forget_lane(&load);
        }
        self.claims_stale_before = Some(now);
        // The replayed rows are earlier than rows known to be held: read from the start.
        self.lanes.forget_held_through(None);
        self.restart_sweep();
        self.replay_read_by = Some(self.wanted);
        self.drive(now);
    }

    /// A page of pending rows answering `LoadPending`.
    pub fn loaded(&mut self, now: Millis, token: IoToken, rows: Vec<Delivery<P>>) {
        if self.loading != Some(token) {
            return;
        }
        self.loading = None;
        self.claims_stale_before = Some(now);
        let saved_meanwhile = std::mem::take(&mut self.saved_during_load);
        let Some(mut sweep) = self.sweep.take() else {
            return self.drive(now);
        };
        let mut read: HashMap<i32, usize> = HashMap::new();
        for row in rows {
            if let Some(cursor) = sweep.cursors.get_mut(&row.partition) {
                *cursor = Some(row.offset);
            }
            *read.entry(row.partition).or_default() += 1;
            let (partition, offset) = (row.partition, row.offset);
            let held = self.take_page_row(&mut sweep, row, &saved_meanwhile, now);
            // While every row of the partition this sweep has read is held, what is held
            // reaches this row; an eviction since (it lowers the mark) or a row left in the
            // ledger ends that for the rest of the sweep.
            let unbroken =
                sweep.prefix.get(&partition) == Some(&self.lanes.held_through(partition));
            if held && unbroken {
                self.lanes.set_held_through(partition, offset);
                sweep.prefix.insert(partition, Some(offset));
            } else {
                sweep.prefix.remove(&partition);
            }
        }
        let per_partition = sweep.per_partition;
        sweep
            .cursors
            .retain(|partition, _| read.get(partition).is_some_and(|&n| n >= per_partition));
        let full_page = !sweep.cursors.is_empty();
        let room_left = self.lanes.len() < self.config.capacity || self.has_waiting_lane(now);
        if full_page && room_left {
            self.sweep = Some(sweep);
        } else {
            // Read to the end, or memory is full of what can go now: either way this sweep
            // did what it could. What it could not take is read again once room frees up.
            self.done = self.done.max(sweep.started_at);
            let rows_left = sweep.skipped || full_page;
            self.overflowed |= rows_left;
            if !rows_left && sweep.blocked.is_empty() {
                self.read_through = self.read_through.max(sweep.started_at);
            }
        }
        self.drive(now);
    }

    /// Takes one row of a ledger page if it may be held now. True when the row is held
    /// afterwards (taken now, or held already).
    fn take_page_row(
        &mut self,
        sweep: &mut Sweep,
        row: Delivery<P>,
        saved_meanwhile: &HashSet<i64>,
        now: Millis,
    ) -> bool {
        if self.lanes.holds(row.id) {
            return true;
        }
        if saved_meanwhile.contains(&row.id) {
            // Delivered or dead since the page was read, or a retry given back since: left
            // out either way (not held).
            return false;
        }
        if !self.holds_lease(row.partition) || sweep.blocked.contains(&row.load) {
            return false;
        }
        if self.sorts_before_started_head(&row) {
            // A replay made this row pending again, earlier than its load's head, which is
            // already sent: it cannot go in front of it, nor behind (order). The load's
            // later rows wait too, and the lane is read again once that head settles.
            self.replay_suspects.insert(row.load.clone());
            sweep.blocked.insert(row.load);
            return false;
        }
        if let Some(evicted) = self.make_room_for(&row, now) {
            // The evicted load's rows after this point must wait for the next sweep.
            sweep.blocked.extend(evicted);
            if sweep.blocked.contains(&row.load) {
                return false;
            }
            self.hold(row, now);
            true
        } else {
            sweep.skipped = true;
            if !row.due_in.is_zero() {
                let due = now + row.due_in;
                self.parked_until = Some(self.parked_until.map_or(due, |p| p.min(due)));
            }
            sweep.blocked.insert(row.load);
            false
        }
    }

    /// The ledger read failed (or the shell could not take its rows): the sweep starts again
    /// from the beginning after `RETRY_IO_AFTER`.
    pub fn load_failed(&mut self, now: Millis, token: IoToken) {
        if self.loading == Some(token) {
            self.loading = None;
            self.sweep = None;
            self.saved_during_load.clear();
            self.load_retry_at = Some(now + RETRY_IO_AFTER);
        }
        self.drive(now);
    }

    /// The answer to a request (or its transport failure). `jitter` is a draw from [0, 1) for
    /// the retry delay. Answers to requests of a previous incarnation are ignored.
    pub fn attempt_finished(
        &mut self,
        now: Millis,
        token: AttemptToken,
        result: AttemptResult,
        jitter: f64,
        report: R,
    ) {
        let Some(flight) = self.in_flight.remove(&token) else {
            return;
        };
        // Its socket is free for the next request: a pause for a local shortage is over.
        self.sends_paused_until = None;
        let verdict = classify(&result);
        let breaker_outcome = match (&result, verdict) {
            // Refused before connecting (SSRF guard): no request reached the broker.
            (AttemptResult::RequestInvalid, _) => None,
            (_, Verdict::Retry) => Some(RequestOutcome::Failure),
            _ => Some(RequestOutcome::Success),
        };
        match breaker_outcome {
            Some(outcome) => {
                let change = self.breaker.on_outcome(now, flight.probe, outcome);
                self.log_transition(change);
            }
            None => self.breaker.request_not_made(flight.probe),
        }
        let response = match (&result, verdict) {
            (AttemptResult::RequestInvalid, _) => Response::Ignored,
            (_, Verdict::Retry) => Response::BackPressure,
            _ => Response::Processed(now.since(flight.started)),
        };
        self.in_flight_limit.request_finished(now, response);
        let decision = match verdict {
            Verdict::Delivered => Decision::Delivered,
            Verdict::Retry => {
                let retry_after = match &result {
                    AttemptResult::Responded { retry_after, .. } => *retry_after,
                    _ => None,
                };
                match self
                    .config
                    .retry
                    .next_delay(flight.attempt, retry_after, jitter)
                {
                    Some(delay) => Decision::RetryIn(delay),
                    None => Decision::Dead {
                        reason: format!("gave up after {} attempts", flight.attempt),
                    },
                }
            }
            Verdict::Dead => Decision::Dead {
                reason: match &result {
                    AttemptResult::Responded { status, .. } => {
                        format!("permanent failure: HTTP {status}")
                    }
                    _ => "permanent failure: the request could not be made".to_owned(),
                },
            },
            Verdict::DeadAndDisableBroker => {
                self.commands.push_back(Command::DisableBroker {
                    delivery_id: flight.id,
                });
                // Stop sending now; the refreshed row (disabled) confirms it later.
                self.endpoint = EndpointState::Known {
                    usable: Err(Unusable {
                        class: "broker_gone",
                        reason: "broker answered 410 Gone; broker disabled".to_owned(),
                    }),
                    at: now,
                };
                Decision::Dead {
                    reason: "broker answered 410 Gone; broker disabled".to_owned(),
                }
            }
        };
        self.decide(
            now,
            &flight.load,
            flight.id,
            flight.attempt,
            decision,
            None,
            Some(report),
        );
        self.drive(now);
    }

    /// A started request was not made after all (see [`NotMade`]).
    pub fn attempt_not_made(&mut self, now: Millis, token: AttemptToken, why: NotMade) {
        let Some(flight) = self.in_flight.remove(&token) else {
            return;
        };
        self.breaker.request_not_made(flight.probe);
        match why {
            NotMade::LeaseLapsed => {
                self.lanes.put_back(&flight.load, now);
                self.forget_load(&flight.load);
                // Nothing of the load is held now, so nothing waits on its head to settle.
                self.replay_suspects.remove(&flight.load);
            }
            NotMade::LocalShortage => {
                self.lanes.put_back(&flight.load, now);
                self.sends_paused_until = Some(now + LOCAL_SHORTAGE_PAUSE);
                self.in_flight_limit.local_shortage(self.in_flight.len());
            }
        }
        self.drive(now);
    }

    /// The outcomes of `WriteOutcomes { token }` are committed: their lanes move on.
    pub fn outcomes_saved(&mut self, now: Millis, token: IoToken) {
        let Some(batch) = self.saving.remove(&token) else {
            return;
        };
        for outcome in batch {
            let retry = match outcome.decision {
                Decision::RetryIn(delay) => Some((outcome.decided_at + delay, outcome.attempt)),
                _ => {
                    if self.loading.is_some() {
                        self.saved_during_load.insert(outcome.delivery_id);
                    }
                    None
                }
            };
            self.lanes
                .saved(&outcome.load, outcome.delivery_id, retry, now);
            if retry.is_some() || !self.lanes.has_lane(&outcome.load) {
                // A retry now waits in memory, or a lane ended: rows left in the ledger for
                // lack of room may fit (or be owed the retry's place) now.
                self.room_changed = true;
            }
            if self.replay_suspects.remove(&outcome.load) {
                // Dead and made pending again by the replay, or with a replayed, earlier row
                // left out: either way the lane is read again, in order. (A retried head is
                // still pending; it comes back with that read.) The saved row may be pending:
                // the read must not start after it (simulator seed 70).
                self.lanes.not_held(outcome.order);
                self.forget_load(&outcome.load);
                self.wanted += 1;
            }
        }
        self.drive(now);
    }

    /// The write failed: the batch goes back in front of the queue and is tried again.
    pub fn outcomes_save_failed(&mut self, now: Millis, token: IoToken) {
        if let Some(batch) = self.saving.remove(&token) {
            self.outbox.splice(0..0, batch);
            self.save_retry_at = Some(now + RETRY_IO_AFTER);
        }
        self.drive(now);
    }

    /// Time passed (a wakeup asked for with `next_wakeup`, or any other reason).
    pub fn tick(&mut self, now: Millis) {
        self.drive(now);
    }

    /// This instance holds `partition`'s lease, as `generation`. Older generations are ignored.
    pub fn lease_gained(&mut self, now: Millis, partition: i32, generation: u64) {
        let newest = self.newest_lease.entry(partition).or_insert(0);
        if generation > *newest {
            *newest = generation;
            self.leases.insert(partition, generation);
            // Another owner may have changed the partition's rows meanwhile.
            self.lanes.forget_held_through(Some(partition));
            self.restart_sweep();
        }
        self.drive(now);
    }

    /// The lease `generation` on `partition` ended. A newer lease is not touched (a stale
    /// revoke); otherwise everything of the partition not started is forgotten (it stays
    /// pending in the ledger for the new owner).
    pub fn lease_lost(&mut self, now: Millis, partition: i32, generation: u64) {
        if self.leases.get(&partition) == Some(&generation) {
            self.leases.remove(&partition);
            self.lanes.forget_partition(partition);
            self.lanes.forget_held_through(Some(partition));
            if self.sweep.is_some() {
                self.restart_sweep();
            }
        }
        self.drive(now);
    }

    /// The broker row as read by a read started at `read_at`: usable, or why not. Asked for
    /// (`LoadBroker`) or not (the shell's periodic refresh of every broker's row). A read older
    /// than what is known (a 410 Gone answered since) changes nothing; one older than a known
    /// change is used but read again.
    pub fn broker_loaded(&mut self, now: Millis, read_at: Millis, usable: Result<(), Unusable>) {
        self.loading_endpoint = false;
        self.endpoint_retry_at = None;
        if self
            .endpoint_outdated
            .is_some_and(|changed| read_at >= changed)
        {
            self.endpoint_outdated = None;
        }
        let newer_known = matches!(self.endpoint, EndpointState::Known { at, .. } if at > read_at);
        if !newer_known {
            self.endpoint = EndpointState::Known {
                usable,
                at: read_at,
            };
        }
        self.drive(now);
    }

    pub fn broker_load_failed(&mut self, now: Millis) {
        self.loading_endpoint = false;
        self.endpoint_retry_at = Some(now + RETRY_IO_AFTER);
        self.drive(now);
    }

    /// The broker row changed (enabled, URL, secrets): read it again before the next decision
    /// that depends on it.
    pub fn broker_changed(&mut self, now: Millis) {
        self.endpoint_outdated = self.endpoint_outdated.max(Some(now));
        self.drive(now);
    }

    /// The shell restarted (a panic was contained). Requests in flight are gone; their answers,
    /// if any still arrive, are ignored. Outcomes decided but not saved are kept, and their
    /// lanes stay blocked until they are saved; a write already under way is not written again
    /// (its answer is still awaited: writing it twice could mark a delivery dead again after an
    /// operator replayed it). Everything else is read again from the ledger.
    pub fn restarted(&mut self, now: Millis) {
        self.epoch += 1;
        for (_, flight) in self.in_flight.drain() {
            self.breaker.request_not_made(flight.probe);
        }
        self.breaker.abandon_probes();
        self.lanes.keep_only_awaiting_save();
        self.lanes.forget_held_through(None);
        // Heads in flight are gone with their lanes; the next sweep reads those loads in order.
        let lanes = &self.lanes;
        self.replay_suspects.retain(|load| lanes.has_lane(load));
        self.endpoint = EndpointState::Unknown;
        self.loading_endpoint = false;
        self.loading = None;
        self.sweep = None;
        self.saved_during_load.clear();
        self.wanted += 1;
        // A kept head needs no claim guard of its own: a delivery of its load earlier than it
        // can be pending only through a replay, and the replay's guard (`replay_read_by`) holds
        // until a sweep has read every pending row, which such a row stops (it blocks its load).
        self.drive(now);
    }

    /// Shutdown: start nothing new; keep saving what is decided.
    pub fn drain(&mut self, now: Millis) {
        self.draining = true;
        self.drive(now);
    }

    // ---- the decisions ----------------------------------------------------------------------

    /// Rows to ask for: what fits in memory now, so a page is not read only to be left in the
    /// ledger (a sweep starts with half the memory free, and used to ask for all of it).
    /// A sweep for retries that may give way to ready rows asks for a quarter of memory.
    fn page_size(&self) -> usize {
        let room = self.config.capacity.saturating_sub(self.lanes.len());
        room.max(self.config.capacity / 4).clamp(1, 1_000)
    }

    fn restart_sweep(&mut self) {
        self.wanted += 1;
        self.sweep = None;
        // An answer to a page already asked for is ignored (its token no longer matches).
        self.loading = None;
        self.saved_during_load.clear();
    }

    /// Gives back everything of `load` not started. A sweep under way must then skip the
    /// load's later rows (their predecessors are no longer held).
    fn forget_load(&mut self, load: &str) {
        self.lanes.forget_lane(load);
        if let Some(sweep) = &mut self.sweep {
            sweep.blocked.insert(load.to_owned());
        }
    }

    /// Would `row` go in front of its load's head, which is already started?
    fn sorts_before_started_head(&self, row: &Delivery<P>) -> bool {
        self.lanes.head(&row.load).is_some_and(|(head, state)| {
            state != Head::Idle && (row.partition, row.offset) < head.order
        })
    }

    fn hold(&mut self, delivery: Delivery<P>, now: Millis) {
        let entry = Entry {
            id: delivery.id,
            order: (delivery.partition, delivery.offset),
            attempts: delivery.attempts,
            not_before: now + delivery.due_in,
            item: delivery.item,
        };
        self.lanes.insert(&delivery.load, entry, now);
    }

    /// Is there room to hold `delivery`? When memory is full and it would be a ready head of a
    /// load not held, a delivery waiting for a retry gives way (it stays pending in the ledger
    /// and comes back when due). `None`: no room; `Some(evicted)`: room, and the load that
    /// gave some up, if one did.
    fn make_room_for(&mut self, delivery: &Delivery<P>, now: Millis) -> Option<Option<String>> {
        if self.lanes.len() < self.config.capacity {
            return Some(None);
        }
        let ready_head = delivery.due_in.is_zero() && !self.lanes.has_lane(&delivery.load);
        if !ready_head {
            return None;
        }
        // The waiting lane with the most entries gives up its last one.
        let victim = self
            .lanes
            .waiting(now)
            .max_by_key(|&(load, len)| (len, load))
            .map(|(load, _)| load.to_owned());
        let victim = victim?;
        if let Some((head, _)) = self.lanes.head(&victim) {
            let due = head.not_before;
            self.parked_until = Some(self.parked_until.map_or(due, |p| p.min(due)));
        }
        self.lanes.evict_back(&victim, 1);
        self.overflowed = true;
        Some(Some(victim))
    }

    /// Records a decision: the lane waits for its save; the outcome joins the next write.
    #[allow(clippy::too_many_arguments)]
    fn decide(
        &mut self,
        now: Millis,
        load: &str,
        id: i64,
        attempt: u32,
        decision: Decision,
        not_sent: Option<Unusable>,
        report: Option<R>,
    ) {
        let Some((entry, _)) = self.lanes.head(load).filter(|(e, _)| e.id == id) else {
            return;
        };
        let (order, item) = (entry.order, entry.item.clone());
        self.lanes.responded(load);
        let outcome = Outcome {
            delivery_id: id,
            load: load.to_owned(),
            order,
            attempt,
            decision,
            decided_at: now,
            not_sent,
            report,
        };
        self.commands.push_back(Command::Decided {
            outcome: outcome.clone(),
            item,
        });
        self.outbox.push(outcome);
    }

    fn log_transition(&mut self, transition: Option<Transition>) {
        if let Some(transition) = transition {
            self.commands.push_back(Command::BreakerChanged(transition));
        }
    }

    /// The usable endpoint, or why not; `None` while it is being (re)read and cannot be trusted.
    fn endpoint_now(&mut self, now: Millis) -> Option<Result<(), Unusable>> {
        let (usable, stale) = match &self.endpoint {
            EndpointState::Unknown => (None, true),
            EndpointState::Known { usable, at } => (
                Some(usable.clone()),
                self.endpoint_outdated.is_some() || now >= *at + self.config.endpoint_refresh,
            ),
        };
        let may_load = self.endpoint_retry_at.is_none_or(|at| now >= at);
        if stale && !self.loading_endpoint && may_load && !self.lanes.is_empty() {
            self.loading_endpoint = true;
            self.endpoint_retry_at = None;
            self.commands.push_back(Command::LoadBroker);
        }
        match usable {
            // A stale "unusable" is not acted on: the broker may have been fixed and
            // re-enabled. Its deliveries wait for the fresh row.
            Some(Err(_)) if stale => None,
            other => other,
        }
    }

    /// Runs after every input: starts what may start, writes what is decided, reads the ledger
    /// when it may hold more.
    fn drive(&mut self, now: Millis) {
        let change = self.breaker.poll(now);
        self.log_transition(change);
        if self.parked_until.is_some_and(|at| now >= at) {
            self.parked_until = None;
            self.wanted += 1;
        }
        if self.overflowed && self.lanes.len() <= self.config.capacity / 2 {
            self.overflowed = false;
            self.wanted += 1;
        }
        if self.overflowed
            && self.room_changed
            && self.sweep.is_none()
            && self.has_waiting_lane(now)
        {
            // The ledger holds rows that did not fit, and a retry holds room they may need.
            self.room_changed = false;
            self.wanted += 1;
        }
        if !self.draining {
            if let Some(endpoint) = self.endpoint_now(now) {
                self.start_ready(now, endpoint);
            }
        }
        self.write_outcomes(now);
        if !self.draining {
            self.read_ledger(now);
        }
    }

    fn start_ready(&mut self, now: Millis, endpoint: Result<(), Unusable>) {
        while let Some(load) = self.lanes.next_ready(now).map(str::to_owned) {
            let Some((head, _)) = self.lanes.head(&load) else {
                break;
            };
            let (id, partition, attempt) = (head.id, head.order.0, head.attempts + 1);
            if !self.holds_lease(partition) {
                self.forget_load(&load);
                continue;
            }
            if let Err(unusable) = &endpoint {
                self.lanes.start(&load);
                let decision = Decision::Dead {
                    reason: unusable.reason.clone(),
                };
                self.decide(
                    now,
                    &load,
                    id,
                    attempt,
                    decision,
                    Some(unusable.clone()),
                    None,
                );
                continue;
            }
            if attempt > self.config.retry.max_attempts {
                // Loaded with its budget already spent (max_attempts was lowered).
                self.lanes.start(&load);
                let decision = Decision::Dead {
                    reason: format!("gave up after {} attempts", attempt - 1),
                };
                self.decide(now, &load, id, attempt - 1, decision, None, None);
                continue;
            }
            if !self.may_start_request(now) {
                break;
            }
            let probe = self.breaker.request_started(now);
            let Some(entry) = self.lanes.start(&load) else {
                break;
            };
            let item = entry.item.clone();
            self.next_seq += 1;
            let token = AttemptToken {
                epoch: self.epoch,
                seq: self.next_seq,
            };
            self.in_flight.insert(
                token,
                InFlight {
                    id,
                    started: now,
                    load: load.clone(),
                    attempt,
                    probe,
                },
            );
            self.in_flight_limit.request_started(self.in_flight.len());
            self.commands.push_back(Command::Send {
                token,
                delivery_id: id,
                load,
                attempt,
                item,
            });
        }
    }

    fn write_outcomes(&mut self, now: Millis) {
        if self.outbox.is_empty() {
            return;
        }
        let small = self.saving.values().map(Vec::len).sum::<usize>() < SMALL_WRITES_OUTCOMES;
        if self.saving.len() >= MAX_WRITES_IN_FLIGHT && !small {
            return;
        }
        if self.save_retry_at.is_some_and(|at| now < at) {
            return;
        }
        self.save_retry_at = None;
        let token = self.io_token();
        let batch = std::mem::take(&mut self.outbox);
        self.commands.push_back(Command::WriteOutcomes {
            token,
            outcomes: batch.clone(),
        });
        self.saving.insert(token, batch);
    }

    fn read_ledger(&mut self, now: Millis) {
        if self.loading.is_some() || self.leases.is_empty() {
            return;
        }
        if self.breaker.open_until().is_some() {
            // Nothing can be sent before the open period ends, so rows read now could only
            // wait: an unavailable broker would read its whole backlog again, page after page,
            // each time a claim or a retry made room look worth a sweep (`hotload`,
            // docs/performance.md "Session 12"). A sweep under way is dropped; what it was
            // wanted for is still wanted, and is read from the start once probes may go.
            self.sweep = None;
            return;
        }
        if self.load_retry_at.is_some_and(|at| now < at) {
            return;
        }
        self.load_retry_at = None;
        if self.sweep.is_none() {
            // Wait for half the room (or a retry that can give way) rather than reading a page
            // for every free place.
            let has_room =
                self.lanes.len() <= self.config.capacity / 2 || self.has_waiting_lane(now);
            if self.wanted <= self.done || !has_room {
                return;
            }
            self.room_changed = false;
            // Each partition is read from after the rows known to be held.
            let cursors: BTreeMap<i32, Option<i64>> = self
                .leases
                .keys()
                .map(|&p| (p, self.lanes.held_through(p)))
                .collect();
            self.sweep = Some(Sweep {
                started_at: self.wanted,
                prefix: cursors.clone(),
                cursors,
                per_partition: 0,
                blocked: HashSet::new(),
                skipped: false,
            });
        }
        let page_size = self.page_size();
        let token = self.io_token();
        let Some(sweep) = self.sweep.as_mut() else {
            return;
        };
        // An equal share of the page for every partition still being read (rounded up, so a
        // page is at most page size + partitions - 1 rows).
        sweep.per_partition = page_size.div_ceil(sweep.cursors.len().max(1));
        let cursors = sweep
            .cursors
            .iter()
            .map(|(&partition, &after)| PartitionCursor { partition, after })
            .collect();
        self.loading = Some(token);
        self.commands.push_back(Command::LoadPending {
            token,
            cursors,
            per_partition: sweep.per_partition,
        });
    }

    /// Room for one more request: under the in-flight limit, the breaker allows it, and sends
    /// are not paused for a local shortage.
    fn may_start_request(&self, now: Millis) -> bool {
        self.in_flight.len() < self.in_flight_limit.current()
            && self.breaker.may_request()
            && self.sends_paused_until.is_none_or(|until| now >= until)
    }

    /// Is some lane's head idle and not due (a retry that could give way)?
    fn has_waiting_lane(&self, now: Millis) -> bool {
        self.lanes.waiting(now).next().is_some()
    }

    fn io_token(&mut self) -> IoToken {
        self.next_seq += 1;
        IoToken(self.next_seq)
    }
}
