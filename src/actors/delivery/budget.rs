//! The instance-wide bound on the memory DeliveryActors hold (`delivery.max_buffered_bytes`).
//! Each delivery held by a scheduler carries a `Charge` for its bytes, given back when the last
//! copy of it is dropped: whatever way a delivery leaves memory (sent and saved, evicted, a lease
//! lost, a restart, a retired actor), the bytes come back, so no exit path can leak them.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

use crate::ledger::PendingDelivery;

/// What holding one delivery costs besides its payload and identifiers: the lane entry, the
/// scheduler's maps, the row's fixed fields. An estimate; it keeps a flood of tiny events
/// bounded too.
const HELD_OVERHEAD_BYTES: usize = 512;

pub struct ByteBudget {
    used: AtomicUsize,
    max: usize,
    gauge: IntGauge,
}

impl ByteBudget {
    pub fn new(max: usize, gauge: IntGauge, max_gauge: &IntGauge) -> Arc<ByteBudget> {
        max_gauge.set(i64::try_from(max).unwrap_or(i64::MAX));
        gauge.set(0);
        Arc::new(ByteBudget {
            used: AtomicUsize::new(0),
            max,
            gauge,
        })
    }

    /// Is any room left? Checked before reading a ledger page, so a full budget costs no query.
    pub fn has_room(&self) -> bool {
        self.used.load(Ordering::Relaxed) + HELD_OVERHEAD_BYTES <= self.max
    }

    /// Takes `row`'s bytes from the budget; `None` when they do not fit (the row stays in the
    /// ledger).
    pub fn charge(self: &Arc<Self>, row: PendingDelivery) -> Option<Held> {
        let bytes = held_bytes(&row);
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|total| *total <= self.max)
            });
        match taken {
            Ok(before) => {
                self.gauge.set(gauge_value(before + bytes));
                Some(Held {
                    row,
                    _charge: Arc::new(Charge {
                        budget: self.clone(),
                        bytes,
                    }),
                })
            }
            Err(_) => None,
        }
    }
}

fn held_bytes(row: &PendingDelivery) -> usize {
    row.payload.len()
        + row.key.as_str().len()
        + row.broker_id.len()
        + row.load_id.len()
        + row.event_id.as_ref().map_or(0, String::len)
        + HELD_OVERHEAD_BYTES
}

fn gauge_value(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

struct Charge {
    budget: Arc<ByteBudget>,
    bytes: usize,
}

impl Drop for Charge {
    fn drop(&mut self) {
        let before = self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.gauge.set(gauge_value(before - self.bytes));
    }
}

/// A delivery held in memory with its share of the budget. Copies (the request being made, the
/// decision being logged) share the one charge.
#[derive(Clone)]
pub struct Held {
    pub row: PendingDelivery,
    _charge: Arc<Charge>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::core::event::IdempotencyKey;

    fn row(payload_bytes: usize) -> PendingDelivery {
        PendingDelivery {
            delivery_id: 1,
            key: IdempotencyKey::from_stored(String::new()),
            broker_id: String::new(),
            load_id: String::new(),
            event_id: None,
            partition: 0,
            offset: 0,
            attempts: 0,
            due_in: Duration::ZERO,
            payload: bytes::Bytes::from(vec![b'x'; payload_bytes]),
        }
    }

    #[test]
    fn charges_until_full_and_every_copy_dropped_gives_the_bytes_back() {
        let gauge = IntGauge::new("b", "b").unwrap();
        let max_gauge = IntGauge::new("m", "m").unwrap();
        let budget = ByteBudget::new(3 * (1_000 + HELD_OVERHEAD_BYTES), gauge.clone(), &max_gauge);
        let first = budget.charge(row(1_000)).expect("fits");
        let copy = first.clone();
        let second = budget.charge(row(1_000)).expect("fits");
        let third = budget.charge(row(1_000)).expect("fits");
        assert!(budget.charge(row(1)).is_none(), "full");
        assert!(!budget.has_room());
        assert_eq!(gauge.get(), 3 * (1_000 + HELD_OVERHEAD_BYTES) as i64);
        drop(first);
        assert!(
            budget.charge(row(1)).is_none(),
            "a copy still holds the bytes"
        );
        drop(copy);
        assert!(budget.has_room());
        drop((second, third));
        assert_eq!(gauge.get(), 0);
        assert_eq!(max_gauge.get(), 3 * (1_000 + HELD_OVERHEAD_BYTES) as i64);
    }
}
