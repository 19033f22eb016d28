use std::collections::HashMap;
use std::time::Duration;

use actix::{Handler, Message, ResponseFuture};
use futures::future::join_all;

use super::DeliverySupervisor;
use crate::actors::delivery::{
    BrokerSnapshot, Deliver, Drain, LeaseGained, LeaseLost, LedgerHasMore, Replayed, Snapshot,
};
use crate::ledger::{ClaimedDelivery, ReplayedBrokers};

/// Deliveries just created by a PartitionActor's claim.
#[derive(Message)]
#[rtype(result = "()")]
pub struct RouteDeliveries {
    pub claimed: Vec<ClaimedDelivery>,
}

impl Handler<RouteDeliveries> for DeliverySupervisor {
    type Result = ();

    fn handle(&mut self, msg: RouteDeliveries, _: &mut Self::Context) {
        let mut by_broker: HashMap<String, Vec<ClaimedDelivery>> = HashMap::new();
        for claimed in msg.claimed {
            by_broker
                .entry(claimed.delivery.broker_id.clone())
                .or_default()
                .push(claimed);
        }
        for (broker_id, claimed) in by_broker {
            let actor = self.actor_for(&broker_id);
            // Never wait for a busy broker. What does not fit is in the ledger already; the
            // notice (which ignores capacity) makes the actor load it when it has room.
            if actor.try_send(Deliver { claimed }).is_err() {
                actor.do_send(LedgerHasMore);
            }
        }
    }
}

/// This instance now holds a partition's lease (as `generation`): its pending deliveries are
/// ours to send.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaseAcquired {
    pub partition: i32,
    pub generation: u64,
}

impl Handler<LeaseAcquired> for DeliverySupervisor {
    type Result = ();

    fn handle(&mut self, msg: LeaseAcquired, ctx: &mut Self::Context) {
        for actor in self.actors.values() {
            actor.do_send(LeaseGained {
                partition: msg.partition,
                generation: msg.generation,
            });
        }
        // A partition just taken over may hold any amount of pending work, due or not yet
        // overdue: wake every broker that has some, without the sweep's grace period.
        self.nudge_brokers_with_work(ctx, Duration::ZERO);
    }
}

/// A partition's lease `generation` ended (revoked, or lost to another instance).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PartitionRevoked {
    pub partition: i32,
    pub generation: u64,
}

impl Handler<PartitionRevoked> for DeliverySupervisor {
    type Result = ();

    fn handle(&mut self, msg: PartitionRevoked, _: &mut Self::Context) {
        for actor in self.actors.values() {
            actor.do_send(LeaseLost {
                partition: msg.partition,
                generation: msg.generation,
            });
        }
    }
}

/// Dead letters were put back in the queue: the actors of their brokers read their ledger again,
/// so replayed deliveries go before later ones of their loads. A broker without an actor here
/// reads its ledger when its actor starts.
#[derive(Message)]
#[rtype(result = "()")]
pub struct DeliveriesReplayed(pub ReplayedBrokers);

impl Handler<DeliveriesReplayed> for DeliverySupervisor {
    type Result = ();

    fn handle(&mut self, msg: DeliveriesReplayed, _: &mut Self::Context) {
        let DeliveriesReplayed(replayed) = msg;
        for (broker_id, actor) in &self.actors {
            if replayed.every_broker || replayed.brokers.contains(broker_id) {
                actor.do_send(Replayed);
            }
        }
    }
}

/// Shutdown: every DeliveryActor stops starting requests; wait up to `timeout` for the ones in
/// flight. Whatever is unfinished then stays pending in the ledger.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct DrainDeliveries {
    pub timeout: Duration,
}

impl Handler<DrainDeliveries> for DeliverySupervisor {
    type Result = ResponseFuture<bool>;

    fn handle(&mut self, msg: DrainDeliveries, _: &mut Self::Context) -> Self::Result {
        let drains: Vec<_> = self.actors.values().map(|a| a.send(Drain)).collect();
        Box::pin(async move {
            tokio::time::timeout(msg.timeout, join_all(drains))
                .await
                .is_ok()
        })
    }
}

/// The live state of every broker this instance has an actor for (admin API).
#[derive(Message)]
#[rtype(result = "Vec<BrokerSnapshot>")]
pub struct BrokerSnapshots;

impl Handler<BrokerSnapshots> for DeliverySupervisor {
    type Result = ResponseFuture<Vec<BrokerSnapshot>>;

    fn handle(&mut self, _: BrokerSnapshots, _: &mut Self::Context) -> Self::Result {
        let asks: Vec<_> = self.actors.values().map(|a| a.send(Snapshot)).collect();
        Box::pin(async move {
            let answers = tokio::time::timeout(Duration::from_secs(2), join_all(asks))
                .await
                .unwrap_or_default();
            answers.into_iter().filter_map(Result::ok).collect()
        })
    }
}
