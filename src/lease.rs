//! Which partitions this instance may send deliveries for right now (docs/design.md 3). The
//! PartitionActors write it when they take, renew or give up a lease in Postgres; DeliveryActors
//! read it before every send. Validity is measured on the local monotonic clock from the moment
//! the renewal was *requested*, so it always ends before the database's expiry does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Default)]
pub struct LeaseBook {
    valid_until: Arc<Mutex<HashMap<i32, Instant>>>,
}

impl LeaseBook {
    pub fn grant(&self, partition: i32, valid_until: Instant) {
        self.map().insert(partition, valid_until);
    }

    pub fn revoke(&self, partition: i32) {
        self.map().remove(&partition);
    }

    /// True when a request started now and lasting up to `request_time` ends inside the lease.
    pub fn may_send(&self, partition: i32, now: Instant, request_time: Duration) -> bool {
        self.map()
            .get(&partition)
            .is_some_and(|until| *until > now + request_time)
    }

    /// Partitions whose lease is currently valid, sorted.
    pub fn held(&self, now: Instant) -> Vec<i32> {
        let mut held: Vec<i32> = self
            .map()
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(partition, _)| *partition)
            .collect();
        held.sort_unstable();
        held
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<i32, Instant>> {
        // A poisoned lock only means another thread panicked mid-insert; the map is still usable.
        self.valid_until
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
        book.grant(0, now + Duration::from_secs(30));
        assert!(book.may_send(0, now, Duration::from_secs(10)));
        assert!(!book.may_send(0, now, Duration::from_secs(30)));
        assert_eq!(book.held(now), vec![0]);
        book.revoke(0);
        assert!(!book.may_send(0, now, Duration::ZERO));
        assert!(book.held(now).is_empty());
    }
}
