pub mod actors;
pub mod admin;
pub mod broker;
pub mod cli;
pub mod config;
pub mod connection_budget;
pub mod core;
#[cfg(feature = "fault-injection")]
pub mod fault_injection;
pub mod kafka;
pub mod kafka_properties;
pub mod lease;
pub mod ledger;
pub mod metrics;
pub mod offsets;
pub mod open_files;
pub mod retention;
pub mod stall;
pub mod startup;
pub mod telemetry;
pub mod webhook_client;

/// glibc's malloc and free were a fifth of the service's CPU (perf during `hotload`: every
/// request, header map and ledger row allocates). Declared in the library so every binary that
/// runs the service, the benchmark's in-process one included, uses the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
