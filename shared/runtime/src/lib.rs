//! `toka-runtime`: what every Toka service runs on. It builds on the contract
//! (`toka-contract`) and never on a service.
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
//! - [`audit`]: the `audit` log writer (head tracking, conflicts, aggregated denials) and
//!   what a service folds out of the log.
//! - [`token`]: checking capability tokens (Ed25519 JWTs).
//! - [`verifier`]: the token verifier kept current from auth over NATS (keys, revocations,
//!   heartbeat), failing closed when auth falls silent.
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

/// Now, in microseconds since the Unix epoch (0 if the clock is before it).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A fresh 128-bit id for records and tokens: the time in milliseconds, then 80 random bits
/// (two processes never mint the same one). `Err` when the random source fails.
pub fn fresh_id(now_us: u64) -> Result<u128, getrandom::Error> {
    let mut random = [0u8; 16];
    getrandom::getrandom(&mut random[6..])?;
    Ok(u128::from(now_us / 1000) << 80 | u128::from_be_bytes(random))
}
