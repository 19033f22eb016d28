//! Test-only faults, compiled in only with the `fault-injection` feature (scripts/test.sh turns
//! it on). Never part of a release build.

use std::collections::HashSet;
use std::sync::Mutex;

static PANIC_ONCE: Mutex<Option<HashSet<String>>> = Mutex::new(None);

/// The next delivery attempt of this broker panics inside its DeliveryActor, once.
pub fn panic_once_in_delivery(broker_id: &str) {
    PANIC_ONCE
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(broker_id.to_owned());
}

pub(crate) fn maybe_panic_in_delivery(broker_id: &str) {
    let armed = PANIC_ONCE
        .lock()
        .unwrap()
        .as_mut()
        .is_some_and(|set| set.remove(broker_id));
    if armed {
        panic!("injected fault in the delivery actor of {broker_id}");
    }
}
