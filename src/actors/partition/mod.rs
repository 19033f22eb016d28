//! PartitionActor: one per assigned partition (per [`Tenure`]). Its reader task reads the
//! partition's own queue in batches; the actor turns each batch into ledger rows in one round trip,
//! and only then stores the batch's last offset (docs/design.md 2). New deliveries go to the
//! DeliverySupervisor; HTTP never gates offsets. It also renews the partition's lease, which
//! decides who may send its deliveries (docs/design.md 3).

mod handlers;
mod reader;
mod tenure;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};
use rdkafka::consumer::Consumer;

pub use handlers::*;
pub use reader::{read_partition, PartitionReader};
pub use tenure::{StoreDecision, Tenure};

use crate::actors::delivery_supervisor::{DeliverySupervisor, LeaseAcquired};
use crate::actors::idempotency::{AcquireLease, IdempotencyActor};
use crate::kafka::EventConsumer;
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
    tenure: Arc<Tenure>,
    consumer: Arc<EventConsumer>,
    /// Earlier tenures of this partition whose actors may still be claiming: the lease is taken
    /// only after they stopped (they release it on the way out).
    predecessors: Vec<Arc<Tenure>>,
    /// Whether this actor ever asked for the lease: only then does it release it on revoke (the
    /// row may belong to an earlier tenure of this instance that is still claiming).
    lease_requested: bool,
    lease_held: bool,
}

impl PartitionActor {
    pub fn new(
        deps: PartitionDeps,
        tenure: Arc<Tenure>,
        consumer: Arc<EventConsumer>,
        predecessors: Vec<Arc<Tenure>>,
    ) -> Self {
        PartitionActor {
            deps,
            partition: tenure.partition,
            tenure,
            consumer,
            predecessors,
            lease_requested: false,
            lease_held: false,
        }
    }

    /// Stores the offset of a batch whose rows are committed, unless that would move the offset
    /// backwards or the tenure has ended (then the next reader re-reads the batch: harmless,
    /// claims are idempotent).
    fn store_offset(&self, last_offset: i64) {
        let (topic, partition) = (self.deps.topic.as_str(), self.partition);
        match self.tenure.settle(last_offset) {
            StoreDecision::Store => {
                if let Err(error) = self.consumer.store_offset(topic, partition, last_offset) {
                    tracing::warn!(topic, partition, offset = last_offset, error.message = %error,
                        "could not store offset (partition probably revoked); the next owner re-reads from the last commit");
                }
            }
            StoreDecision::Behind { stored } => tracing::warn!(
                topic,
                partition,
                offset = last_offset,
                stored_offset = stored,
                "not storing an offset behind the one already stored"
            ),
            StoreDecision::Ended => tracing::info!(
                topic,
                partition,
                offset = last_offset,
                "batch finished after its partition was revoked; its rows are in the ledger, its offset is left to the next reader"
            ),
        }
    }

    /// Takes the lease, or renews it. Validity is counted from before the request was sent.
    fn renew_lease(&mut self, ctx: &mut Context<Self>) {
        if self.tenure.is_revoked() {
            return;
        }
        let requested_at = Instant::now();
        self.lease_requested = true;
        let request = self.deps.ledger.send(AcquireLease {
            topic: self.deps.topic.clone(),
            partition: self.partition,
            owner: self.deps.instance_id.clone(),
            lease: self.deps.lease,
        });
        ctx.spawn(request.into_actor(self).map(move |result, act, _| {
            // Revoked meanwhile: the Revoke handler gives the lease up.
            if act.tenure.is_revoked() {
                return;
            }
            let (topic, partition) = (act.deps.topic.as_str(), act.partition);
            match result {
                Ok(Ok(true)) => {
                    act.deps
                        .leases
                        .grant(partition, requested_at + act.deps.lease);
                    if !act.lease_held {
                        act.lease_held = true;
                        tracing::info!(topic, partition, "partition lease acquired");
                        act.deps.deliveries.do_send(LeaseAcquired { partition });
                    }
                }
                Ok(Ok(false)) => {
                    if act.lease_held {
                        tracing::warn!(
                            topic,
                            partition,
                            "partition lease lost to another instance"
                        );
                    } else {
                        tracing::info!(
                            topic,
                            partition,
                            "waiting for another instance's lease on this partition to end"
                        );
                    }
                    act.lease_held = false;
                    act.deps.leases.revoke(partition);
                }
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
        let predecessors = std::mem::take(&mut self.predecessors);
        let predecessors_done = async move {
            for previous in &predecessors {
                previous.actor_stopped().await;
            }
        };
        ctx.spawn(predecessors_done.into_actor(self).map(|(), act, ctx| {
            act.renew_lease(ctx);
            ctx.run_interval(act.deps.lease / 4, Self::renew_lease);
        }));
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        tracing::info!(topic = %self.deps.topic, partition = self.partition, "partition actor stopped");
    }
}

/// On drop rather than in `stopped`, so that successors are released even if the actor's
/// context goes away without stopping cleanly.
impl Drop for PartitionActor {
    fn drop(&mut self) {
        self.tenure.mark_actor_stopped();
    }
}
