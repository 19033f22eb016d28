//! A broker's in-memory deliveries, one FIFO lane per load, at most one delivery in flight per
//! lane (docs/design.md 4). Pure: the caller passes `now`. Bounded: `capacity` items at most; what does
//! not fit stays in the ledger and is loaded later.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Queued,
    AlreadyQueued,
    Full,
}

/// What happened to a lane's head after its attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// Delivered or dead: the next delivery of the load may go.
    Done,
    /// Try the same head again, not before this instant; the rest of the lane waits.
    RetryAt(Instant),
}

#[derive(Debug)]
struct Entry<T> {
    id: i64,
    order: (i32, i64),
    item: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LaneState {
    /// Listed in `ready`: its head can be sent now.
    Ready,
    /// The head is being sent (or its outcome written).
    Busy,
    /// The head waits for its retry time; listed in `waiting`.
    Waiting(Instant),
}

#[derive(Debug)]
struct Lane<T> {
    entries: VecDeque<Entry<T>>,
    state: LaneState,
}

#[derive(Debug)]
pub struct LoadQueues<T> {
    lanes: HashMap<String, Lane<T>>,
    ready: VecDeque<String>,
    waiting: BTreeSet<(Instant, String)>,
    ids: HashSet<i64>,
    capacity: usize,
    /// Per load, the newest delivery that finished here (delivered or dead), for recently
    /// active loads only (bounded, oldest forgotten first). See `covered_through`.
    finished_through: HashMap<String, (i32, i64)>,
    finished_order: VecDeque<String>,
}

/// How many loads' `finished_through` marks are kept. Forgetting one only costs a ledger load
/// the next time that load's predecessor check fails.
const FINISHED_MARKS: usize = 10_000;

impl<T> LoadQueues<T> {
    pub fn new(capacity: usize) -> Self {
        LoadQueues {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            waiting: BTreeSet::new(),
            ids: HashSet::new(),
            capacity,
            finished_through: HashMap::new(),
            finished_order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.ids.len())
    }

    pub fn has_load(&self, load: &str) -> bool {
        self.lanes.contains_key(load)
    }

    /// Up to which (partition, offset) every pending delivery of `load` is accounted for here:
    /// held in its lane, or finished by this actor. A new delivery of the load can join its lane
    /// when its newest pending predecessor is at or below this.
    pub fn covered_through(&self, load: &str) -> Option<(i32, i64)> {
        let held = self
            .lanes
            .get(load)
            .and_then(|lane| lane.entries.back())
            .map(|entry| entry.order);
        held.max(self.finished_through.get(load).copied())
    }

    fn mark_finished(&mut self, load: &str, order: (i32, i64)) {
        if self
            .finished_through
            .insert(load.to_owned(), order)
            .is_none()
        {
            self.finished_order.push_back(load.to_owned());
            if self.finished_order.len() > FINISHED_MARKS {
                if let Some(oldest) = self.finished_order.pop_front() {
                    self.finished_through.remove(&oldest);
                }
            }
        }
    }

    pub fn known_ids(&self) -> Vec<i64> {
        self.ids.iter().copied().collect()
    }

    /// Adds a delivery to its load's lane, in `order` (partition, offset). `not_before` delays a
    /// lane that starts with it (a retry loaded from the ledger).
    pub fn insert(
        &mut self,
        id: i64,
        load: &str,
        order: (i32, i64),
        not_before: Option<Instant>,
        item: T,
    ) -> Inserted {
        if self.ids.contains(&id) {
            return Inserted::AlreadyQueued;
        }
        if self.ids.len() >= self.capacity {
            return Inserted::Full;
        }
        self.ids.insert(id);
        let entry = Entry { id, order, item };
        match self.lanes.get_mut(load) {
            Some(lane) => {
                // Never in front of a head that is in flight or waiting for its retry.
                let first_movable = usize::from(lane.state != LaneState::Ready);
                let position = lane
                    .entries
                    .iter()
                    .skip(first_movable)
                    .position(|e| e.order > order)
                    .map_or(lane.entries.len(), |p| p + first_movable);
                lane.entries.insert(position, entry);
            }
            None => {
                let state = match not_before {
                    Some(at) => {
                        self.waiting.insert((at, load.to_owned()));
                        LaneState::Waiting(at)
                    }
                    None => {
                        self.ready.push_back(load.to_owned());
                        LaneState::Ready
                    }
                };
                self.lanes.insert(
                    load.to_owned(),
                    Lane {
                        entries: VecDeque::from([entry]),
                        state,
                    },
                );
            }
        }
        Inserted::Queued
    }

