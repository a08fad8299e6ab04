//! `toka-telemetry`: the fleet's state as Prometheus metrics, folded from the kernel and audit
//! logs.
//!
//! - [`run`]: the service: registers with the NATS services API, serves
//!   `toka.telemetry.v1.health`, follows the logs' streams ([`ingest`]) and serves the
//!   views on `/metrics` ([`metrics`]) beside `/livez` and `/readyz` on the admin port (ready
//!   once its consumers are attached), and stops gracefully when `shutdown` resolves.
//! - [`Config`]: its configuration (`toka-telemetry --dump-config` prints every key).
//! - [`views`]: the fleet folded from the logs' committed events (agents and tasks by state,
//!   queue depths, waits, retries, timeouts; tokens and denials), deterministic and exact under
//!   redelivery; what the metrics and the dashboard will show.
//!
//! This crate depends on `toka-contract` and `toka-runtime` only, never on another service.

pub mod ingest;
pub mod metrics;
pub mod views;

use std::future::Future;
use std::time::Duration;

use toka_contract::record::LogName;
use toka_runtime::bus::Bus;
use toka_runtime::host::{self, Host};
use toka_runtime::shutdown::patiently;

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_contract::subject::service::TELEMETRY;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str = "Toka telemetry: the fleet's agents, tasks, queues and tokens as Prometheus metrics, folded from the kernel and audit logs";

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
    let collector = metrics::ViewsCollector::default();
    host.register_collector(Box::new(collector.clone()));
    let grace = Duration::from_millis(config.shutdown.grace_ms);
    let mut shutdown = Box::pin(shutdown);
    // Not ready until both consumers are attached (the streams may not exist yet).
    let (kernel_lag, audit_lag) = (collector.lag(LogName::Kernel), collector.lag(LogName::Audit));
    let kernel = patiently(&mut shutdown, "the kernel log's stream", || {
        ingest::Ingest::attach(&bus, LogName::Kernel, collector.views.clone(), kernel_lag.clone())
    });
    let Some(kernel) = kernel.await else {
        host.shutdown(grace).await;
        return Ok(());
    };
    let audit = patiently(&mut shutdown, "the audit log's stream", || {
        ingest::Ingest::attach(&bus, LogName::Audit, collector.audit.clone(), audit_lag.clone())
    });
    let Some(audit) = audit.await else {
        host.shutdown(grace).await;
        return Ok(());
    };
    let following = [tokio::spawn(kernel.run()), tokio::spawn(audit.run())];
    host.serve_until(&bus, shutdown, grace).await;
    for task in following {
        task.abort();
    }
    Ok(())
}
