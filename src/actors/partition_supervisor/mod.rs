//! PartitionSupervisor: follows the consumer group's rebalances (the [`RebalanceEvent`]s of
//! src/kafka.rs). Per assigned partition it opens a [`Tenure`], starts a PartitionActor and the
//! tenure's reader task; on revocation it stops the reader at once, gives the lease up, and waits
//! (at most `kafka.revoke_drain_timeout_ms`) for the actor's current batch so that the offset
//! committed on revoke covers everything it claimed.
//!
//! It keeps each partition's last reader task and the tenures whose actors may still be
//! claiming: the next tenure of that partition awaits them before it reads, claims or takes the
//! lease, so there is never more than one reader, nor more than one claim, per partition (see
//! src/actors/partition/reader.rs).
//!
//! [`RebalanceEvent`]: crate::kafka::RebalanceEvent

mod handlers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use actix::{Actor, Addr, AsyncContext, Context};
use tokio::task::JoinHandle;

pub use handlers::*;

use crate::actors::partition::{PartitionActor, PartitionDeps, Tenure};
use crate::kafka::RebalanceEvents;

struct Assignment {
    actor: Addr<PartitionActor>,
    tenure: Arc<Tenure>,
}

pub struct PartitionSupervisor {
    deps: PartitionDeps,
    revoke_drain_timeout: Duration,
    events: Option<RebalanceEvents>,
    assigned: HashMap<i32, Assignment>,
    /// The last reader task started for each partition (running or finished).
    readers: HashMap<i32, JoinHandle<()>>,
    /// Per partition, the tenures whose actors had not stopped when last looked at.
    tenures: HashMap<i32, Vec<Arc<Tenure>>>,
}

impl PartitionSupervisor {
    pub fn new(
        deps: PartitionDeps,
        events: RebalanceEvents,
        revoke_drain_timeout: Duration,
    ) -> Self {
        PartitionSupervisor {
            deps,
            revoke_drain_timeout,
            events: Some(events),
            assigned: HashMap::new(),
            readers: HashMap::new(),
            tenures: HashMap::new(),
        }
    }
}

impl Actor for PartitionSupervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Rebalance events are read from their channel directly, not through the mailbox, so a
        // busy mailbox can neither drop nor delay them.
        if let Some(events) = self.events.take() {
            ctx.add_stream(events);
        }
    }
}