    /// Moves lanes whose retry time has come to the ready list.
    fn promote_due(&mut self, now: Instant) {
        while let Some((at, _)) = self.waiting.first() {
            if *at > now {
                break;
            }
            let (_, load) = self.waiting.pop_first().expect("checked above");
            if let Some(lane) = self.lanes.get_mut(&load) {
                lane.state = LaneState::Ready;
                self.ready.push_back(load);
            }
        }
    }

    /// Is some lane's head ready to be sent at `now`?
    pub fn has_ready(&mut self, now: Instant) -> bool {
        self.promote_due(now);
        !self.ready.is_empty()
    }

    /// The head of the next ready lane; the lane is busy until `finish` or `release`.
    pub fn pop_ready(&mut self, now: Instant) -> Option<(String, &T)> {
        self.promote_due(now);
        let load = self.ready.pop_front()?;
        let lane = self.lanes.get_mut(&load)?;
        lane.state = LaneState::Busy;
        let head = lane.entries.front().expect("lanes are never empty");
        Some((load, &head.item))
    }

    /// Ends the head's attempt.
    pub fn finish(&mut self, load: &str, finish: Finish) {
        let Some(lane) = self.lanes.get_mut(load) else {
            return;
        };
        match finish {
            Finish::Done => {
                let finished = lane.entries.pop_front().map(|head| {
                    self.ids.remove(&head.id);
                    head.order
                });
                if lane.entries.is_empty() {
                    self.lanes.remove(load);
                } else {
                    lane.state = LaneState::Ready;
                    self.ready.push_back(load.to_owned());
                }
                if let Some(order) = finished {
                    self.mark_finished(load, order);
                }
            }
            Finish::RetryAt(at) => {
                lane.state = LaneState::Waiting(at);
                self.waiting.insert((at, load.to_owned()));
            }
        }
    }

    /// Mutable access to a lane's head (to update its attempt count after a retry).
    pub fn head_mut(&mut self, load: &str) -> Option<&mut T> {
        self.lanes
            .get_mut(load)
            .and_then(|lane| lane.entries.front_mut())
            .map(|e| &mut e.item)
    }

    /// Forgets a whole lane that is not busy (its deliveries stay pending in the ledger).
    pub fn forget_lane(&mut self, load: &str) {
        // Its pending deliveries are no longer held, so nothing is covered any more.
        self.finished_through.remove(load);
        let Some(lane) = self.lanes.remove(load) else {
            return;
        };
        for entry in &lane.entries {
            self.ids.remove(&entry.id);
        }
        match lane.state {
            LaneState::Ready => self.ready.retain(|l| l != load),
            LaneState::Waiting(at) => {
                self.waiting.remove(&(at, load.to_owned()));
            }
            LaneState::Busy => {}
        }
    }

    /// Forgets a revoked partition: every lane of it not in flight, and what was finished in it.
    pub fn forget_partition(&mut self, partition: i32) {
        let doomed: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.state != LaneState::Busy)
            .filter(|(_, lane)| lane.entries[0].order.0 == partition)
            .map(|(load, _)| load.clone())
            .collect();
        for load in doomed {
            self.forget_lane(&load);
        }
        self.finished_through
            .retain(|_, (finished_partition, _)| *finished_partition != partition);
        let finished = &self.finished_through;
        self.finished_order
            .retain(|load| finished.contains_key(load));
    }

