//! PartitionSupervisor: follows the consumer group's rebalances. It starts one PartitionActor
//! per assigned partition and stops it on revocation, waiting for its current batch so that the
//! offset it stores covers everything it claimed.

mod handlers;

use std::collections::HashMap;

use actix::{Actor, Addr, Context};

pub use handlers::*;

use crate::actors::partition::{PartitionActor, PartitionDeps};

pub struct PartitionSupervisor {
    deps: PartitionDeps,
    partitions: HashMap<i32, Addr<PartitionActor>>,
}

impl PartitionSupervisor {
    pub fn new(deps: PartitionDeps) -> Self {
        PartitionSupervisor {
            deps,
            partitions: HashMap::new(),
        }
    }
}

impl Actor for PartitionSupervisor {
    type Context = Context<Self>;
}
