//! IdempotencyActor: the one owner of the Postgres pool. Every ledger read and write in the
//! running service goes through its messages. Handlers run concurrently (up to the pool size);
//! the ledger's unique constraints, not this actor, are what make claims idempotent.

mod handlers;

use actix::{Actor, Context};

pub use handlers::*;

use crate::ledger::Ledger;

pub struct IdempotencyActor {
    ledger: Ledger,
}

impl IdempotencyActor {
    pub fn new(ledger: Ledger) -> Self {
        IdempotencyActor { ledger }
    }
}

impl Actor for IdempotencyActor {
    type Context = Context<Self>;
}
