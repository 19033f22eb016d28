//! Turning what the receivers saw into figures. Pure: no I/O, unit-tested below.

use std::collections::HashMap;

use crate::lag::LagPoint;
use crate::producer::ProducedEvent;
use crate::scenario::BrokerClass;
use crate::sink::{Answer, ReceivedRequest};

/// Everything one run left behind.
pub struct Observations<'a> {
    pub events: &'a [ProducedEvent],
    /// Subscribed brokers by load index.
    pub subscribers: &'a dyn Fn(u32) -> Vec<u16>,
    /// By broker index; requests to other indexes (the warm-up broker) are ignored.
    pub classes: &'a [BrokerClass],
    pub requests: &'a [ReceivedRequest],
    /// The group's committed offset per partition when the run ended.
    pub committed: &'a HashMap<i32, i64>,
    /// The run's clock: production start, or system start for a backlog.
    pub clock_start_micros: u64,
    pub lag: &'a [LagPoint],
    pub peak_rss_kib: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Figures {
    pub events: usize,
    /// (event, broker) pairs that must arrive: every subscribed broker that does not hang.
    pub expected: u64,
    pub delivered: u64,
    /// Delivered pairs per second, from the clock start to the last one.
    pub deliveries_per_sec: f64,
    /// Produced -> accepted by a healthy broker, first acceptance of each pair.
    pub latency: Option<Latency>,
    pub max_lag: Option<i64>,
    pub end_lag: Option<i64>,
    /// Clock start -> last expected pair accepted; `None` if some never were.
    pub drain_secs: Option<f64>,
    /// Accepted again after a first acceptance, by (broker, webhook-id) — or (broker, event)
    /// for requests without a webhook-id.
    pub duplicates: u64,
    /// Expected pairs never accepted...
    pub lost: u64,
    /// ...of which the event was not even consumed (at or after the committed offset).
    pub lost_unconsumed: u64,
    /// The service's ledger at the end: deliveries to expected brokers not yet delivered
    /// (pending or dead). Not known for the baseline, which keeps no record.
    pub undelivered_in_ledger: Option<u64>,
    /// Every request the receivers got, retries included.
    pub requests: usize,
    pub peak_rss_mib: Option<f64>,
}

#[derive(Hash, PartialEq, Eq)]
enum DedupKey<'a> {
    WebhookId(&'a str),
    Event(u32),
}

