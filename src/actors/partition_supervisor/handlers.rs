use std::sync::Arc;

use actix::{Actor, ActorFutureExt, Handler, Message, ResponseActFuture, WrapFuture};
use futures::future::join_all;
use rdkafka::message::OwnedMessage;
use rdkafka::Message as _;

use super::PartitionSupervisor;
use crate::actors::partition::{PartitionActor, ProcessBatch, Revoke};
use crate::kafka::{EventConsumer, PartitionQueue};

/// Sent from the rebalance callback with the partitions' split-off queues.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PartitionsAssigned {
    pub consumer: Arc<EventConsumer>,
    pub queues: Vec<(i32, PartitionQueue)>,
}

impl Handler<PartitionsAssigned> for PartitionSupervisor {
    type Result = ();

    fn handle(&mut self, msg: PartitionsAssigned, _: &mut Self::Context) {
        for (partition, queue) in msg.queues {
            let actor =
                PartitionActor::new(self.deps.clone(), partition, msg.consumer.clone(), queue);
            if let Some(previous) = self.partitions.insert(partition, actor.start()) {
                // Assigned twice without a revoke in between: the old actor must not keep going.
                previous.do_send(Revoke);
            }
        }
    }
}

/// Sent from the rebalance callback, which blocks (with a deadline) until `done` is signalled.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PartitionsRevoked {
    pub partitions: Vec<i32>,
    pub done: std::sync::mpsc::Sender<()>,
}

impl Handler<PartitionsRevoked> for PartitionSupervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: PartitionsRevoked, _: &mut Self::Context) -> Self::Result {
        let stopping: Vec<_> = msg
            .partitions
            .iter()
            .filter_map(|partition| self.partitions.remove(partition))
            .map(|actor| actor.send(Revoke))
            .collect();
        Box::pin(join_all(stopping).into_actor(self).map(move |_, _, _| {
            let _ = msg.done.send(());
        }))
    }
}

/// Stops every PartitionActor (shutdown): each finishes its batch and stores its offset.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopPartitions;

impl Handler<StopPartitions> for PartitionSupervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopPartitions, _: &mut Self::Context) -> Self::Result {
        let stopping: Vec<_> = self
            .partitions
            .drain()
            .map(|(_, actor)| actor.send(Revoke))
            .collect();
        Box::pin(join_all(stopping).into_actor(self).map(|_, _, _| ()))
    }
}

/// A message that reached the main queue before its partition was split off.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StrayMessage(pub OwnedMessage);

impl Handler<StrayMessage> for PartitionSupervisor {
    type Result = ();

    fn handle(&mut self, msg: StrayMessage, _: &mut Self::Context) {
        match self.partitions.get(&msg.0.partition()) {
            Some(actor) => actor.do_send(ProcessBatch {
                messages: vec![msg.0],
            }),
            // Not ours any more: its offset was not stored, so the next owner reads it again.
            None => tracing::warn!(
                topic = msg.0.topic(),
                partition = msg.0.partition(),
                offset = msg.0.offset(),
                "dropping a message of a partition we no longer own; its new owner will read it"
            ),
        }
    }
}
