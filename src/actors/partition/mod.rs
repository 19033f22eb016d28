//! PartitionActor: one per assigned partition (per [`Tenure`]). Its reader task reads the
//! partition's own queue in batches; the actor turns each batch into ledger rows in one round trip,
//! and only then stores the batch's last offset (docs/design.md 2). New deliveries go to the
//! DeliverySupervisor; HTTP never gates offsets. It also renews the partition's lease, which
//! decides who may send its deliveries (docs/design.md 3).

mod handlers;
mod reader;
mod tenure;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, Addr, Context};
use rdkafka::consumer::Consumer;

pub use handlers::*;
pub use reader::{read_partition, PartitionReader};
pub use tenure::{StoreDecision, Tenure};

use crate::actors::delivery_supervisor::{DeliverySupervisor, LeaseAcquired, PartitionRevoked};
use crate::actors::ledger_gateway::{AcquireLease, LedgerGateway};
use crate::kafka::EventConsumer;
use crate::lease::LeaseBook;

/// What every PartitionActor needs, cloned per partition.
#[derive(Clone)]
pub struct PartitionDeps {
    pub topic: String,
    pub ledger: Addr<LedgerGateway>,
    pub deliveries: Addr<DeliverySupervisor>,
    pub leases: LeaseBook,
    pub instance_id: String,
    pub lease: Duration,
    pub request_timeout: Duration,
    pub event_limits: crate::core::event::EventLimits,
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
    /// Whether the lease keeper ever asked for the lease: only then does Revoke release it (the
    /// row may belong to an earlier tenure of this instance that is still claiming).
    lease_requested: Arc<AtomicBool>,
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
            lease_requested: Arc::new(AtomicBool::new(false)),
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
}

impl Actor for PartitionActor {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::info!(topic = %self.deps.topic, partition = self.partition, "partition actor started");
        // A task of its own, not ctx.run_interval: the atomic ProcessBatch handler blocks this
        // actor's context (timers included) while a claim is in flight, and a claim may wait on
        // the database for a long time; the lease must be renewed meanwhile.
        actix::spawn(keep_lease(
            self.deps.clone(),
            self.tenure.clone(),
            std::mem::take(&mut self.predecessors),
            self.lease_requested.clone(),
        ));
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

/// Once the earlier tenures' actors have stopped, takes the partition's lease and renews it
/// every quarter lease until the tenure is revoked or its actor is gone. Validity is counted from
/// before each request was sent.
async fn keep_lease(
    deps: PartitionDeps,
    tenure: Arc<Tenure>,
    predecessors: Vec<Arc<Tenure>>,
    lease_requested: Arc<AtomicBool>,
) {
    for previous in &predecessors {
        previous.actor_stopped().await;
    }
    let (topic, partition) = (deps.topic.as_str(), tenure.partition);
    let is_over = || tenure.is_revoked() || tenure.is_actor_stopped();
    // The generation of the lease held now; a new one for every acquisition, so that a late
    // revoke of an older one cannot take this one away (LeaseBook).
    let mut generation: Option<u64> = None;
    let mut ticks = tokio::time::interval(deps.lease / 4);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        if is_over() {
            return;
        }
        // Set before asking: a Revoke that finds it unset knows no lease row of this tenure can
        // exist. (A Revoke between the check above and this store leaves a granted row to expire
        // by itself after postgres.lease_ms: a delay for the next owner, never an overlap.)
        lease_requested.store(true, Ordering::SeqCst);
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
        // Revoked meanwhile: the supervisor withdrew the grant, the Revoke handler gives the
        // lease row up.
        if is_over() {
            return;
        }
        match result {
            Ok(Ok(true)) => {
                let held = *generation.get_or_insert_with(|| deps.leases.next_generation());
                deps.leases
                    .grant(partition, held, requested_at + deps.lease);
                let announced = tenure.hold_lease(held, || {
                    tracing::info!(topic, partition, "partition lease acquired");
                    deps.deliveries.do_send(LeaseAcquired {
                        partition,
                        generation: held,
                    });
                });
                // Revoked between the check above and the grant: withdraw it, unannounced.
                if !announced {
                    deps.leases.revoke(partition, held);
                    return;
                }
            }
            Ok(Ok(false)) => {
                generation = None;
                match tenure.lose_lease() {
                    Some(lost) => {
                        tracing::warn!(
                            topic,
                            partition,
                            "partition lease lost to another instance"
                        );
                        deps.leases.revoke(partition, lost);
                        deps.deliveries.do_send(PartitionRevoked {
                            partition,
                            generation: lost,
                        });
                    }
                    None => tracing::info!(
                        topic,
                        partition,
                        "waiting for another instance's lease on this partition to end"
                    ),
                }
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