pub fn analyse(observed: &Observations<'_>) -> Figures {
    let counted = |broker: u16| observed.classes.get(broker as usize).copied();
    let mut first_accepted: HashMap<(u16, u32), u64> = HashMap::new();
    let mut accepted_times: HashMap<(u16, DedupKey<'_>), u32> = HashMap::new();
    for request in observed.requests {
        if request.answer != Answer::Accepted || counted(request.broker).is_none() {
            continue;
        }
        let key = match (&request.webhook_id, request.event) {
            (Some(id), _) => DedupKey::WebhookId(id),
            (None, Some(event)) => DedupKey::Event(event),
            (None, None) => continue,
        };
        *accepted_times.entry((request.broker, key)).or_default() += 1;
        if let Some(event) = request.event {
            first_accepted
                .entry((request.broker, event))
                .and_modify(|at| *at = (*at).min(request.arrived_at_micros))
                .or_insert(request.arrived_at_micros);
        }
    }
    let duplicates = accepted_times
        .values()
        .map(|&times| u64::from(times.saturating_sub(1)))
        .sum();

    let (mut expected, mut delivered, mut lost, mut lost_unconsumed) = (0u64, 0u64, 0u64, 0u64);
    let mut last_accepted = None::<u64>;
    let mut latencies_micros = Vec::new();
    for event in observed.events {
        for broker in (observed.subscribers)(event.load) {
            let class = match counted(broker) {
                Some(class) if class.expects_deliveries() => class,
                _ => continue,
            };
            expected += 1;
            match first_accepted.get(&(broker, event.index)) {
                Some(&at) => {
                    delivered += 1;
                    last_accepted = Some(last_accepted.map_or(at, |last| last.max(at)));
                    if class == BrokerClass::Healthy {
                        latencies_micros.push(at.saturating_sub(event.produced_at_micros));
                    }
                }
                None => {
                    lost += 1;
                    let consumed = observed
                        .committed
                        .get(&event.partition)
                        .is_some_and(|&committed| event.offset < committed);
                    if !consumed {
                        lost_unconsumed += 1;
                    }
                }
            }
        }
    }
    let elapsed_secs = last_accepted
        .map(|last| last.saturating_sub(observed.clock_start_micros) as f64 / 1e6)
        .unwrap_or_default();
    let lag_in_run: Vec<i64> = observed
        .lag
        .iter()
        .filter(|p| p.at_micros >= observed.clock_start_micros)
        .map(|p| p.lag)
        .collect();
    Figures {
        events: observed.events.len(),
        expected,
        delivered,
        deliveries_per_sec: if elapsed_secs > 0.0 {
            delivered as f64 / elapsed_secs
        } else {
            0.0
        },
        latency: latency(latencies_micros),
        max_lag: lag_in_run.iter().copied().max(),
        end_lag: lag_in_run.last().copied(),
        drain_secs: (lost == 0 && expected > 0).then_some(elapsed_secs),
        duplicates,
        lost,
        lost_unconsumed,
        undelivered_in_ledger: None,
        requests: observed.requests.len(),
        peak_rss_mib: observed.peak_rss_kib.map(|kib| kib as f64 / 1024.0),
    }
}

fn latency(mut micros: Vec<u64>) -> Option<Latency> {
    if micros.is_empty() {
        return None;
    }
    micros.sort_unstable();
    let at = |quantile: f64| {
        // Nearest rank.
        let rank = ((quantile * micros.len() as f64).ceil() as usize).clamp(1, micros.len());
        micros[rank - 1] as f64 / 1000.0
    };
    Some(Latency {
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(index: u32, load: u32, offset: i64) -> ProducedEvent {
        ProducedEvent {
            index,
            load,
            partition: 0,
            offset,
            produced_at_micros: 1_000_000,
        }
    }

    fn request(
        broker: u16,
        event: u32,
        id: Option<&str>,
        at: u64,
        answer: Answer,
    ) -> ReceivedRequest {
        ReceivedRequest {
            broker,
            event: Some(event),
            webhook_id: id.map(Into::into),
            sequence: None,
            produced_at_micros: Some(1_000_000),
            arrived_at_micros: at,
            answer,
        }
    }

    fn figures(requests: &[ReceivedRequest], committed: i64) -> Figures {
        // Load 0 -> brokers 0 (healthy), 1 (flaky), 2 (hanging).
        let events = [event(0, 0, 0), event(1, 0, 1)];
        let classes = [
            BrokerClass::Healthy,
            BrokerClass::Flaky,
            BrokerClass::Hanging,
        ];
        let committed = HashMap::from([(0, committed)]);
        analyse(&Observations {
            events: &events,
            subscribers: &|_| vec![0, 1, 2],
            classes: &classes,
            requests,
            committed: &committed,
            clock_start_micros: 1_000_000,
            lag: &[],
            peak_rss_kib: Some(2048),
        })
    }

    #[test]
    fn everything_delivered_once_is_complete_with_no_duplicates() {
        let requests = [
            request(0, 0, Some("a"), 1_010_000, Answer::Accepted),
            request(1, 0, Some("a"), 1_020_000, Answer::ServerError),
            request(1, 0, Some("a"), 1_500_000, Answer::Accepted),
            request(0, 1, Some("b"), 1_030_000, Answer::Accepted),
            request(1, 1, Some("b"), 2_000_000, Answer::Accepted),
            request(2, 1, Some("b"), 1_030_000, Answer::TimedOut),
            // The warm-up broker (index 3) is not counted.
            request(3, 1, None, 1_030_000, Answer::Accepted),
        ];
        let f = figures(&requests, 2);
        assert_eq!(
            (f.expected, f.delivered, f.lost, f.duplicates),
            (4, 4, 0, 0)
        );
        assert_eq!(f.drain_secs, Some(1.0));
        assert_eq!(f.deliveries_per_sec, 4.0);
        let latency = f.latency.unwrap();
        assert_eq!((latency.p50_ms, latency.max_ms), (10.0, 30.0));
        assert_eq!(f.peak_rss_mib, Some(2.0));
    }

    #[test]
    fn a_second_acceptance_is_a_duplicate_a_retry_after_an_error_is_not() {
        let requests = [
            request(0, 0, Some("a"), 1_010_000, Answer::Accepted),
            request(0, 0, Some("a"), 1_020_000, Answer::Accepted),
            // Without a webhook-id (the baseline) the event id is the key.
            request(0, 1, None, 1_030_000, Answer::Accepted),
            request(0, 1, None, 1_040_000, Answer::Accepted),
            request(0, 1, None, 1_050_000, Answer::Accepted),
        ];
        let f = figures(&requests, 2);
        assert_eq!(f.duplicates, 3);
        assert_eq!(f.delivered, 2);
    }

    #[test]
    fn missing_pairs_are_lost_and_split_by_whether_the_event_was_consumed() {
        let requests = [request(0, 0, Some("a"), 1_010_000, Answer::Accepted)];
        // Committed offset 1: event 0 (offset 0) consumed, event 1 (offset 1) not.
        let f = figures(&requests, 1);
        assert_eq!(
            (f.expected, f.delivered, f.lost, f.lost_unconsumed),
            (4, 1, 3, 2)
        );
        assert_eq!(f.drain_secs, None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let l = latency((1..=100).map(|ms| ms * 1000).collect()).unwrap();
        assert_eq!((l.p50_ms, l.p99_ms, l.max_ms), (50.0, 99.0, 100.0));
        assert_eq!(latency(Vec::new()), None);
    }
}
