//! The pure core: decisions without I/O. Nothing here reads a clock, touches the network or the
//! database, or imports the shell (actors, Kafka, Postgres, HTTP); callers pass time in as
//! [`Millis`] and carry out the commands that come back. The simulator in tests/simulation.rs
//! drives [`scheduler::Scheduler`] through random interleavings against a model ledger.
//!
//! Still outside this folder until they move at merge: event parsing (src/event.rs), the
//! policy (src/policy.rs), signing (src/signing.rs) and the SSRF rules (src/ssrf.rs); they are
//! pure as well.

pub mod breaker;
pub mod lanes;
pub mod scheduler;
pub mod time;

pub use time::Millis;
