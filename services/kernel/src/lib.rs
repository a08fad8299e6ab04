//! `toka-kernel`: the deterministic state machine and single sequencer for agents and tasks.
//!
//! - [`machine`]: the pure state machine: `State::apply(op, ctx)`, refusal rules, the state
//!   hash, snapshots and replay. No async, no I/O, no clock, no randomness, ordered maps only.
//!
//! The service around it (sequencer lease, submit path, group commit, recovery) is built on the
//! contract in `toka-shared`; see `ARCHITECTURE.md`. This crate depends on `toka-shared` only,
//! never on another service.

pub mod machine;

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_shared::subject::service::KERNEL;
