//! `toka-telemetry`: OpenTelemetry export, Prometheus metrics, dashboard and event analyzers.
//!
//! - [`run`]: the service: registers with the NATS services API, serves its endpoints and
//!   `toka.telemetry.v1.health`, answers `/livez`, `/readyz` and `/metrics` on the admin port,
//!   and stops gracefully when `shutdown` resolves.
//! - [`Config`]: its configuration (`toka-telemetry --dump-config` prints every key).
//! - [`views`]: the fleet folded from the kernel log's committed events (agents and tasks by
//!   state, queue depths, waits, retries, timeouts), deterministic and exact under redelivery;
//!   what the metrics and the dashboard will show.
//!
//! This crate depends on `toka-contract` and `toka-runtime` only, never on another service.

pub mod views;

use std::future::Future;
use std::time::Duration;

use toka_runtime::bus::Bus;
use toka_runtime::host::{self, Host};

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_contract::subject::service::TELEMETRY;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str = "Toka telemetry: OpenTelemetry export, Prometheus metrics, dashboard and event analyzers";

/// The service's configuration: so far only the sections every service has
/// (`--dump-config` prints every key).
pub type Config = toka_runtime::config::Common;

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
