//! The plumbing every Toka service needs the same way (feature `runtime`).
//!
//! - [`config`]: layered configuration (defaults → TOML file → `TOKA_…` env → CLI) and the
//!   sections every service shares.
//! - [`observe`]: `tracing` with JSON logs off a terminal, OpenTelemetry traces and metrics
//!   over OTLP when an endpoint is configured, W3C trace context in NATS headers.
//! - [`bus`]: the NATS connection, typed requests that carry trace context and respect the
//!   server's payload limit.
//! - [`host`]: the NATS services-API host: typed endpoints with schema validation, spans,
//!   error headers and bounded concurrency, plus the admin HTTP probes.
//! - [`shutdown`]: SIGTERM/SIGINT as a future.
//! - [`deploy`]: per-deployment NATS credentials and server configuration.
//! - [`cli`]: the `main` every service binary shares.
//! - [`audit`]: the `audit` log writer (head tracking, conflicts, aggregated denials) and the
//!   revocations folded out of it.
//! - [`token`]: signing and verifying capability tokens (Ed25519 JWTs).
//! - [`verifier`]: the token verifier kept current from auth over NATS (keys, revocations,
//!   heartbeat), failing closed when auth falls silent.
//! - [`worker`]: claim, heartbeat, complete and fail tasks: the worker loop.
//! - [`limit`]: GCRA rate limits per principal and operation class.
//! - [`lease`]: a single-holder lease in a NATS key-value bucket with a TTL.

pub mod audit;
pub mod bus;
pub mod cli;
pub mod config;
pub mod deploy;
pub mod host;
pub mod lease;
pub mod limit;
pub mod observe;
pub mod shutdown;
pub mod token;
pub mod verifier;
pub mod worker;
