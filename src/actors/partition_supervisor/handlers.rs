use std::sync::Arc;
use std::time::Duration;

use actix::{
    ActorFutureExt, AsyncContext, Handler, Message, ResponseActFuture, StreamHandler, WrapFuture,
};
use futures::future::join_all;
use rdkafka::consumer::Consumer;
use rdkafka::{Offset, TopicPartitionList};

use super::{Assignment, PartitionSupervisor};
use crate::actors::delivery_supervisor::PartitionRevoked;
use crate::actors::partition::{read_partition, PartitionActor, PartitionReader, Revoke, Tenure};
use crate::kafka::{EventConsumer, PartitionQueue, RebalanceEvent};

impl StreamHandler<RebalanceEvent> for PartitionSupervisor {
    fn handle(&mut self, event: RebalanceEvent, ctx: &mut Self::Context) {
        match event {
            RebalanceEvent::Assigned { consumer, queues } => {
                let partitions: Vec<i32> = queues.iter().map(|(partition, _)| *partition).collect();
                for (partition, queue) in queues {
                    self.assign(partition, queue, &consumer);
                }
                warn_about_uncommitted(self.deps.topic.clone(), consumer, partitions);
            }
            RebalanceEvent::Revoked {
                partitions,
                drained,
            } => {
                let draining = self.revoke(&partitions);
                ctx.spawn(draining.map(move |(), _, _| {
                    let _ = drained.send(());
                }));
            }
        }
    }

    /// The consumer is closed; the supervisor stays for `StopPartitions`.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl PartitionSupervisor {
    /// Opens a tenure on `partition`: a PartitionActor and a reader that start reading,
    /// claiming and renewing the lease only once the partition's previous reader on this instance
    /// has returned and the earlier tenures' actors have stopped.
    fn assign(&mut self, partition: i32, queue: PartitionQueue, consumer: &Arc<EventConsumer>) {
        let topic = self.deps.topic.clone();
        // Assigned twice without a revocation in between: librdkafka did not reset the fetch
        // position, so the new reader must resume exactly where the old one stopped.
        let cut_short = self.assigned.remove(&partition);
        if let Some(previous) = &cut_short {
            tracing::warn!(topic = %topic, partition,
                "partition assigned again without a revocation; replacing its reader");
            self.let_go(partition, previous);
            previous.tenure.end();
            previous.actor.do_send(Revoke);
        }
        let earlier = self.tenures.entry(partition).or_default();
        earlier.retain(|tenure| !tenure.is_actor_stopped());
        let predecessors = earlier.clone();
        let tenure = Arc::new(Tenure::new(partition));
        earlier.push(tenure.clone());
        let actor = actix::Actor::start(PartitionActor::new(
            self.deps.clone(),
            tenure.clone(),
            consumer.clone(),
            predecessors.clone(),
        ));
        let reader = actix::spawn(read_partition(PartitionReader {
            topic,
            tenure: tenure.clone(),
            queue,
            consumer: consumer.clone(),
            actor: actor.clone(),
            max_batch: self.deps.max_batch_messages,
            health: self.deps.health.clone(),
            predecessor_reader: self.readers.remove(&partition),
            predecessors,
            resume_after: cut_short.map(|previous| previous.tenure),
        }));
        self.readers.insert(partition, reader);
        self.assigned
            .insert(partition, Assignment { actor, tenure });
    }

    /// Revokes the tenures of `partitions`: their readers and their deliveries stop at once; then
    /// each actor gets until `kafka.revoke_drain_timeout_ms` to finish its batch and store its
    /// offset. After that the tenures end: a batch finishing later stores nothing.
    fn revoke(&mut self, partitions: &[i32]) -> impl actix::ActorFuture<Self, Output = ()> {
        let revoked: Vec<(i32, Assignment)> = partitions
            .iter()
            .filter_map(|partition| self.assigned.remove(partition).map(|a| (*partition, a)))
            .collect();
        for (partition, assignment) in &revoked {
            self.let_go(*partition, assignment);
        }
        // Detached: actix drops a message whose request future is dropped, and a stuck actor
        // must still get its Revoke (and stop) once its batch finishes, after the deadline.
        let stopping = actix::spawn(join_all(revoked.iter().map(|(_, a)| a.actor.send(Revoke))));
        let deadline = self.revoke_drain_timeout;
        let tenures: Vec<Arc<Tenure>> = revoked.into_iter().map(|(_, a)| a.tenure).collect();
        let topic = self.deps.topic.clone();
        async move {
            let timed_out = tokio::time::timeout(deadline, stopping).await.is_err();
            for tenure in &tenures {
                tenure.end();
                if timed_out {
                    log_unfinished(&topic, tenure, deadline);
                }
            }
        }
        .into_actor(self)
    }

    /// The part of a revocation that must not wait for the batch in hand: stop reading and stop
    /// sending this partition's deliveries. The lease is given up by the actor once its batch is
    /// over (see `Revoke`).
    fn let_go(&self, partition: i32, assignment: &Assignment) {
        assignment.tenure.revoke_lease(|generation| {
            self.deps.leases.revoke(partition, generation);
            self.deps.deliveries.do_send(PartitionRevoked {
                partition,
                generation,
            });
        });
    }
}

fn log_unfinished(topic: &str, tenure: &Tenure, deadline: Duration) {
    let partition = tenure.partition;
    let stored_offset = tenure.stored_through();
    match tenure.in_hand() {
        Some((first, last)) => tracing::warn!(
            topic,
            partition,
            batch_first_offset = first,
            batch_last_offset = last,
            stored_offset,
            timeout_ms = deadline.as_millis() as u64,
            "revoked partition did not finish its batch in time; its offset stays where it was stored and the next reader re-reads the batch"
        ),
        None => tracing::warn!(
            topic,
            partition,
            stored_offset,
            timeout_ms = deadline.as_millis() as u64,
            "revoked partition's actor did not stop in time; nothing more is stored for it"
        ),
    }
}

/// A partition without a committed offset starts at the earliest retained message. That is right
/// for a partition added later or whose offsets expired, but worth a line: it may re-read a lot.
/// (A first deployment never gets here unseeded: src/startup.rs gates it.)
fn warn_about_uncommitted(topic: String, consumer: Arc<EventConsumer>, partitions: Vec<i32>) {
    if partitions.is_empty() {
        return;
    }
    actix::spawn(async move {
        let mut list = TopicPartitionList::new();
        for &partition in &partitions {
            list.add_partition(&topic, partition);
        }
        let committed = tokio::task::spawn_blocking(move || {
            consumer.committed_offsets(list, Duration::from_secs(10))
        })
        .await;
        let committed = match committed {
            Ok(Ok(committed)) => committed,
            Ok(Err(error)) => {
                tracing::warn!(topic = %topic, error.message = %error, "could not read committed offsets of the assigned partitions");
                return;
            }
            Err(_) => return,
        };
        for element in committed.elements_for_topic(&topic) {
            if !matches!(element.offset(), Offset::Offset(_)) {
                tracing::warn!(
                    topic = %topic,
                    partition = element.partition(),
                    "partition has no committed offset for this group (added later, or its offsets expired); reading it from the earliest retained message"
                );
            }
        }
    });
}

/// Stops every PartitionActor (shutdown): readers stop, each actor finishes its batch and
/// stores its offset (the caller bounds the wait).
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopPartitions;

impl Handler<StopPartitions> for PartitionSupervisor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, _: StopPartitions, _: &mut Self::Context) -> Self::Result {
        let partitions: Vec<i32> = self.assigned.keys().copied().collect();
        Box::pin(self.revoke(&partitions))
    }
}