    /// When the earliest waiting lane becomes ready, if any.
    pub fn next_wakeup(&self) -> Option<Instant> {
        self.waiting.first().map(|(at, _)| *at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn queue() -> LoadQueues<&'static str> {
        LoadQueues::new(10)
    }

    #[test]
    fn one_in_flight_per_load_in_offset_order() {
        let mut q = queue();
        let now = Instant::now();
        q.insert(2, "L1", (0, 20), None, "L1#2");
        q.insert(1, "L1", (0, 10), None, "L1#1");
        q.insert(3, "L2", (0, 15), None, "L2#1");
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("L1#1"));
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("L2#1"));
        assert_eq!(q.pop_ready(now), None, "L1#2 waits behind L1#1");
        q.finish("L1", Finish::Done);
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("L1#2"));
    }

    #[test]
    fn a_retry_holds_its_lane_but_not_others() {
        let mut q = queue();
        let now = Instant::now();
        q.insert(1, "L1", (0, 1), None, "L1#1");
        q.insert(2, "L1", (0, 2), None, "L1#2");
        q.insert(3, "L2", (0, 3), None, "L2#1");
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("L1#1"));
        let later = now + Duration::from_secs(5);
        q.finish("L1", Finish::RetryAt(later));
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("L2#1"));
        assert_eq!(q.pop_ready(now), None);
        assert_eq!(q.next_wakeup(), Some(later));
        assert_eq!(q.pop_ready(later).map(|(_, i)| *i), Some("L1#1"));
    }

    #[test]
    fn nothing_overtakes_a_busy_head() {
        let mut q = queue();
        let now = Instant::now();
        q.insert(5, "L1", (0, 50), None, "late");
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("late"));
        q.insert(1, "L1", (0, 10), None, "early");
        q.finish("L1", Finish::Done);
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("early"));
    }

    #[test]
    fn bounded_and_deduplicated() {
        let mut q = LoadQueues::new(2);
        assert_eq!(q.insert(1, "L1", (0, 1), None, ()), Inserted::Queued);
        assert_eq!(q.insert(1, "L1", (0, 1), None, ()), Inserted::AlreadyQueued);
        assert_eq!(q.insert(2, "L2", (0, 2), None, ()), Inserted::Queued);
        assert_eq!(q.insert(3, "L3", (0, 3), None, ()), Inserted::Full);
        assert_eq!(q.room(), 0);
        let mut ids = q.known_ids();
        ids.sort();
        assert_eq!(ids, vec![1, 2]);
    }

    #[test]
    fn coverage_includes_held_and_finished_deliveries() {
        let mut q = queue();
        let now = Instant::now();
        assert_eq!(q.covered_through("L1"), None);
        q.insert(2, "L1", (0, 20), None, "b");
        q.insert(1, "L1", (0, 10), None, "a");
        assert_eq!(q.covered_through("L1"), Some((0, 20)));
        for _ in 0..2 {
            q.pop_ready(now);
            q.finish("L1", Finish::Done);
        }
        assert!(!q.has_load("L1"));
        assert_eq!(
            q.covered_through("L1"),
            Some((0, 20)),
            "finished deliveries still count"
        );
        q.forget_lane("L1");
        assert_eq!(q.covered_through("L1"), None);
    }

    #[test]
    fn a_lane_loaded_with_a_future_retry_waits() {
        let mut q = queue();
        let now = Instant::now();
        let at = now + Duration::from_secs(1);
        q.insert(1, "L1", (0, 1), Some(at), "retry");
        assert_eq!(q.pop_ready(now), None);
        assert_eq!(q.pop_ready(at).map(|(_, i)| *i), Some("retry"));
    }

    #[test]
    fn forgetting_a_partition_keeps_lanes_in_flight() {
        let mut q = LoadQueues::new(10);
        let now = Instant::now();
        q.insert(1, "L1", (1, 1), None, "in flight");
        q.insert(2, "L2", (1, 2), None, "queued");
        q.insert(3, "L3", (0, 1), None, "other partition");
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some("in flight"));
        q.insert(4, "L1", (1, 3), None, "behind the one in flight");
        q.forget_partition(1);
        assert!(q.has_load("L1"), "a lane in flight is kept");
        assert!(!q.has_load("L2"));
        assert!(q.has_load("L3"));
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn forgetting_a_partition_forgets_what_finished_in_it() {
        let mut q = LoadQueues::new(10);
        let now = Instant::now();
        q.insert(1, "L1", (1, 5), None, ());
        q.insert(2, "L2", (0, 5), None, ());
        for _ in 0..2 {
            let (load, _) = q.pop_ready(now).unwrap();
            q.finish(&load, Finish::Done);
        }
        q.forget_partition(1);
        assert_eq!(q.covered_through("L1"), None);
        assert_eq!(q.covered_through("L2"), Some((0, 5)));
    }
}
