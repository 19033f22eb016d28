//! PartitionActor: one per assigned partition. It reads the partition's own queue in batches,
//! turns each batch into ledger rows in one round trip, and only then stores the batch's last
//! offset (docs/design.md 2). New deliveries go to the DeliverySupervisor; HTTP never gates offsets.
//! It also holds the partition's lease, which decides who may send its deliveries (docs/design.md 3).

mod handlers;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};
use futures::FutureExt;
use tokio::sync::oneshot;

pub use handlers::*;

use crate::actors::delivery_supervisor::{DeliverySupervisor, LeaseAcquired, PartitionRevoked};
use crate::actors::idempotency::{AcquireLease, IdempotencyActor};
use crate::kafka::{EventConsumer, PartitionQueue};
use crate::lease::LeaseBook;

/// What every PartitionActor needs, cloned per partition.
#[derive(Clone)]
pub struct PartitionDeps {
    pub topic: String,
    pub ledger: Addr<IdempotencyActor>,
    pub deliveries: Addr<DeliverySupervisor>,
    pub leases: LeaseBook,
    pub instance_id: String,
    pub lease: Duration,
    pub request_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_batch_messages: usize,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub health: crate::admin::Health,
}

pub struct PartitionActor {
    deps: PartitionDeps,
    partition: i32,
    consumer: Arc<EventConsumer>,
    queue: Option<PartitionQueue>,
    stop_reading: Option<oneshot::Sender<()>>,
    /// The generation of the lease this actor holds (see LeaseBook), if it holds one.
    lease_generation: Option<u64>,
    revoked: bool,
}

impl PartitionActor {
    pub fn new(
        deps: PartitionDeps,
        partition: i32,
        consumer: Arc<EventConsumer>,
        queue: PartitionQueue,
    ) -> Self {
        PartitionActor {
            deps,
            partition,
            consumer,
            queue: Some(queue),
            stop_reading: None,
            lease_generation: None,
            revoked: false,
        }
    }

    /// Takes the lease, or renews it. Validity is counted from before the request was sent.
    fn renew_lease(&mut self, ctx: &mut Context<Self>) {
        let requested_at = Instant::now();
        let request = self.deps.ledger.send(AcquireLease {
            topic: self.deps.topic.clone(),
            partition: self.partition,
            owner: self.deps.instance_id.clone(),
            lease: self.deps.lease,
        });
        ctx.spawn(request.into_actor(self).map(move |result, act, _| {
            if act.revoked {
                return;
            }
            let (topic, partition) = (act.deps.topic.as_str(), act.partition);
            match result {
                Ok(Ok(true)) => {
                    let acquired = act.lease_generation.is_none();
                    let generation = *act
                        .lease_generation
                        .get_or_insert_with(|| act.deps.leases.next_generation());
                    act.deps
                        .leases
                        .grant(partition, generation, requested_at + act.deps.lease);
                    if acquired {
                        tracing::info!(topic, partition, "partition lease acquired");
                        act.deps.deliveries.do_send(LeaseAcquired {
                            partition,
                            generation,
                        });
                    }
                }
                Ok(Ok(false)) => match act.lease_generation.take() {
                    Some(generation) => {
                        tracing::warn!(
                            topic,
                            partition,
                            "partition lease lost to another instance"
                        );
                        act.deps.leases.revoke(partition, generation);
                        act.deps.deliveries.do_send(PartitionRevoked {
                            partition,
                            generation,
                        });
                    }
                    None => tracing::info!(
                        topic,
                        partition,
                        "waiting for another instance's lease on this partition to end"
                    ),
                },
                // Keep what we have: it runs out by itself if the database stays away.
                Ok(Err(error)) => {
                    tracing::warn!(topic, partition, error.message = %error, "lease renewal failed")
                }
                Err(error) => {
                    tracing::warn!(topic, partition, error.message = %error, "lease renewal failed")
                }
            }
        }));
    }
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::info!(topic = %self.deps.topic, partition = self.partition, "partition actor started");
        let queue = self
            .queue
            .take()
            .expect("a partition queue is read by one actor");
        let (stop_tx, stop_rx) = oneshot::channel();
        self.stop_reading = Some(stop_tx);
        actix::spawn(read_batches(
            queue,
            ctx.address(),
            self.deps.max_batch_messages,
            stop_rx,
            (
                self.deps.topic.clone(),
                self.partition,
                self.deps.health.clone(),
            ),
        ));
        self.renew_lease(ctx);
        ctx.run_interval(self.deps.lease / 4, Self::renew_lease);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(topic = %self.deps.topic, partition = self.partition, "partition actor stopped");
    }
}

/// Reads the partition's queue: waits for one message, then takes whatever else is already
/// there (up to `max_batch`), and hands the batch over. The next batch is read only after the
/// previous one is in the ledger, so batches grow by themselves when the database is slow.
async fn read_batches(
    queue: PartitionQueue,
    actor: Addr<PartitionActor>,
    max_batch: usize,
    mut stop: oneshot::Receiver<()>,
    (topic, partition, health): (String, i32, crate::admin::Health),
) {
    loop {
        let first = tokio::select! {
            _ = &mut stop => return,
            received = queue.recv() => received,
        };
        let mut messages = Vec::new();
        match first {
            Ok(message) => messages.push(message.detach()),
            Err(error) => {
                tracing::warn!(error.message = %error, "error reading a partition queue");
                continue;
            }
        }
        while messages.len() < max_batch {
            match queue.recv().now_or_never() {
                Some(Ok(message)) => messages.push(message.detach()),
                Some(Err(error)) => {
                    tracing::warn!(error.message = %error, "error reading a partition queue");
                    break;
                }
                None => break,
            }
        }
        if actor.send(ProcessBatch { messages }).await.is_err() {
            // Revoked and stopped: fine. Gone without being told to stop (a panic in its
            // handler): nothing reads this partition any more. Say so loudly and fail the health
            // check so the pod is restarted; the batch was not claimed, so its offset was not
            // stored and the next owner reads it again.
            if matches!(stop.try_recv(), Err(oneshot::error::TryRecvError::Closed)) {
                tracing::error!(
                    topic = %topic,
                    partition,
                    "partition actor stopped unexpectedly; this partition is no longer consumed; /healthz now fails so the pod gets restarted"
                );
                health.mark_broken(format!(
                    "partition {partition} of {topic} is no longer consumed (its actor stopped unexpectedly)"
                ));
            }
            return;
        }
    }
}
