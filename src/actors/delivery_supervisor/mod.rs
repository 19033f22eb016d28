//! DeliverySupervisor: starts a DeliveryActor per broker on demand, routes new deliveries to
//! them without ever blocking (a full mailbox only means "load it from the ledger later"), and
//! sweeps the ledger for due work that is in no mailbox: retries coming due, overflow, and the
//! pending deliveries of partitions this instance has just taken over. It also reads the broker
//! rows of all its actors, in one statement per 1,000 brokers: every `BROKER_ROW_PUSH` for every
//! running actor, and on demand (`WantBrokerRow`) batched, one read at a time. An actor idle for
//! `delivery.idle_actor_ms` retires (`ActorIdle`) and a new one starts when work comes.

mod handlers;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, Addr, AsyncContext, Context, WrapFuture};

pub use handlers::*;

use crate::actors::delivery::{BrokerRowRead, DeliveryActor, DeliveryDeps, LedgerHasMore};
use crate::actors::ledger_gateway::{FindBrokersWithOverdueWork, ForgetBroker, LoadBrokers};
use crate::ledger::BrokerRow;

/// How often every running actor is sent its broker's row (URL, secret and `enabled` changes
/// reach the actors within this).
pub const BROKER_ROW_PUSH: Duration = Duration::from_secs(5);
/// Broker ids per statement when reading rows (a primary-key probe each).
const BROKER_ROWS_PER_READ: usize = 1_000;

/// The sweep only nudges brokers with work due for longer than this. What a DeliveryActor holds
/// goes out within moments of coming due, so nudging on merely-due work would make every busy
/// broker reload from the ledger every tick (and route around its fast path meanwhile).
const SWEEP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A running DeliveryActor and the count of state-changing messages sent to it: it retires only
/// when it has received them all (see `ActorIdle`).
struct Running {
    addr: Addr<DeliveryActor>,
    /// Which actor this is (a notice from an earlier actor of the broker is not about it).
    actor_id: u64,
    sent: u64,
}

impl Running {
    fn tell<M>(&mut self, msg: M)
    where
        M: actix::Message<Result = ()> + Send + 'static,
        DeliveryActor: actix::Handler<M>,
    {
        self.sent += 1;
        self.addr.do_send(msg);
    }
}

pub struct DeliverySupervisor {
    deps: DeliveryDeps,
    actors: HashMap<String, Running>,
    sweeping: bool,
    /// Brokers whose row goes in the next read.
    rows_wanted: BTreeSet<String>,
    reading_rows: bool,
    /// The id of the last actor started.
    last_actor_id: u64,
}

impl DeliverySupervisor {
    pub fn new(deps: DeliveryDeps) -> Self {
        DeliverySupervisor {
            deps,
            actors: HashMap::new(),
            sweeping: false,
            rows_wanted: BTreeSet::new(),
            reading_rows: false,
            last_actor_id: 0,
        }
    }

    fn actor_for(&mut self, ctx: &mut Context<Self>, broker_id: &str) -> &mut Running {
        let stale = self
            .actors
            .get(broker_id)
            .is_some_and(|running| !running.addr.connected());
        if stale {
            self.actors.remove(broker_id);
        }
        let me = ctx.address();
        let next_id = &mut self.last_actor_id;
        self.actors.entry(broker_id.to_owned()).or_insert_with(|| {
            *next_id += 1;
            let actor_id = *next_id;
            let (broker_id, deps) = (broker_id.to_owned(), self.deps.clone());
            Running {
                addr: actix::Supervisor::start(move |_| {
                    DeliveryActor::new(broker_id, deps, me, actor_id)
                }),
                actor_id,
                sent: 0,
            }
        })
    }

    /// A retired broker's per-broker series go with its actor, so brokers that come and go over
    /// weeks do not leave series behind. The next actor for it sets them again.
    fn forget_series(&self, broker_id: &str) {
        let metrics = &self.deps.metrics;
        for gauge in [
            &metrics.mailbox_depth,
            &metrics.in_flight,
            &metrics.in_flight_limit,
            &metrics.circuit_state,
        ] {
            // Absent series are fine (never set).
            let _ = gauge.remove_label_values(&[broker_id]);
        }
        self.deps.ledger.do_send(ForgetBroker {
            broker_id: broker_id.to_owned(),
        });
    }

    /// Every running actor's row goes in the next read.
    fn push_rows(&mut self, ctx: &mut Context<Self>) {
        self.rows_wanted.extend(self.actors.keys().cloned());
        self.read_rows(ctx);
    }

    /// Reads the wanted rows (one read at a time: ids wanted meanwhile wait for the next) and
    /// sends each actor its row, or the failure (its scheduler asks again in a second).
    fn read_rows(&mut self, ctx: &mut Context<Self>) {
        if self.reading_rows || self.rows_wanted.is_empty() {
            return;
        }
        self.reading_rows = true;
        let ids: Vec<String> = std::mem::take(&mut self.rows_wanted).into_iter().collect();
        let ledger = self.deps.ledger.clone();
        let read = async move {
            let mut answers = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(BROKER_ROWS_PER_READ) {
                let read_at = Instant::now();
                let broker_ids = chunk.to_vec();
                let result = match ledger.send(LoadBrokers { broker_ids }).await {
                    Ok(Ok(rows)) => Ok(rows),
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(error) => Err(error.to_string()),
                };
                match result {
                    Ok(rows) => {
                        let mut rows: HashMap<String, BrokerRow> = rows
                            .into_iter()
                            .map(|row| (row.broker_id.clone(), row))
                            .collect();
                        answers.extend(chunk.iter().map(|id| {
                            let row = Ok(rows.remove(id));
                            (id.clone(), BrokerRowRead { read_at, row })
                        }));
                    }
                    Err(error) => {
                        tracing::warn!(error.message = %error, brokers = chunk.len(),
                            "could not read broker rows; their actors ask again in 1 s");
                        answers.extend(chunk.iter().map(|id| {
                            let row = Err(error.clone());
                            (id.clone(), BrokerRowRead { read_at, row })
                        }));
                    }
                }
            }
            answers
        };
        ctx.spawn(read.into_actor(self).map(|answers, act, ctx| {
            act.reading_rows = false;
            for (broker_id, answer) in answers {
                if let Some(actor) = act.actors.get_mut(&broker_id) {
                    actor.tell(answer);
                }
            }
            act.read_rows(ctx);
        }));
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
        ctx.spawn(find.into_actor(self).map(|result, act, ctx| {
            act.sweeping = false;
            match result {
                Ok(Ok(brokers)) => {
                    for broker_id in brokers {
                        act.actor_for(ctx, &broker_id).tell(LedgerHasMore);
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
        ctx.run_interval(BROKER_ROW_PUSH, Self::push_rows);
    }
}
