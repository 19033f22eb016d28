//! Producing the scenario's events, keyed by load id, at a chosen rate or as a backlog.
//! Acknowledgements tell us each event's partition and offset (to tell lag from loss later).
//! Blocking: call from a blocking thread.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};

use crate::error::BenchError;
use crate::event::{event_json, load_of, marker_json, now_micros, FLUSH_LOAD};
use crate::scenario::Phase;
use crate::world::KAFKA;

/// Opaque of a message that is not a bench event (flush, warm-up).
const MARKER: u32 = u32::MAX;
/// How long a full local queue may hold up one send before we give up on the run.
const QUEUE_FULL_PATIENCE: Duration = Duration::from_secs(30);
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// An acknowledged bench event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducedEvent {
    pub index: u32,
    pub load: u32,
    pub partition: i32,
    pub offset: i64,
    pub produced_at_micros: u64,
}

#[derive(Default)]
struct Acks {
    /// (event index, partition, offset)
    acked: Vec<(u32, i32, i64)>,
    failed: u64,
}

struct AckContext(Arc<Mutex<Acks>>);

impl ClientContext for AckContext {}

impl ProducerContext for AckContext {
    type DeliveryOpaque = Box<u32>;

    fn delivery(&self, result: &DeliveryResult<'_>, index: Box<u32>) {
        let mut acks = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match result {
            Ok(message) if *index != MARKER => {
                acks.acked
                    .push((*index, message.partition(), message.offset()))
            }
            Ok(_) => {}
            Err(_) => acks.failed += 1,
        }
    }
}

pub struct EventProducer {
    producer: ThreadedProducer<AckContext>,
    acks: Arc<Mutex<Acks>>,
    topic: String,
    loads: u32,
    /// `(load, produced_at_micros)` by event index.
    sent: Vec<(u32, u64)>,
}

/// What production left behind.
pub struct Production {
    pub events: Vec<ProducedEvent>,
    pub failed: u64,
}

impl EventProducer {
    pub fn new(topic: &str, loads: u32) -> Result<EventProducer, BenchError> {
        let acks = Arc::new(Mutex::new(Acks::default()));
        let producer = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            // Small linger: latency is measured from the moment of producing.
            .set("linger.ms", "2")
            .set("queue.buffering.max.messages", "500000")
            .set("message.timeout.ms", "60000")
            .create_with_context(AckContext(acks.clone()))
            .map_err(|e| BenchError::kafka("creating the producer", e))?;
        Ok(EventProducer {
            producer,
            acks,
            topic: topic.to_owned(),
            loads,
            sent: Vec::new(),
        })
    }

    /// Hands one message to the producer, waiting (bounded) while its queue is full.
    fn send(
        &self,
        key: &str,
        value: &[u8],
        partition: Option<i32>,
        opaque: u32,
    ) -> Result<(), BenchError> {
        let give_up = Instant::now() + QUEUE_FULL_PATIENCE;
        let mut record = BaseRecord::with_opaque_to(&self.topic, Box::new(opaque))
            .key(key)
            .payload(value);
        if let Some(partition) = partition {
            record = record.partition(partition);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if Instant::now() < give_up =>
                {
                    record = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((error, _)) => return Err(BenchError::kafka("producing an event", error)),
            }
        }
    }

    fn send_event(&mut self) -> Result<(), BenchError> {
        let index = self.sent.len() as u32;
        let load = load_of(index, self.loads);
        let produced_at = now_micros();
        let value = event_json(index, load, produced_at);
        self.send(&crate::event::load_id(load), &value, None, index)?;
        self.sent.push((load, produced_at));
        Ok(())
    }

    /// Produces `events` as fast as the producer takes them (pipelined).
    pub fn produce_backlog(&mut self, events: u32) -> Result<(), BenchError> {
        for _ in 0..events {
            self.send_event()?;
        }
        self.flush();
        Ok(())
    }

    /// Produces phase after phase at each phase's rate, pacing every few milliseconds.
    pub fn produce_at_rate(&mut self, phases: &[Phase]) -> Result<(), BenchError> {
        for phase in phases {
            let start = Instant::now();
            let first = self.sent.len() as u64;
            let total = (f64::from(phase.events_per_sec) * phase.duration.as_secs_f64()) as u64;
            loop {
                let elapsed = start.elapsed();
                let due =
                    ((f64::from(phase.events_per_sec) * elapsed.as_secs_f64()) as u64).min(total);
                while (self.sent.len() as u64) < first + due {
                    self.send_event()?;
                }
                if due >= total || elapsed > phase.duration + Duration::from_secs(5) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        self.flush();
        Ok(())
    }

    /// One singly acknowledged message: returns once the broker has it.
    pub fn send_marker(
        &self,
        event_id: &str,
        load_id: &str,
        partition: Option<i32>,
    ) -> Result<(), BenchError> {
        let value = marker_json(event_id, load_id, now_micros());
        self.send(load_id, &value, partition, MARKER)?;
        self.flush();
        Ok(())
    }

    /// Ends a burst with one singly acknowledged flush message per partition: after a pipelined
    /// burst Tansu can leave a partition's high watermark short of acknowledged offsets until
    /// the next produce.
    pub fn flush_partitions(&self, partitions: i32) -> Result<(), BenchError> {
        for partition in 0..partitions {
            self.send_marker(&format!("flush-{partition}"), FLUSH_LOAD, Some(partition))?;
        }
        Ok(())
    }

    /// Waits for every acknowledgement. A timeout is not fatal: unacknowledged events are left
    /// out of the results (and counted as not acknowledged).
    fn flush(&self) {
        if let Err(error) = self.producer.flush(FLUSH_TIMEOUT) {
            eprintln!(
                "bench:   produce acknowledgements still missing after {} s: {error}",
                FLUSH_TIMEOUT.as_secs()
            );
        }
    }

    /// The acknowledged events, in index order.
    pub fn finish(self) -> Production {
        let _ = self.producer.flush(FLUSH_TIMEOUT);
        let acks = std::mem::take(&mut *self.acks.lock().unwrap_or_else(|e| e.into_inner()));
        let mut events: Vec<ProducedEvent> = acks
            .acked
            .iter()
            .filter_map(|&(index, partition, offset)| {
                let &(load, produced_at_micros) = self.sent.get(index as usize)?;
                Some(ProducedEvent {
                    index,
                    load,
                    partition,
                    offset,
                    produced_at_micros,
                })
            })
            .collect();
        events.sort_unstable_by_key(|e| e.index);
        Production {
            events,
            failed: acks.failed,
        }
    }
}
