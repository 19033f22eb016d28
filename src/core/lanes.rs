//! A broker's in-memory deliveries, one FIFO lane per load, at most one delivery of a lane
//! started and not finished (docs/design.md 4). Pure: the caller passes `now`.
//!
//! A lane holds a prefix of its load's pending deliveries in (partition, offset) order. Its head
//! is idle (waiting to be sent, perhaps not before a retry time), in flight (a request is out),
//! or awaiting its save (the answer is in, the outcome not yet in the ledger). The rest of the
//! lane waits until the head is finished and saved. A delivery that turns up late with a lower
//! offset (a replay) goes in front of everything not yet started, including an idle head
//! waiting for its retry.
//!
//! The lanes do not bound themselves; the scheduler decides what is held.

use std::collections::{BTreeSet, HashMap, VecDeque};

use super::Millis;

/// (Kafka partition, offset): a delivery's place in its load.
pub type Order = (i32, i64);

#[derive(Debug, Clone)]
pub struct Entry<P> {
    pub id: i64,
    pub order: Order,
    /// Attempts already made.
    pub attempts: u32,
    /// Not to be sent before this (a retry's time).
    pub not_before: Millis,
    pub item: P,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// Listed in `idle`, due at its key's time.
    Idle,
    InFlight,
    AwaitingSave,
}

/// How many lanes are in each state: where a broker's deliveries wait (the `lanes` gauge and
/// `GET /brokers`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LaneCensus {
    /// A request is out: waiting for the endpoint.
    pub in_flight: usize,
    /// Answered, the outcome not yet committed: the load's next delivery waits for the ledger.
    pub awaiting_save: usize,
    /// Due and not started: waiting for a request slot, or for a breaker that lets nothing
    /// through.
    pub ready: usize,
    /// The next delivery is a retry whose time has not come.
    pub waiting_retry: usize,
}

impl LaneCensus {
    /// The gauge's `state` label of each count, in `counts` order.
    pub const STATES: [&'static str; 4] = ["in_flight", "awaiting_save", "ready", "waiting_retry"];

    pub fn counts(&self) -> [usize; 4] {
        [
            self.in_flight,
            self.awaiting_save,
            self.ready,
            self.waiting_retry,
        ]
    }
}

#[derive(Debug)]
struct Lane<P> {
    entries: VecDeque<Entry<P>>,
    head: Head,
    /// The lane's key in `idle` while the head is idle.
    idle_key: Option<(Millis, u64)>,
}

#[derive(Debug)]
pub struct Lanes<P> {
    lanes: HashMap<String, Lane<P>>,
    /// Lanes whose head is idle, by (due, arrival) so equal due times go first come first served.
    idle: BTreeSet<(Millis, u64, String)>,
    ids: HashMap<i64, String>,
    arrivals: u64,
    /// Per partition, an offset through which every pending row of the partition (of this
    /// broker) is held here: a ledger sweep starts after it instead of reading held rows again
    /// (a sweep starts when half the memory is free, so it used to re-read the half still held,
    /// about two rows read per delivery). Set by the scheduler as a sweep takes in rows; an
    /// eviction lowers it below the evicted row (`not_held`), and the scheduler lowers or
    /// clears it where a row may be pending again: a replay, a restart, a lease changing hands,
    /// the saved outcome of a head a replay raced.
    held_through: HashMap<i32, i64>,
}

impl<P> Default for Lanes<P> {
    fn default() -> Self {
        Lanes {
            lanes: HashMap::new(),
            idle: BTreeSet::new(),
            ids: HashMap::new(),
            arrivals: 0,
            held_through: HashMap::new(),
        }
    }
}

impl<P> Lanes<P> {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn holds(&self, id: i64) -> bool {
        self.ids.contains_key(&id)
    }

    pub fn has_lane(&self, load: &str) -> bool {
        self.lanes.contains_key(load)
    }

