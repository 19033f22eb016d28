use actix::{Handler, Message, ResponseFuture};

use super::{BrokerSnapshot, DeliveryActor};
use crate::delivery_queue::Inserted;
use crate::ledger::ClaimedDelivery;

/// New deliveries for this broker, fresh from a claim (the fast path).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub claimed: Vec<ClaimedDelivery>,
}

impl Handler<Deliver> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        self.guarded(ctx, "deliver", |act, ctx| act.accept(msg.claimed, ctx));
    }
}

impl DeliveryActor {
    /// The fast path. Every pending delivery of a load up to `covered_through` is held here or
    /// was finished here (lanes fill in offset order, from claims and from ledger loads), so a
    /// new delivery may join only if its newest pending predecessor is covered. Otherwise it
    /// stays in the ledger and a load picks it up behind its predecessors; other loads are not
    /// affected.
    fn accept(&mut self, claimed: Vec<ClaimedDelivery>, ctx: &mut <Self as actix::Actor>::Context) {
        for claimed in claimed {
            let delivery = claimed.delivery;
            let predecessor_held = match claimed.pending_predecessor_offset {
                None => true,
                Some(offset) => self
                    .lanes
                    .covered_through(&delivery.load_id)
                    .is_some_and(|(_, covered)| covered >= offset),
            };
            if !predecessor_held {
                self.want_ledger_load();
                continue;
            }
            let (id, order) = (delivery.delivery_id, (delivery.partition, delivery.offset));
            let load_id = delivery.load_id.clone();
            if self.lanes.insert(id, &load_id, order, None, delivery) == Inserted::Full {
                self.want_ledger_load();
            }
        }
        self.dispatch(ctx);
    }
}

/// The ledger may hold pending deliveries that are not in memory (the mailbox was full, a lease
/// was acquired, or the sweep found overdue work).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LedgerHasMore;

impl Handler<LedgerHasMore> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, _: LedgerHasMore, ctx: &mut Self::Context) {
        self.want_ledger_load();
        self.guarded(ctx, "dispatch", Self::dispatch);
    }
}

/// A partition was revoked: forget its queued deliveries (in-flight ones finish).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ForgetPartition {
    pub partition: i32,
}

impl Handler<ForgetPartition> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: ForgetPartition, _: &mut Self::Context) {
        self.lanes.forget_partition(msg.partition);
    }
}

/// Shutdown: start nothing new; answer once in-flight attempts are finished and saved.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl Handler<Drain> for DeliveryActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, _: &mut Self::Context) -> Self::Result {
        self.is_draining = true;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.draining.push(tx);
        self.notify_drained_if_idle();
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

#[derive(Message)]
#[rtype(result = "BrokerSnapshot")]
pub struct Snapshot;

impl Handler<Snapshot> for DeliveryActor {
    type Result = actix::MessageResult<Snapshot>;

    fn handle(&mut self, _: Snapshot, _: &mut Self::Context) -> Self::Result {
        actix::MessageResult(self.snapshot())
    }
}
