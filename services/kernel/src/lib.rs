//! `toka-kernel`: the deterministic state machine and single sequencer for agents and tasks.
//!
//! - [`run`]: the service: `toka.kernel.v1.{submit, submit_batch, agent.get, agent.list,
//!   task.get, task.list, health}` on the NATS services API, `/livez`, `/readyz` and
//!   `/metrics` on the admin port; stops gracefully when `shutdown` resolves.
//! - [`config`]: its configuration (`toka-kernel --dump-config` prints every key).
//! - [`machine`]: the pure state machine: `State::apply(op, ctx)`, refusal rules, the state
//!   hash, snapshots and replay. No async, no I\/O, no clock, no randomness, ordered maps only.
//! - [`sequencer`]: the one task that owns the state: sequencing, group commit, rebuilds.
//! - [`recovery`]: the state rebuilt from storage (snapshot + replay), snapshots stored.
//! - [`log`]: what the sequencer and recovery need of storage's `kernel` log.
//! - `service`: the endpoints' logic (verify, rate-limit, sequence, answer when durable).
//! - `queries`: agents and tasks read from the state, filtered by what the caller may read.
//!
//! One instance is active: it holds the sequencer lease (NATS KV bucket `toka_kernel`, key
//! `sequencer`); another waits as a standby, not ready, and takes over when the lease lapses,
//! after rebuilding its state from the log. This crate depends on `toka-contract` and
//! `toka-runtime` only, never on another service.

pub mod config;
pub mod log;
pub mod machine;
mod queries;
pub mod recovery;
mod run;
pub mod sequencer;
mod service;

use toka_runtime::{host, lease, limit};

pub use config::{Config, KernelConfig};
pub use run::{run, run_reporting};

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_contract::subject::service::KERNEL;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str = "Toka kernel: the deterministic state machine and single sequencer for agents and tasks";

/// The key-value bucket of the sequencer lease.
pub const LEASE_BUCKET: &str = "toka_kernel";
/// The lease's key.
pub const LEASE_KEY: &str = "sequencer";

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The services-API host could not start.
    #[error(transparent)]
    Host(#[from] host::Error),
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The rate limits are invalid.
    #[error("kernel.rate_limits: {0}")]
    Limits(#[from] limit::Error),
    /// The lease bucket could not be opened.
    #[error(transparent)]
    Lease(#[from] lease::Error),
    /// Another instance took the sequencer lease: this one stopped sequencing at once.
    #[error("the sequencer lease was lost; stopped so the new holder is the only sequencer")]
    LeaseLost,
    /// The state user could not connect.
    #[error(transparent)]
    Bus(#[from] toka_runtime::bus::Error),
    /// The log does not replay.
    #[error(transparent)]
    Recovery(#[from] recovery::Error),
}
