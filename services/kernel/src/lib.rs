//! `toka-kernel`: the deterministic state machine and single sequencer for agents and tasks.
//!
//! - [`run`]: the service: registers with the NATS services API, serves its endpoints and
//!   `toka.kernel.v1.health`, answers `/livez`, `/readyz` and `/metrics` on the admin port,
//!   and stops gracefully when `shutdown` resolves.
//! - [`Config`]: its configuration (`toka-kernel --dump-config` prints every key).
//! - [`machine`]: the pure state machine: `State::apply(op, ctx)`, refusal rules, the state
//!   hash, snapshots and replay. No async, no I\/O, no clock, no randomness, ordered maps only.
//!
//! This crate depends on `toka-shared` only, never on another service.

pub mod machine;

use std::future::Future;
use std::time::Duration;

use toka_shared::runtime::bus::Bus;
use toka_shared::runtime::host::{self, Host};

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_shared::subject::service::KERNEL;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str = "Toka kernel: the deterministic state machine and single sequencer for agents and tasks";

/// The service's configuration: so far only the sections every service has
/// (`--dump-config` prints every key).
pub type Config = toka_shared::runtime::config::Common;

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The services-API host could not start.
    #[error(transparent)]
    Host(#[from] host::Error),
}

/// Runs the service on `bus` until `shutdown` resolves.
pub async fn run(config: Config, bus: Bus, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let host = Host::start(&bus, SERVICE_NAME, DESCRIPTION, &config.admin).await?;
    host.serve_until(&bus, shutdown, Duration::from_millis(config.shutdown.grace_ms)).await;
    Ok(())
}
