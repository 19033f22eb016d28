//! IdempotencyActor: the one owner of the Postgres pool. Every ledger read and write in the
//! running service goes through its messages. Handlers run concurrently (up to the pool size);
//! the ledger's unique constraints, not this actor, are what make claims idempotent.

mod handlers;

use actix::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};
use tokio::sync::oneshot;

pub use handlers::*;

use crate::ledger::{AttemptRecord, Ledger};

pub struct IdempotencyActor {
    ledger: Ledger,
    /// Attempt outcomes from every DeliveryActor wait here while a write is in flight, and all
    /// of them go out in the next single statement (group commit): a few large writes instead
    /// of one per broker at a time.
    queued_outcomes: Vec<QueuedOutcomes>,
    writing_outcomes: bool,
}

struct QueuedOutcomes {
    records: Vec<AttemptRecord>,
    saved: oneshot::Sender<Result<(), String>>,
}

impl IdempotencyActor {
    pub fn new(ledger: Ledger) -> Self {
        IdempotencyActor {
            ledger,
            queued_outcomes: Vec::new(),
            writing_outcomes: false,
        }
    }

    /// Writes everything queued in one statement, then the next batch, until none is left.
    fn write_outcomes(&mut self, ctx: &mut Context<Self>) {
        if self.writing_outcomes || self.queued_outcomes.is_empty() {
            return;
        }
        self.writing_outcomes = true;
        let batch = std::mem::take(&mut self.queued_outcomes);
        let records: Vec<AttemptRecord> = batch
            .iter()
            .flat_map(|queued| queued.records.iter().cloned())
            .collect();
        let ledger = self.ledger.clone();
        let write = async move { ledger.record_attempts(&records).await };
        ctx.spawn(write.into_actor(self).map(|result, act, ctx| {
            act.writing_outcomes = false;
            let result = result.map_err(|error| error.to_string());
            for queued in batch {
                let _ = queued.saved.send(result.clone());
            }
            act.write_outcomes(ctx);
        }));
    }
}

impl Actor for IdempotencyActor {
    type Context = Context<Self>;
}
