use std::collections::HashMap;
use std::time::Duration;

use actix::{ActorContext, ActorFutureExt, AtomicResponse, Handler, Message, WrapFuture};
use rdkafka::message::OwnedMessage;
use rdkafka::Message as _;

use super::PartitionActor;
use crate::actors::delivery_supervisor::RouteDeliveries;
use crate::actors::ledger_gateway::{claim_until_stored, ClaimBatch, ReleaseLease};
use crate::core::event::{parse_event, RejectReason, ShipmentEvent};
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
                parse_event(message.payload(), &self.deps.event_limits)
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
        // Claims are idempotent, so retrying is always safe; skipping never is (the events would
        // be lost). A database outage shows up as a stalled partition; an event the database
        // refuses is set aside in rejected_messages and the rest is claimed.
        let claimed = claim_until_stored(ledger, claim, last_offset);
        AtomicResponse::new(Box::pin(claimed.into_actor(self).map(
            move |claimed, act, _| {
                // Every row up to last_offset is committed: the offset may move past it.
                act.store_offset(last_offset);
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
                // After a revocation the rows wait in the ledger for the partition's next owner.
                if !claimed.is_empty() && !act.tenure.is_revoked() {
                    act.deps.deliveries.do_send(RouteDeliveries { claimed });
                }
            },
        )))
    }
}

/// Stop once the batch in hand is finished (the handler above is atomic, so this waits for it),
/// then give the lease up. The reader was stopped, and this partition's deliveries were stopped,
/// by the supervisor when it revoked the tenure; the lease is kept until here so that the next
/// owner does not start sending while this instance may still be claiming the partition.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Revoke;

impl Handler<Revoke> for PartitionActor {
    type Result = AtomicResponse<Self, ()>;

    fn handle(&mut self, _: Revoke, ctx: &mut Self::Context) -> Self::Result {
        if !self
            .lease_requested
            .load(std::sync::atomic::Ordering::SeqCst)
        {
            ctx.stop();
            return AtomicResponse::new(Box::pin(actix::fut::ready(())));
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
