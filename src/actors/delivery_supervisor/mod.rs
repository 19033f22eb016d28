//! DeliverySupervisor: starts a DeliveryActor per broker on demand, routes new deliveries to
//! them without ever blocking (a full mailbox only means "load it from the ledger later"), and
//! sweeps the ledger for due work that is in no mailbox: retries coming due, overflow, and the
//! pending deliveries of partitions this instance has just taken over.

mod handlers;

use std::collections::HashMap;

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};

pub use handlers::*;

use crate::actors::delivery::{DeliveryActor, DeliveryDeps, LedgerHasMore};
use crate::actors::ledger_gateway::FindBrokersWithOverdueWork;

/// The sweep only nudges brokers with work due for longer than this. What a DeliveryActor holds
/// goes out within moments of coming due, so nudging on merely-due work would make every busy
/// broker reload from the ledger every tick (and route around its fast path meanwhile).
const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub struct DeliverySupervisor {
    deps: DeliveryDeps,
    actors: HashMap<String, Addr<DeliveryActor>>,
    sweeping: bool,
}

impl DeliverySupervisor {
    pub fn new(deps: DeliveryDeps) -> Self {
        DeliverySupervisor {
            deps,
            actors: HashMap::new(),
            sweeping: false,
        }
    }

    fn actor_for(&mut self, broker_id: &str) -> &Addr<DeliveryActor> {
        let stale = self
            .actors
            .get(broker_id)
            .is_some_and(|addr| !addr.connected());
        if stale {
            self.actors.remove(broker_id);
        }
        self.actors.entry(broker_id.to_owned()).or_insert_with(|| {
            let (broker_id, deps) = (broker_id.to_owned(), self.deps.clone());
            actix::Supervisor::start(move |_| DeliveryActor::new(broker_id, deps))
        })
    }

    /// The periodic safety net: nudge brokers with overdue work.
    fn sweep(&mut self, ctx: &mut Context<Self>) {
        self.nudge_brokers_with_work(ctx, SWEEP_GRACE);
    }

    /// Asks the ledger which brokers have pending work due for longer than `overdue_for` in our
    /// partitions, and tells their actors to load it.
    fn nudge_brokers_with_work(
        &mut self,
        ctx: &mut Context<Self>,
        overdue_for: std::time::Duration,
    ) {
        let partitions = self.deps.leases.held(std::time::Instant::now());
        if self.sweeping || partitions.is_empty() {
            return;
        }
        self.sweeping = true;
        let find = self.deps.ledger.send(FindBrokersWithOverdueWork {
            partitions,
            overdue_for,
        });
        ctx.spawn(find.into_actor(self).map(|result, act, _| {
            act.sweeping = false;
            match result {
                Ok(Ok(brokers)) => {
                    for broker_id in brokers {
                        act.actor_for(&broker_id).do_send(LedgerHasMore);
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(error.message = %error, "ledger sweep failed; retrying next tick")
                }
                Err(_) => {}
            }
        }));
    }
}

impl Actor for DeliverySupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.run_interval(self.deps.settings.ledger_poll_interval(), Self::sweep);
    }
}
