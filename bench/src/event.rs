//! The events the bench produces, and what the receivers read back out of a webhook body.
//!
//! Every event carries `producedAtMicros` (unix microseconds when it was handed to the producer);
//! the service passes the payload through byte for byte, so receivers can measure end-to-end
//! latency without asking anyone.

use serde::Deserialize;

/// Load id of the per-partition flush messages: valid events nobody subscribes to.
pub const FLUSH_LOAD: &str = "__bench_flush__";
/// Load id of the warm-up event; only the warm-up broker subscribes to it.
pub const WARMUP_LOAD: &str = "__bench_warmup__";

const EVENT_ID_PREFIX: &str = "ev-";
const STATUSES: [&str; 5] = [
    "tendered",
    "matched",
    "dispatched",
    "in_transit",
    "delivered",
];

pub fn load_id(load: u32) -> String {
    format!("load-{load:05}")
}

/// Which load event `index` belongs to: spread over all loads, deterministic, so a load gets
/// a steady stream of events in offset order rather than a burst.
pub fn load_of(index: u32, loads: u32) -> u32 {
    ((u64::from(index) * 2_654_435_761) % u64::from(loads.max(1))) as u32
}

/// Event `index`'s id: `ev-<16 hex digits>-<index>`. The hex part is a fixed scramble of the
/// index, so ids (and the ledger's idempotency keys) land all over the key index as a
/// producer's random ids (UUIDs) do. Plain `ev-<index>` sorts as text out of index order
/// (`ev-10` before `ev-9`), so for stretches of a run every new key landed in leaves that
/// retention had half emptied, a pattern no production producer makes (the soak's fourth run,
/// docs/performance.md).
pub fn event_id(index: u32) -> String {
    format!("{EVENT_ID_PREFIX}{:016x}-{index}", scramble(index))
}

/// SplitMix64's finalizer: a bijection that spreads consecutive indexes over all 64 bits.
fn scramble(index: u32) -> u64 {
    let mut z = u64::from(index).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A shipment status-change event of a realistic size (~300 bytes).
pub fn event_json(index: u32, load: u32, produced_at_micros: u64) -> Vec<u8> {
    format!(
        concat!(
            r#"{{"eventId":"{event_id}","loadId":"{load}","status":"{status}","#,
            r#""occurredAt":"2026-11-25T10:00:00Z","producedAtMicros":{produced},"#,
            r#""location":{{"city":"Columbus","state":"OH","lat":39.9612,"lon":-82.9988}},"#,
            r#""carrier":{{"scac":"BNCH","mc":"MC-{mc:06}"}},"eta":"2026-11-26T18:00:00Z"}}"#
        ),
        event_id = event_id(index),
        load = load_id(load),
        status = STATUSES[index as usize % STATUSES.len()],
        produced = produced_at_micros,
        mc = index % 1_000_000,
    )
    .into_bytes()
}

/// A valid event that is not part of the results (flush and warm-up messages).
pub fn marker_json(event_id: &str, load_id: &str, produced_at_micros: u64) -> Vec<u8> {
    format!(
        r#"{{"eventId":"{event_id}","loadId":"{load_id}","status":"bench_marker","producedAtMicros":{produced_at_micros}}}"#
    )
    .into_bytes()
}

/// What a receiver learns from a webhook body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Probe {
    /// The bench event's index; `None` for markers or bodies that are not bench events.
    pub event: Option<u32>,
    pub produced_at_micros: Option<u64>,
}

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "eventId", borrow)]
    event_id: Option<&'a str>,
    #[serde(rename = "producedAtMicros")]
    produced_at_micros: Option<u64>,
}

pub fn probe(body: &[u8]) -> Probe {
    let Ok(fields) = serde_json::from_slice::<Fields<'_>>(body) else {
        return Probe::default();
    };
    Probe {
        event: fields
            .event_id
            .and_then(|id| id.strip_prefix(EVENT_ID_PREFIX))
            .and_then(|id| id.rsplit_once('-'))
            .and_then(|(_, index)| index.parse().ok()),
        produced_at_micros: fields.produced_at_micros,
    }
}

/// Unix time in microseconds: producer and receivers share this clock (same machine).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_round_trips_through_the_probe() {
        let body = event_json(4711, 42, 1_764_000_000_000_123);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["loadId"], "load-00042");
        assert!(body.len() > 250 && body.len() < 400, "{}", body.len());
        assert_eq!(
            probe(&body),
            Probe {
                event: Some(4711),
                produced_at_micros: Some(1_764_000_000_000_123)
            }
        );
    }

    #[test]
    fn consecutive_ids_do_not_sort_together() {
        let mut ids: Vec<String> = (0..1000).map(event_id).collect();
        ids.sort();
        let in_order = ids
            .windows(2)
            .filter(|pair| probe_index(&pair[0]) + 1 == probe_index(&pair[1]))
            .count();
        assert!(in_order < 10, "{in_order} neighbours in index order");
    }

    fn probe_index(id: &str) -> u32 {
        let body = format!(r#"{{"eventId":"{id}"}}"#);
        probe(body.as_bytes()).event.unwrap()
    }

    #[test]
    fn markers_and_garbage_are_not_events() {
        let marker = marker_json("flush-3", FLUSH_LOAD, 5);
        assert_eq!(probe(&marker).event, None);
        assert_eq!(probe(&marker).produced_at_micros, Some(5));
        assert_eq!(probe(b"not json"), Probe::default());
    }

    #[test]
    fn loads_are_spread_and_in_range() {
        let loads: std::collections::HashSet<u32> = (0..1000).map(|i| load_of(i, 50)).collect();
        assert_eq!(loads.len(), 50);
        assert!(loads.iter().all(|&l| l < 50));
    }
}