    /// How many lanes there are (loads with something held).
    pub fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// How many deliveries of `load` are held.
    pub fn lane_len(&self, load: &str) -> usize {
        self.lanes.get(load).map_or(0, |lane| lane.entries.len())
    }

    /// Does the lane of `load` hold the delivery at `order`?
    pub fn holds_order(&self, load: &str, order: Order) -> bool {
        self.lanes
            .get(load)
            .is_some_and(|lane| lane.entries.iter().any(|e| e.order == order))
    }

    pub fn head(&self, load: &str) -> Option<(&Entry<P>, Head)> {
        let lane = self.lanes.get(load)?;
        Some((lane.entries.front()?, lane.head))
    }

    pub fn entries<'a>(&'a self, load: &str) -> impl Iterator<Item = &'a Entry<P>> + 'a {
        self.lanes.get(load).into_iter().flat_map(|l| &l.entries)
    }

    pub fn loads(&self) -> impl Iterator<Item = (&str, Head, usize)> {
        self.lanes
            .iter()
            .map(|(load, lane)| (load.as_str(), lane.head, lane.entries.len()))
    }

    /// The offset through which every pending row of `partition` is held, if one is known.
    pub fn held_through(&self, partition: i32) -> Option<i64> {
        self.held_through.get(&partition).copied()
    }

    /// Every pending row of `partition` up to `offset` is held (a sweep read them in order and
    /// took or already held each one).
    pub fn set_held_through(&mut self, partition: i32, offset: i64) {
        self.held_through.insert(partition, offset);
    }

    /// The row at `order` is pending and not held (given back, or pending again after its
    /// outcome was saved): what is known held of its partition ends before it.
    pub fn not_held(&mut self, (partition, offset): Order) {
        if let Some(through) = self.held_through.get_mut(&partition) {
            *through = (*through).min(offset.saturating_sub(1));
        }
    }

    /// Forgets what is known held of `partition` (every partition when `None`): an earlier row
    /// may be pending again.
    pub fn forget_held_through(&mut self, partition: Option<i32>) {
        match partition {
            Some(partition) => {
                self.held_through.remove(&partition);
            }
            None => self.held_through.clear(),
        }
    }

    /// Adds a delivery in `order`, never in front of a head that was started. Returns false
    /// (and changes nothing) when the id is already held.
    pub fn insert(&mut self, load: &str, entry: Entry<P>, now: Millis) -> bool {
        if self.ids.contains_key(&entry.id) {
            return false;
        }
        self.ids.insert(entry.id, load.to_owned());
        match self.lanes.get_mut(load) {
            Some(lane) => {
                let pinned = usize::from(lane.head != Head::Idle);
                let position = lane
                    .entries
                    .iter()
                    .skip(pinned)
                    .position(|e| e.order > entry.order)
                    .map_or(lane.entries.len(), |p| p + pinned);
                lane.entries.insert(position, entry);
                if position == 0 {
                    // A new idle head: it is due when it says, not when the old one was.
                    self.unlist(load);
                    self.list(load, now);
                }
            }
            None => {
                self.lanes.insert(
                    load.to_owned(),
                    Lane {
                        entries: VecDeque::from([entry]),
                        head: Head::Idle,
                        idle_key: None,
                    },
                );
                self.list(load, now);
            }
        }
        true
    }

    fn list(&mut self, load: &str, now: Millis) {
        self.arrivals += 1;
        let arrival = self.arrivals;
        let Some(lane) = self.lanes.get_mut(load) else {
            return;
        };
        let due = lane.entries.front().map_or(now, |e| e.not_before.max(now));
        lane.head = Head::Idle;
        lane.idle_key = Some((due, arrival));
        self.idle.insert((due, arrival, load.to_owned()));
    }

    fn unlist(&mut self, load: &str) {
        if let Some(lane) = self.lanes.get_mut(load) {
            if let Some((due, arrival)) = lane.idle_key.take() {
                self.idle.remove(&(due, arrival, load.to_owned()));
            }
        }
    }

