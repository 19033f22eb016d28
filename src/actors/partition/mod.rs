//! PartitionActor: one per assigned partition. It reads the partition's own queue in batches,
//! turns each batch into ledger rows in one round trip, and only then stores the batch's last
//! offset (docs/design.md 2). New deliveries go to the DeliverySupervisor; HTTP never gates offsets.
//! It also holds the partition's lease, which decides who may send its deliveries (docs/design.md 3).

mod handlers;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, AsyncContext, Context};
use futures::FutureExt;
use tokio::sync::oneshot;

pub use handlers::*;

use crate::actors::delivery_supervisor::{DeliverySupervisor, LeaseAcquired};
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
    pub event_limits: crate::event::EventLimits,
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
    /// Set by Revoke; read by the lease keeper, which runs outside this actor's context.
    revoked: Arc<AtomicBool>,
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
            revoked: Arc::new(AtomicBool::new(false)),
        }
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
        // Not ctx.run_interval: the atomic ProcessBatch handler blocks this actor's context
        // (timers included) while a claim is in flight, and a claim may wait on the database
        // for a long time; the lease must be renewed meanwhile.
        actix::spawn(keep_lease(
            self.deps.clone(),
            self.partition,
            self.revoked.clone(),
        ));
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

/// Takes the partition's lease, then renews it every quarter lease, until the partition is
/// revoked or its actor is gone. Validity is counted from before each request was sent.
async fn keep_lease(deps: PartitionDeps, partition: i32, revoked: Arc<AtomicBool>) {
    let topic = deps.topic.as_str();
    let is_over = |revoked: &Arc<AtomicBool>| {
        // Only this task holds the flag once the actor is dropped.
        revoked.load(Ordering::SeqCst) || Arc::strong_count(revoked) == 1
    };
    let mut held = false;
    let mut ticks = tokio::time::interval(deps.lease / 4);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if is_over(&revoked) {
            return;
        }
        let requested_at = Instant::now();
        let result = deps
            .ledger
            .send(AcquireLease {
                topic: deps.topic.clone(),
                partition,
                owner: deps.instance_id.clone(),
                lease: deps.lease,
            })
            .await;
        if is_over(&revoked) {
            return;
        }
        match result {
            Ok(Ok(true)) => {
                deps.leases.grant(partition, requested_at + deps.lease);
                // Revoke sets the flag before it clears the book: checking after granting
                // means a grant never outlives a revocation.
                if revoked.load(Ordering::SeqCst) {
                    deps.leases.revoke(partition);
                    return;
                }
                if !held {
                    held = true;
                    tracing::info!(topic, partition, "partition lease acquired");
                    deps.deliveries.do_send(LeaseAcquired { partition });
                }
            }
            Ok(Ok(false)) => {
                if held {
                    tracing::warn!(topic, partition, "partition lease lost to another instance");
                } else {
                    tracing::info!(
                        topic,
                        partition,
                        "waiting for another instance's lease on this partition to end"
                    );
                }
                held = false;
                deps.leases.revoke(partition);
            }
            // Keep what we have: it runs out by itself if the database stays away.
            Ok(Err(error)) => {
                tracing::warn!(topic, partition, error.message = %error, "lease renewal failed")
            }
            Err(error) => {
                tracing::warn!(topic, partition, error.message = %error, "lease renewal failed")
            }
        }
    }
}
