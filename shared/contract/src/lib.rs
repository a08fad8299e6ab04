//! `toka-contract`: Toka's contract, shared by every service and client.
//!
//! Services never link each other; they agree through what this crate defines and through the
//! JSON Schemas in `schemas/`, which are the language-neutral source of truth.
//!
//! - [`id`]: ULID entity identifiers, safe as NATS subject tokens.
//! - [`spec`]: agent and task specifications, resource quantities, validated names.
//! - [`capability`]: resource patterns, actions, matching and the delegation subset rule.
//! - [`op`]: the [`Operation`] enum and the capability each operation requires.
//! - [`event`]: the [`Event`] catalogue.
//! - [`record`]: log records, the hash chain and its canonical encoding.
//! - [`envelope`]: the CloudEvents envelope of committed events.
//! - [`subject`]: every NATS subject, spelled once.
//! - [`wire`]: reply bodies, stable error codes and the NATS error headers.
//! - [`api`]: request and reply bodies of every endpoint.
//! - [`schema`]: the embedded schema registry and the type ↔ schema map.
//! - [`access`]: the NATS users and their least-privilege permissions.
//! - `testing` (feature `test-util`): record chains the crates' tests share.
//!
//! The crate is pure: no async runtime, no NATS client (a test on `cargo metadata` holds it to
//! that). What services run on is `toka-runtime`; what clients use is `toka-client`.

pub mod access;
pub mod api;
pub mod capability;
pub mod envelope;
pub mod event;
pub mod id;
pub mod op;
pub mod record;
pub mod schema;
pub mod spec;
pub mod subject;
pub mod wire;

#[cfg(any(test, feature = "test-util"))]
pub mod testing;

pub use capability::{Action, ActionSet, Capability, Pattern};
pub use envelope::Envelope;
pub use event::Event;
pub use id::{AgentId, OpId, TaskId, TokenId};
pub use op::Operation;
pub use record::{AuditRecord, Hash, KernelRecord, LogName, Record};
pub use wire::{ErrorCode, Reply, WireError};
