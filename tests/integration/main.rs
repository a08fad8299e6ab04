//! Toka's integration tests: one binary, a module per area.
//!
//! - `harness`: containerised NATS, in-process services, bounded waits.
//! - `auth`: auth over NATS: issuing, the attack suite, revocation, rate limits, audit,
//!   rotation, replicas, verifiers that fail closed, PyJWT interop.
//! - `binaries`: the service binaries: configuration errors, `--dump-config`, OTLP export, SIGTERM.
//! - `bus`: the bus from outside (nats-py): requests replying outside the inboxes.
//! - `client`: the client library: submit with retries under one operation id, queries,
//!   committed events followed from the stream.
//! - `crash`: storage under SIGKILL, a read-only data directory, a full disk.
//! - `docs`: the tables in `ARCHITECTURE.md` agree with the code.
//! - `kernel`: the kernel over NATS: submit, duplicates, denials, queries, ticks, standby
//!   takeover, storage stopped mid-load.
//! - `services`: the four services on a secured bus.
//! - `storage`: the WAL over NATS, and committed events on JetStream.
//! - `telemetry`: the kernel and audit logs' events folded into `/metrics`, across a SIGKILL.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers outside #[test] functions
#![allow(unreachable_pub)] // a test binary exports nothing; `pub` marks the harness API

mod auth;
mod binaries;
mod bus;
mod client;
mod crash;
mod docs;
mod harness;
mod kernel;
mod services;
mod storage;
mod telemetry;
