use std::collections::HashMap;
use std::time::Duration;

use actix::{ActorContext, ActorFutureExt, AtomicResponse, Handler, Message, WrapFuture};
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::Message as _;

use super::PartitionActor;
use crate::actors::delivery_supervisor::{PartitionRevoked, RouteDeliveries};
use crate::actors::idempotency::{ClaimBatch, ReleaseLease};
use crate::event::{parse_event, RejectReason, ShipmentEvent};
use crate::ledger::RejectedMessage;

/// How much of a rejected message's value is kept in `rejected_messages`.
const REJECTED_VALUE_CAP: usize = 64 * 1024;

/// One batch read from the partition queue, in offset order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProcessBatch {
    pub messages: Vec<OwnedMessage>,
}

impl Handler<ProcessBatch> for PartitionActor {
    // Atomic: a revocation waits until the batch in hand is in the ledger and its offset stored.
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, msg: ProcessBatch, _: &mut Self::Context) -> Self::Result {
        #[cfg(feature = "fault-injection")]
        crate::fault_injection::maybe_panic_in_partition(&self.deps.topic);
        let topic = self.deps.topic.clone();
        let partition = self.partition;
        let Some(last_offset) = msg.messages.last().map(|m| m.offset()) else {
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
        };
        let mut events: Vec<(i64, ShipmentEvent)> = Vec::with_capacity(msg.messages.len());
        let mut rejected = Vec::new();
        for message in &msg.messages {
            // Parsing is the only logic here; a panic in it must cost one message, not the partition.
            let parsed = std::panic::catch_unwind(|| {
                parse_event(message.payload(), self.deps.max_message_bytes)
            })
            .unwrap_or_else(|_| Err(RejectReason::ParserPanicked));
            match parsed {
                Ok(event) => events.push((message.offset(), event)),
                Err(reason) => {
                    tracing::warn!(
                        topic = %topic,
                        partition,
                        offset = message.offset(),
                        value_bytes = message.payload().map_or(0, <[u8]>::len),
                        error.message = %reason,
                        "message rejected: not a valid shipment event; recorded in rejected_messages"
                    );
                    rejected.push(RejectedMessage {
                        offset: message.offset(),
                        key: message
                            .key()
                            .map(|k| k[..k.len().min(REJECTED_VALUE_CAP)].to_vec()),
                        raw_value: message
                            .payload()
                            .map(|v| v[..v.len().min(REJECTED_VALUE_CAP)].to_vec()),
                        value_bytes: message
                            .payload()
                            .map_or(0, |v| i32::try_from(v.len()).unwrap_or(i32::MAX)),
                        error: reason.to_string(),
                    });
                }
            }
        }
        let partition_label = [partition.to_string()];
        self.deps
            .metrics
            .messages_consumed
            .with_label_values(&partition_label)
            .inc_by(msg.messages.len() as u64);
        self.deps
            .metrics
            .messages_rejected
            .with_label_values(&partition_label)
            .inc_by(rejected.len() as u64);
        let claim = ClaimBatch {
            topic: topic.clone(),
            partition,
            events: events.clone(),
            rejected,
        };
        let ledger = self.deps.ledger.clone();
        let claimed = async move {
            // Claims are idempotent, so retrying is always safe; skipping never is (the events
            // would be lost). A database outage therefore shows up as lag on this partition.
            let mut backoff = Duration::from_millis(100);
            loop {
                let error = match ledger.send(claim.clone()).await {
                    Ok(Ok(claimed)) => return claimed,
                    Ok(Err(error)) => error.to_string(),
                    Err(error) => error.to_string(),
                };
                tracing::error!(
                    topic = %claim.topic,
                    partition = claim.partition,
                    offset = last_offset,
                    error.message = %error,
                    retry_in_ms = backoff.as_millis() as u64,
                    "could not write the batch to the ledger; retrying (offsets do not move meanwhile)"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        };
        AtomicResponse::new(Box::pin(claimed.into_actor(self).map(
            move |claimed, act, _| {
                // Every row up to last_offset is committed: the offset may move past it.
                if let Err(error) = act.consumer.store_offset(&topic, partition, last_offset) {
                    tracing::warn!(topic = %topic, partition, offset = last_offset, error.message = %error,
                        "could not store offset (partition probably revoked); the next owner re-reads from the last commit");
                }
                let mut new_per_key: HashMap<&str, usize> = HashMap::new();
                for c in &claimed {
                    *new_per_key.entry(c.delivery.key.as_str()).or_default() += 1;
                }
                for (offset, event) in &events {
                    tracing::info!(
                        topic = %topic,
                        partition,
                        offset,
                        event_id = event.event_id.as_deref().unwrap_or(event.key.as_str()),
                        load_id = %event.load_id,
                        status = %event.status,
                        new_deliveries = new_per_key.get(event.key.as_str()).copied().unwrap_or(0),
                        "event claimed"
                    );
                }
                if !claimed.is_empty() {
                    act.deps.deliveries.do_send(RouteDeliveries { claimed });
                }
            },
        )))
    }
}

/// Stop: finish the batch in hand (the handler above is atomic), stop reading, give up the lease.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoke;

impl Handler<Revoke> for PartitionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Revoke, _: &mut Self::Context) -> Self::Result {
        self.revoked = true;
        if let Some(stop) = self.stop_reading.take() {
            let _ = stop.send(());
        }
        if let Some(generation) = self.lease_generation.take() {
            self.deps.leases.revoke(self.partition, generation);
            self.deps.deliveries.do_send(PartitionRevoked {
                partition: self.partition,
                generation,
            });
        }
        // Requests already in flight may run for up to request_timeout: the lease lingers that
        // long so the next owner cannot overlap with them.
        let release = self.deps.ledger.send(ReleaseLease {
            topic: self.deps.topic.clone(),
            partition: self.partition,
            owner: self.deps.instance_id.clone(),
            linger: self.deps.request_timeout + Duration::from_secs(1),
        });
        AtomicResponse::new(Box::pin(release.into_actor(self).map(|result, act, ctx| {
            if let Ok(Err(error)) = result {
                tracing::warn!(topic = %act.deps.topic, partition = act.partition, error.message = %error,
                    "could not release the partition lease; it expires by itself");
            }
            ctx.stop();
        })))
    }
}
