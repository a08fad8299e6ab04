//! `toka-auth`: Ed25519 capability tokens: issue, delegate, revoke, rotate, rate-limit, audit.
//!
//! - [`run`]: the service: `toka.auth.v1.{issue, delegate, revoke, jwks, rotate, revocations,
//!   health}` on the NATS services API, the revocation heartbeat on `toka.auth.v1.heartbeat`,
//!   `/livez`, `/readyz` and `/metrics` on the admin port; stops gracefully when `shutdown`
//!   resolves.
//! - [`config`]: its configuration (`toka-auth --dump-config` prints every key).
//! - `handlers`: who a credential is, what it may do, and each endpoint's decision.
//! - `callout`: the NATS auth callout, admitting each client connection with its token's
//!   permissions; `kick`: closing revoked tokens' open connections.
//! - [`signing`]: the private keys and the tokens they sign.
//! - [`delegation`]: the rule a child token's claims follow.
//! - [`lineage`]: agent descent and token ancestry, read from the logs.
//! - [`revocations`]: the revocation set and epoch, folded out of the audit log.
//! - [`keys`]: the signing keys, stored in the key directory and shared by replicas.
//!
//! Replicas share the key directory; the one holding the rotation lease (a NATS key-value
//! entry with a TTL) creates, rotates and retires keys, the others re-read them, and a rotation
//! asked of another replica is forwarded to the holder. This crate depends on `toka-contract`
//! and `toka-runtime` only, never on another service.

mod callout;
pub mod config;
pub mod delegation;
mod handlers;
pub mod keys;
mod kick;
pub mod lineage;
pub mod revocations;
mod run;
pub mod signing;

use toka_runtime::{host, lease, limit};

pub use config::{AuthConfig, CalloutConfig, Config};
pub use run::run;

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_contract::subject::service::AUTH;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str =
    "Toka auth: Ed25519 capability tokens: issue, delegate, revoke, rotate, rate-limit, audit";

/// The key-value bucket of the rotation lease.
pub const LEASE_BUCKET: &str = "toka_auth";
/// The lease's key.
pub const LEASE_KEY: &str = "rotation";

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The services-API host could not start.
    #[error(transparent)]
    Host(#[from] host::Error),
    /// The key store is unusable.
    #[error(transparent)]
    Keys(#[from] keys::Error),
    /// The admin key file is unusable.
    #[error("auth.admin_key_file: {0}")]
    AdminKey(String),
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The rate limits are invalid.
    #[error("auth.rate_limits: {0}")]
    Limits(#[from] limit::Error),
    /// The lease bucket could not be opened.
    #[error(transparent)]
    Lease(#[from] lease::Error),
    /// A subscription failed.
    #[error("subscribing to {0}")]
    Subscribe(String),
    /// The state user could not connect.
    #[error(transparent)]
    Bus(#[from] toka_runtime::bus::Error),
}
