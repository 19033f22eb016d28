//! Test-only faults, compiled in only with the `fault-injection` feature (scripts/test.sh turns
//! it on). Never part of a release build.

use std::collections::HashSet;
use std::sync::Mutex;

static ARMED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The next delivery attempt of this broker panics inside its DeliveryActor, once.
pub fn panic_once_in_delivery(broker_id: &str) {
    arm(format!("delivery:{broker_id}"));
}

/// The next batch of this topic panics inside its PartitionActor, once.
pub fn panic_once_in_partition(topic: &str) {
    arm(format!("partition:{topic}"));
}

pub(crate) fn maybe_panic_in_delivery(broker_id: &str) {
    fire(format!("delivery:{broker_id}"));
}

pub(crate) fn maybe_panic_in_partition(topic: &str) {
    fire(format!("partition:{topic}"));
}

fn arm(site: String) {
    ARMED
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(site);
}

fn fire(site: String) {
    let armed = ARMED
        .lock()
        .unwrap()
        .as_mut()
        .is_some_and(|set| set.remove(&site));
    if armed {
        panic!("injected fault at {site}");
    }
}
