//! The pure core: decisions without I/O. Nothing here reads a clock, touches the network or the
//! database, or imports the shell (actors, Kafka, Postgres, HTTP); callers pass in what it needs
//! and carry out what comes back. Each file is unit-tested on its own.

pub mod bisect;
pub mod event;
pub mod policy;
pub mod signing;
pub mod ssrf;
pub mod storable;
