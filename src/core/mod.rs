//! The pure core: decisions without I/O. Nothing here reads a clock, touches the network or the
//! database, or imports the shell (actors, Kafka, Postgres, HTTP); callers pass time in as
//! [`Millis`] and carry out what comes back. The simulator in tests/simulation.rs drives
//! [`scheduler::Scheduler`] through random interleavings against a model ledger; every other
//! file is unit-tested on its own.

pub mod bisect;
pub mod breaker;
pub mod concurrency;
pub mod event;
pub mod lanes;
pub mod policy;
pub mod scheduler;
pub mod signing;
pub mod ssrf;
pub mod storable;
pub mod time;

pub use time::Millis;
