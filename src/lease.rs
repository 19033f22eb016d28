//! Which partitions this instance may send deliveries for right now (docs/design.md 3). The
//! PartitionActors write it when they take, renew or give up a lease in Postgres; DeliveryActors
//! read it before every send. Validity is measured on the local monotonic clock from the moment
//! the renewal was *requested*, so it always ends before the database's expiry does.
//!
//! Each acquisition gets a new generation. A revoke names the generation it ends, so a late
//! revoke from a partition's previous owner (actor) cannot remove the lease a new one took.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct LeaseBook {
    /// Per partition: (generation, valid until).
    held: Arc<Mutex<HashMap<i32, (u64, Instant)>>>,
    generations: Arc<AtomicU64>,
}

impl LeaseBook {
    /// A generation for a new acquisition, larger than every earlier one.
    pub fn next_generation(&self) -> u64 {
        self.generations.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Takes or renews `partition`'s lease as `generation`. An older generation never replaces
    /// a newer one.
    pub fn grant(&self, partition: i32, generation: u64, valid_until: Instant) {
        let mut held = self.map();
        let current = held.get(&partition).map(|(g, _)| *g);
        if current.is_none_or(|g| g <= generation) {
            held.insert(partition, (generation, valid_until));
        }
    }

    /// Ends `partition`'s lease if it is still `generation`; a stale revoke changes nothing.
    pub fn revoke(&self, partition: i32, generation: u64) {
        let mut held = self.map();
        if held.get(&partition).is_some_and(|(g, _)| *g == generation) {
            held.remove(&partition);
        }
    }

    /// True when a request started now and lasting up to `request_time` ends inside the lease.
    pub fn may_send(&self, partition: i32, now: Instant, request_time: Duration) -> bool {
        self.map()
            .get(&partition)
            .is_some_and(|(_, until)| *until > now + request_time)
    }

    /// Partitions whose lease is currently valid, sorted.
    pub fn held(&self, now: Instant) -> Vec<i32> {
        let mut held: Vec<i32> = self
            .held_generations(now)
            .into_iter()
            .map(|(partition, _)| partition)
            .collect();
        held.sort_unstable();
        held
    }

    /// Partitions whose lease is currently valid, with the lease's generation.
    pub fn held_generations(&self, now: Instant) -> Vec<(i32, u64)> {
        self.map()
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(partition, (generation, _))| (*partition, *generation))
            .collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i32, (u64, Instant)>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_only_inside_a_lease_with_room_for_the_request() {
        let book = LeaseBook::default();
        let now = Instant::now();
        assert!(!book.may_send(0, now, Duration::ZERO));
        let generation = book.next_generation();
        book.grant(0, generation, now + Duration::from_secs(30));
        assert!(book.may_send(0, now, Duration::from_secs(10)));
        assert!(!book.may_send(0, now, Duration::from_secs(30)));
        assert_eq!(book.held(now), vec![0]);
        book.revoke(0, generation);
        assert!(!book.may_send(0, now, Duration::ZERO));
        assert!(book.held(now).is_empty());
    }

    /// Issue 11, bug 6: a late revoke from the previous owner left the new one without a lease.
    #[test]
    fn a_stale_revoke_does_not_remove_a_newer_lease() {
        let book = LeaseBook::default();
        let now = Instant::now();
        let old = book.next_generation();
        book.grant(0, old, now + Duration::from_secs(30));
        let new = book.next_generation();
        book.grant(0, new, now + Duration::from_secs(30));
        book.revoke(0, old);
        assert!(book.may_send(0, now, Duration::ZERO));
        book.grant(0, old, now + Duration::from_secs(60));
        assert_eq!(
            book.held_generations(now),
            vec![(0, new)],
            "nor a stale renewal"
        );
    }
}
