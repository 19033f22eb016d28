use std::collections::HashMap;
use std::time::Duration;

use actix::{Handler, Message, ResponseFuture};
use futures::future::join_all;

use super::DeliverySupervisor;
use crate::actors::delivery::{
    BrokerSnapshot, Deliver, Drain, LeaseGained, LeaseLost, LedgerHasMore, Replayed, Retire,
    Snapshot,
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

    fn handle(&mut self, msg: RouteDeliveries, ctx: &mut Self::Context) {
        let mut by_broker: HashMap<String, Vec<ClaimedDelivery>> = HashMap::new();
        for claimed in msg.claimed {
            by_broker
                .entry(claimed.delivery.broker_id.clone())
                .or_default()
                .push(claimed);
        }
        for (broker_id, claimed) in by_broker {
            let actor = self.actor_for(ctx, &broker_id);
            // Never wait for a busy broker. What does not fit is in the ledger already; the
            // notice (which ignores capacity) makes the actor load it when it has room.
            match actor.addr.try_send(Deliver { claimed }) {
                Ok(()) => actor.sent += 1,
                Err(_) => actor.tell(LedgerHasMore),
            }
        }
    }
}

/// A DeliveryActor needs its broker's row: it goes in the next read (one statement for every
/// broker that asked meanwhile), answered with `BrokerRowRead`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WantBrokerRow {
    pub broker_id: String,
}

impl Handler<WantBrokerRow> for DeliverySupervisor {
    type Result = ();

    fn handle(&mut self, msg: WantBrokerRow, ctx: &mut Self::Context) {
        self.rows_wanted.insert(msg.broker_id);
        self.read_rows(ctx);
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
        for actor in self.actors.values_mut() {
            actor.tell(LeaseGained {
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
        for actor in self.actors.values_mut() {
            actor.tell(LeaseLost {
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
        for (broker_id, actor) in &mut self.actors {
            if replayed.every_broker || replayed.brokers.contains(broker_id) {
                actor.tell(Replayed);
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
        let drains: Vec<_> = self
            .actors
            .values_mut()
            .map(|actor| {
                actor.sent += 1;
                actor.addr.send(Drain)
            })
            .collect();
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
        // Not counted: a snapshot changes nothing.
        let asks: Vec<_> = self
            .actors
            .values()
            .map(|a| a.addr.send(Snapshot))
            .collect();
        Box::pin(async move {
            let answers = tokio::time::timeout(Duration::from_secs(2), join_all(asks))
                .await
                .unwrap_or_default();
            answers.into_iter().filter_map(Result::ok).collect()
        })
    }
}

/// A DeliveryActor has been idle (see `Scheduler::is_idle`) for `delivery.idle_actor_ms`, having
/// received `received` messages. It is retired only if that is every message sent to it: then
/// nothing is on its way to it, its entry (the only strong address) is dropped and it stops. A
/// later delivery for the broker starts a new actor, which reads its work from the ledger.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ActorIdle {
    pub broker_id: String,
    pub actor_id: u64,
    pub received: u64,
    pub idle_for: Duration,
}

impl Handler<ActorIdle> for DeliverySupervisor {
    type Result = ();

    fn handle(&mut self, msg: ActorIdle, _: &mut Self::Context) {
        let Some(actor) = self.actors.get(&msg.broker_id) else {
            return;
        };
        if actor.actor_id != msg.actor_id || actor.sent != msg.received {
            // A message is on its way: the actor handles it and reports again if still idle.
            return;
        }
        let Some(actor) = self.actors.remove(&msg.broker_id) else {
            return;
        };
        actor.addr.do_send(Retire);
        self.forget_series(&msg.broker_id);
        tracing::info!(broker_id = %msg.broker_id, idle_ms = msg.idle_for.as_millis() as u64,
            "delivery actor retired (idle)");
    }
}