    /// The idle lane that has been due longest, if one is due at `now`.
    pub fn next_ready(&self, now: Millis) -> Option<&str> {
        self.idle
            .first()
            .filter(|(due, _, _)| *due <= now)
            .map(|(_, _, load)| load.as_str())
    }

    /// When the earliest idle head is due, if any lane is idle.
    pub fn next_due(&self) -> Option<Millis> {
        self.idle.first().map(|(due, _, _)| *due)
    }

    /// The lanes whose head is idle and not due yet (a retry waiting), with their lengths, latest
    /// due first. Read from the back of `idle`, so the cost is the number of such lanes, not the
    /// number of lanes: the scheduler asks on every input, and a broker can hold 1,000 lanes.
    pub fn waiting(&self, now: Millis) -> impl Iterator<Item = (&str, usize)> + '_ {
        self.idle
            .iter()
            .rev()
            // An idle head is listed at max(its retry time, the time it was listed), so every
            // head not due at `now` is in this stretch; the check below drops the rest of it.
            .take_while(move |(due, _, _)| *due > now)
            .filter_map(move |(_, _, load)| {
                let lane = self.lanes.get(load)?;
                let waiting = lane.entries.front()?.not_before > now;
                waiting.then_some((load.as_str(), lane.entries.len()))
            })
    }

    /// Every lane by the state of its head. A walk over all lanes: for a sampler, not for
    /// every scheduler step.
    pub fn census(&self, now: Millis) -> LaneCensus {
        let mut census = LaneCensus::default();
        for lane in self.lanes.values() {
            match lane.head {
                Head::InFlight => census.in_flight += 1,
                Head::AwaitingSave => census.awaiting_save += 1,
                Head::Idle if lane.entries.front().is_some_and(|e| e.not_before > now) => {
                    census.waiting_retry += 1
                }
                Head::Idle => census.ready += 1,
            }
        }
        census
    }

    /// Starts the idle head of `load`; it is in flight until `responded` or `put_back`.
    pub fn start(&mut self, load: &str) -> Option<&Entry<P>> {
        self.unlist(load);
        let lane = self.lanes.get_mut(load)?;
        lane.head = Head::InFlight;
        lane.entries.front()
    }

    /// The head's outcome is decided; the lane waits for it to be saved.
    pub fn responded(&mut self, load: &str) {
        if let Some(lane) = self.lanes.get_mut(load) {
            lane.head = Head::AwaitingSave;
        }
    }

    /// The saved outcome of delivery `id`: `None` removes it (delivered or dead), `Some` keeps
    /// it at the head for another attempt. Ignored unless `id` is this lane's head awaiting its
    /// save (a late outcome of a previous incarnation must not touch a reloaded lane).
    pub fn saved(&mut self, load: &str, id: i64, retry: Option<(Millis, u32)>, now: Millis) {
        let Some(lane) = self.lanes.get_mut(load) else {
            return;
        };
        let is_head = lane.entries.front().is_some_and(|e| e.id == id);
        if !is_head || lane.head != Head::AwaitingSave {
            return;
        }
        match retry {
            Some((at, attempts)) => {
                let head = lane.entries.front_mut().expect("checked above");
                head.not_before = at;
                head.attempts = attempts;
            }
            None => {
                lane.entries.pop_front();
                self.ids.remove(&id);
                if lane.entries.is_empty() {
                    self.lanes.remove(load);
                    return;
                }
            }
        }
        self.list(load, now);
    }

    /// Removes entries from the back of `load`'s lane, up to `count`, never a started head.
    /// Returns how many went.
    pub fn evict_back(&mut self, load: &str, count: usize) -> usize {
        let mut evicted = 0;
        while evicted < count {
            let Some(lane) = self.lanes.get_mut(load) else {
                break;
            };
            if lane.entries.len() == 1 && lane.head != Head::Idle {
                break;
            }
            let Some(entry) = lane.entries.pop_back() else {
                break;
            };
            let emptied = lane.entries.is_empty();
            self.ids.remove(&entry.id);
            // The evicted row stays pending in the ledger.
            self.not_held(entry.order);
            evicted += 1;
            if emptied {
                self.unlist(load);
                self.lanes.remove(load);
            }
        }
        evicted
    }

    /// Forgets everything of `load` not started (it stays pending in the ledger).
    pub fn forget_lane(&mut self, load: &str) {
        self.evict_back(load, usize::MAX);
    }

    /// A started head whose request was not made goes back to idle, due now.
    pub fn put_back(&mut self, load: &str, now: Millis) {
        if self
            .lanes
            .get(load)
            .is_some_and(|lane| lane.head == Head::InFlight)
        {
            self.list(load, now);
        }
    }

    /// Forgets every lane whose deliveries belong to `partition`, except started heads.
    pub fn forget_partition(&mut self, partition: i32) {
        let doomed: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.entries.front().is_some_and(|e| e.order.0 == partition))
            .map(|(load, _)| load.clone())
            .collect();
        for load in doomed {
            self.forget_lane(&load);
        }
    }

    /// Keeps only heads awaiting their save (after a restart everything else is reloaded).
    pub fn keep_only_awaiting_save(&mut self) {
        let loads: Vec<String> = self.lanes.keys().cloned().collect();
        for load in loads {
            if self.lanes[&load].head == Head::InFlight {
                self.list(&load, Millis(0));
            }
            let keep = usize::from(self.lanes[&load].head == Head::AwaitingSave);
            let len = self.lanes[&load].entries.len();
            self.evict_back(&load, len - keep);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Millis = Millis(100);

    fn entry(id: i64, offset: i64) -> Entry<()> {
        Entry {
            id,
            order: (0, offset),
            attempts: 0,
            not_before: Millis(0),
            item: (),
        }
    }

    #[test]
    fn one_started_per_load_in_offset_order() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(2, 20), NOW);
        lanes.insert("L1", entry(1, 10), NOW);
        lanes.insert("L2", entry(3, 15), NOW);
        assert_eq!(lanes.next_ready(NOW), Some("L1"));
        assert_eq!(lanes.start("L1").unwrap().id, 1);
        assert_eq!(lanes.next_ready(NOW), Some("L2"));
        lanes.start("L2");
        assert_eq!(lanes.next_ready(NOW), None, "L1#2 waits behind L1#1");
        lanes.responded("L1");
        assert_eq!(lanes.next_ready(NOW), None, "and behind its save");
        lanes.saved("L1", 1, None, NOW);
        assert_eq!(lanes.start("L1").unwrap().id, 2);
    }

    #[test]
    fn the_census_counts_each_lane_once_by_its_head() {
        let mut lanes = Lanes::default();
        for (id, load) in [(1, "sending"), (2, "saving"), (3, "due"), (4, "retrying")] {
            lanes.insert(load, entry(id, id * 10), NOW);
            lanes.insert(load, entry(id + 10, id * 10 + 1), NOW);
        }
        lanes.start("sending");
        lanes.start("saving");
        lanes.responded("saving");
        lanes.start("retrying");
        lanes.responded("retrying");
        lanes.saved("retrying", 4, Some((Millis(NOW.0 + 5_000), 1)), NOW);
        let census = lanes.census(NOW);
        assert_eq!(
            census,
            LaneCensus {
                in_flight: 1,
                awaiting_save: 1,
                ready: 1,
                waiting_retry: 1,
            }
        );
        assert_eq!(
            lanes.census(Millis(NOW.0 + 5_000)).counts(),
            [1, 1, 2, 0],
            "a retry whose time has come is ready"
        );
    }

    #[test]
    fn a_retry_holds_its_lane_but_not_others() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(1, 1), NOW);
        lanes.insert("L1", entry(2, 2), NOW);
        lanes.insert("L2", entry(3, 3), NOW);
        lanes.start("L1");
        lanes.responded("L1");
        let later = Millis(5_000);
        lanes.saved("L1", 1, Some((later, 1)), NOW);
        assert_eq!(lanes.next_ready(NOW), Some("L2"));
        lanes.start("L2");
        assert_eq!(lanes.next_ready(NOW), None);
        assert_eq!(lanes.next_due(), Some(later));
        assert_eq!(lanes.next_ready(later), Some("L1"));
        assert_eq!(lanes.start("L1").unwrap().attempts, 1);
    }

    #[test]
    fn nothing_overtakes_a_started_head() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(5, 50), NOW);
        lanes.start("L1");
        lanes.insert("L1", entry(1, 10), NOW);
        lanes.responded("L1");
        lanes.saved("L1", 5, None, NOW);
        assert_eq!(lanes.start("L1").unwrap().id, 1);
    }

    #[test]
    fn an_earlier_delivery_goes_in_front_of_a_head_waiting_for_its_retry() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(5, 50), NOW);
        lanes.start("L1");
        lanes.responded("L1");
        lanes.saved("L1", 5, Some((Millis(60_000), 1)), NOW);
        lanes.insert("L1", entry(1, 10), NOW);
        assert_eq!(
            lanes.next_ready(NOW),
            Some("L1"),
            "the replayed one is due now"
        );
        assert_eq!(lanes.start("L1").unwrap().id, 1);
    }

    #[test]
    fn a_late_save_for_another_head_is_ignored() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(1, 1), NOW);
        lanes.insert("L1", entry(2, 2), NOW);
        lanes.saved("L1", 1, None, NOW);
        assert_eq!(lanes.len(), 2, "the head was never started here");
        lanes.start("L1");
        lanes.responded("L1");
        lanes.saved("L1", 2, None, NOW);
        assert_eq!(lanes.len(), 2, "2 is not the head");
    }

    #[test]
    fn waiting_lanes_are_the_idle_heads_not_due_yet() {
        let mut lanes = Lanes::default();
        let retry = |id, offset, at| Entry {
            not_before: Millis(at),
            ..entry(id, offset)
        };
        lanes.insert("due", entry(1, 1), NOW);
        lanes.insert("later", retry(2, 2, 500), NOW);
        lanes.insert("later", entry(3, 3), NOW);
        lanes.insert("soon", retry(4, 4, 200), NOW);
        lanes.insert("started", retry(5, 5, 900), NOW);
        lanes.start("started");
        let waiting: Vec<_> = lanes.waiting(NOW).collect();
        assert_eq!(waiting, vec![("later", 2), ("soon", 1)]);
        assert_eq!(
            lanes.waiting(Millis(300)).collect::<Vec<_>>(),
            vec![("later", 2)]
        );
        assert_eq!(lanes.waiting(Millis(500)).count(), 0);
    }

    #[test]
    fn eviction_and_forgetting_keep_started_heads() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(1, 1), NOW);
        lanes.insert("L1", entry(2, 2), NOW);
        lanes.insert("L2", entry(3, 3), NOW);
        lanes.start("L1");
        assert_eq!(lanes.evict_back("L1", 5), 1);
        assert!(lanes.holds(1) && !lanes.holds(2));
        lanes.forget_partition(0);
        assert!(lanes.has_lane("L1") && !lanes.has_lane("L2"));
        lanes.put_back("L1", NOW);
        lanes.forget_lane("L1");
        assert!(lanes.is_empty());
    }

    #[test]
    fn a_restart_keeps_only_heads_awaiting_their_save() {
        let mut lanes = Lanes::default();
        lanes.insert("L1", entry(1, 1), NOW);
        lanes.insert("L1", entry(2, 2), NOW);
        lanes.insert("L2", entry(3, 3), NOW);
        lanes.insert("L3", entry(4, 4), NOW);
        lanes.start("L1");
        lanes.responded("L1");
        lanes.start("L2");
        lanes.keep_only_awaiting_save();
        assert_eq!(lanes.len(), 1);
        assert!(lanes.holds(1));
        assert_eq!(lanes.next_ready(NOW), None);
    }
}
