//! `toka-auth`: Ed25519 capability tokens: issue, delegate, revoke, rotate, rate-limit, audit.
//!
//! The service's runtime (configuration, NATS connection, services-API endpoints, probes and
//! graceful shutdown) is built on the contract in `toka-shared`; see `ARCHITECTURE.md`.
//! This crate depends on `toka-shared` only, never on another service.

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_shared::subject::service::AUTH;
