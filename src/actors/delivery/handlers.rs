use actix::{Handler, Message, ResponseFuture};

use super::{millis, BrokerSnapshot, DeliveryActor};
use crate::core::scheduler::{Claimed, IoToken};
use crate::ledger::{BrokerRow, ClaimedDelivery};

/// New deliveries for this broker, fresh from a claim (the fast path).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub claimed: Vec<ClaimedDelivery>,
}

impl Handler<Deliver> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, ctx: &mut Self::Context) {
        self.received += 1;
        // Memory for all brokers is bounded in bytes: what does not fit stays in the ledger,
        // read once room frees up. In claim order, so every load keeps a prefix.
        let claimed_at: Vec<_> = msg
            .claimed
            .iter()
            .map(|c| (c.pending_predecessor_offset, millis(c.claimed_at)))
            .collect();
        let (held, left) = self.admit(msg.claimed.into_iter().map(|c| c.delivery).collect());
        let claimed: Vec<_> = held
            .into_iter()
            .zip(claimed_at)
            .map(|(delivery, (pending_predecessor, claimed_at))| Claimed {
                delivery,
                pending_predecessor,
                claimed_at,
            })
            .collect();
        self.guarded(ctx, "deliver", |act, ctx| {
            act.step(ctx, |s, now| {
                s.claimed(now, claimed);
                if left {
                    s.ledger_has_more(now);
                }
            })
        });
    }
}

/// The ledger may hold pending deliveries that are not in memory (the mailbox was full, or the
/// sweep found overdue work).
#[derive(Message)]
#[rtype(result = "()")]
pub struct LedgerHasMore;

impl Handler<LedgerHasMore> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, _: LedgerHasMore, ctx: &mut Self::Context) {
        self.received += 1;
        self.guarded(ctx, "ledger_has_more", |act, ctx| {
            act.step(ctx, |s, now| s.ledger_has_more(now))
        });
    }
}

/// Dead letters were put back in the queue (admin API): read the ledger again so a replayed
/// delivery goes before later ones of its load.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Replayed;

impl Handler<Replayed> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, _: Replayed, ctx: &mut Self::Context) {
        self.received += 1;
        self.guarded(ctx, "replayed", |act, ctx| {
            act.step(ctx, |s, now| s.replayed(now))
        });
    }
}

/// This instance took a partition's lease (as `generation`): its pending deliveries are ours.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaseGained {
    pub partition: i32,
    pub generation: u64,
}

impl Handler<LeaseGained> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: LeaseGained, ctx: &mut Self::Context) {
        self.received += 1;
        self.guarded(ctx, "lease_gained", |act, ctx| {
            act.step(ctx, |s, now| {
                s.lease_gained(now, msg.partition, msg.generation)
            })
        });
    }
}

/// A partition's lease `generation` ended: forget its queued deliveries (in-flight ones
/// finish). A late message about an older generation changes nothing.
#[derive(Message)]
#[rtype(result = "()")]
pub struct LeaseLost {
    pub partition: i32,
    pub generation: u64,
}

impl Handler<LeaseLost> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: LeaseLost, ctx: &mut Self::Context) {
        self.received += 1;
        self.guarded(ctx, "lease_lost", |act, ctx| {
            act.step(ctx, |s, now| {
                s.lease_lost(now, msg.partition, msg.generation)
            })
        });
    }
}

/// The answer to a `WriteOutcomes`, sent by a task outside the actor's context so that it
/// arrives even across a restart.
#[derive(Message)]
#[rtype(result = "()")]
pub struct OutcomesWritten {
    pub token: IoToken,
    pub saved: bool,
}

impl Handler<OutcomesWritten> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: OutcomesWritten, ctx: &mut Self::Context) {
        self.guarded(ctx, "outcomes_written", |act, ctx| {
            act.step(ctx, |s, now| {
                if msg.saved {
                    s.outcomes_saved(now, msg.token)
                } else {
                    s.outcomes_save_failed(now, msg.token)
                }
            })
        });
    }
}

/// The broker's row, read by the supervisor in a read started at `read_at` (asked for with
/// `WantBrokerRow`, or the periodic refresh of every running actor), or why it failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct BrokerRowRead {
    pub read_at: std::time::Instant,
    pub row: Result<Option<BrokerRow>, String>,
}

impl Handler<BrokerRowRead> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, msg: BrokerRowRead, ctx: &mut Self::Context) {
        self.received += 1;
        self.guarded(ctx, "broker_row", |act, ctx| act.broker_row_read(ctx, msg));
    }
}

/// Shutdown: start nothing new; answer once in-flight attempts are finished and saved.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain;

impl Handler<Drain> for DeliveryActor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) -> Self::Result {
        self.received += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.draining.push(tx);
        self.guarded(ctx, "drain", |act, ctx| {
            act.step(ctx, |s, now| s.drain(now))
        });
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// The supervisor forgot this actor (it was idle and nothing was on its way to it): stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for DeliveryActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        self.retire(ctx);
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::{Duration, Instant};

    #[test]
    fn the_shell_clock_is_monotonic_from_its_origin() {
        let earlier = Instant::now();
        let later = earlier + Duration::from_millis(1_500);
        assert!(millis(later).since(millis(earlier)) >= Duration::from_millis(1_499));
    }
}
