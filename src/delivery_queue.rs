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
}

impl<T> LoadQueues<T> {
    pub fn new(capacity: usize) -> Self {
        LoadQueues {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            waiting: BTreeSet::new(),
            ids: HashSet::new(),
            capacity,
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

    /// The (partition, offset) of the newest delivery held for `load`.
    pub fn last_order(&self, load: &str) -> Option<(i32, i64)> {
        self.lanes
            .get(load)
            .and_then(|lane| lane.entries.back())
            .map(|entry| entry.order)
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
                if let Some(head) = lane.entries.pop_front() {
                    self.ids.remove(&head.id);
                }
                if lane.entries.is_empty() {
                    self.lanes.remove(load);
                } else {
                    lane.state = LaneState::Ready;
                    self.ready.push_back(load.to_owned());
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

    /// Forgets every lane not in flight whose head matches `predicate` (e.g. a revoked partition).
    pub fn forget_lanes_where(&mut self, predicate: impl Fn(&T) -> bool) {
        let doomed: Vec<String> = self
            .lanes
            .iter()
            .filter(|(_, lane)| lane.state != LaneState::Busy)
            .filter(|(_, lane)| predicate(&lane.entries[0].item))
            .map(|(load, _)| load.clone())
            .collect();
        for load in doomed {
            self.forget_lane(&load);
        }
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
    fn last_order_is_the_newest_entry_of_the_lane() {
        let mut q = queue();
        assert_eq!(q.last_order("L1"), None);
        q.insert(2, "L1", (0, 20), None, "b");
        q.insert(1, "L1", (0, 10), None, "a");
        assert_eq!(q.last_order("L1"), Some((0, 20)));
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
    fn forgetting_lanes_skips_busy_ones() {
        let mut q = LoadQueues::new(10);
        let now = Instant::now();
        q.insert(1, "L1", (0, 1), None, 0);
        q.insert(2, "L2", (1, 1), None, 1);
        q.insert(3, "L3", (1, 2), None, 1);
        assert_eq!(q.pop_ready(now).map(|(_, i)| *i), Some(0));
        q.insert(4, "L1", (0, 2), None, 1);
        q.forget_lanes_where(|partition| *partition == 1);
        assert!(
            q.has_load("L1"),
            "busy lane kept even though its tail matches"
        );
        assert!(!q.has_load("L2") && !q.has_load("L3"));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop_ready(now), None);
    }
}
