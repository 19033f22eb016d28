//! The actors: they wire the pure core, the ledger, Kafka and HTTP together.
//!
//! ```text
//! PartitionSupervisor ─► PartitionActor (one per partition) ─claim─► LedgerGateway ─► Postgres
//!                                 │ new deliveries
//!                                 ▼
//!                        DeliverySupervisor ─► DeliveryActor (one per broker) ─► HTTP POST
//! ```
pub mod delivery;
pub mod delivery_supervisor;
pub mod ledger_gateway;
pub mod partition;
pub mod partition_supervisor;
