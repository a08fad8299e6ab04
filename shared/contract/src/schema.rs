//! The schema registry: every JSON Schema in `schemas/`, embedded at build time, compiled once,
//! and the map from Rust types to the schema each must satisfy.
//!
//! Schemas are the language-neutral source of truth; the Rust types are written by hand, and
//! the contract tests (`shared/tests/contract.rs`) prove the two agree both ways. Validation
//! errors name the schema and the JSON pointer of the failing value.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{auth, kernel, service, storage};
use crate::envelope::Envelope;
use crate::event::Event;
use crate::op::Operation;
use crate::record::{AuditEntry, AuditRecord, KernelRecord};
use crate::wire::{ErrorBody, Reply};

/// The base URI of every schema's `$id`; a schema's id is this plus its path under `schemas/`.
pub const BASE_URI: &str = "https://toka.dev/schemas/";

/// The longest message an [`Error`] carries (validation messages can quote whole documents).
const MAX_MESSAGE: usize = 300;

/// `(path, contents)` for each path, read from `schemas/` at build time.
macro_rules! schema_files {
    ($($path:literal,)*) => {
        &[$(($path, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../schemas/", $path))),)*]
    };
}

/// Every file under `schemas/`, by path, with its contents.
pub const FILES: &[(&str, &str)] = schema_files![
    "api/auth.agent_token.request.v1.json",
    "api/auth.delegate.request.v1.json",
    "api/auth.heartbeat.v1.json",
    "api/auth.issue.request.v1.json",
    "api/auth.jwks.reply.v1.json",
    "api/auth.jwks.request.v1.json",
    "api/auth.revocations.reply.v1.json",
    "api/auth.revocations.request.v1.json",
    "api/auth.revoke.reply.v1.json",
    "api/auth.revoke.request.v1.json",
    "api/auth.rotate.reply.v1.json",
    "api/auth.rotate.request.v1.json",
    "api/auth.token.reply.v1.json",
    "api/kernel.agent.get.reply.v1.json",
    "api/kernel.agent.get.request.v1.json",
    "api/kernel.agent.list.reply.v1.json",
    "api/kernel.agent.list.request.v1.json",
    "api/kernel.submit.reply.v1.json",
    "api/kernel.submit.request.v1.json",
    "api/kernel.submit_batch.reply.v1.json",
    "api/kernel.submit_batch.request.v1.json",
    "api/kernel.status.reply.v1.json",
    "api/kernel.status.request.v1.json",
    "api/kernel.task.get.reply.v1.json",
    "api/kernel.task.get.request.v1.json",
    "api/kernel.task.list.reply.v1.json",
    "api/kernel.task.list.request.v1.json",
    "api/service.health.reply.v1.json",
    "api/service.health.request.v1.json",
    "api/storage.append.audit.request.v1.json",
    "api/storage.append.kernel.request.v1.json",
    "api/storage.append.reply.v1.json",
    "api/storage.head.reply.v1.json",
    "api/storage.head.request.v1.json",
    "api/storage.query.reply.v1.json",
    "api/storage.query.request.v1.json",
    "api/storage.read.reply.v1.json",
    "api/storage.read.request.v1.json",
    "api/storage.snapshot.get.reply.v1.json",
    "api/storage.snapshot.get.request.v1.json",
    "api/storage.snapshot.put.reply.v1.json",
    "api/storage.snapshot.put.request.v1.json",
    "api/storage.status.reply.v1.json",
    "api/storage.status.request.v1.json",
    "api/storage.verify.reply.v1.json",
    "api/storage.verify.request.v1.json",
    "auth/claims.v1.json",
    "common/defs.v1.json",
    "envelope/envelope.v1.json",
    "events/agent.resumed.v1.json",
    "events/agent.spawned.v1.json",
    "events/agent.suspended.v1.json",
    "events/agent.terminated.v1.json",
    "events/auth.access_denied.v1.json",
    "events/auth.key_rotated.v1.json",
    "events/auth.token_delegated.v1.json",
    "events/auth.token_issued.v1.json",
    "events/auth.token_revoked.v1.json",
    "events/event.v1.json",
    "events/observation.emitted.v1.json",
    "events/resource.cpu_utilization.v1.json",
    "events/resource.error.v1.json",
    "events/resource.io_operation.v1.json",
    "events/resource.memory_allocated.v1.json",
    "events/system.error.v1.json",
    "events/system.validation_error.v1.json",
    "events/task.cancelled.v1.json",
    "events/task.claimed.v1.json",
    "events/task.completed.v1.json",
    "events/task.failed.v1.json",
    "events/task.parked.v1.json",
    "events/task.scheduled.v1.json",
    "events/task.timed_out.v1.json",
    "external/cloudevents.json",
    "external/nats-micro-v1/info_response.json",
    "external/nats-micro-v1/ping_response.json",
    "external/nats-micro-v1/stats_response.json",
    "ops/agent.resume.v1.json",
    "ops/agent.spawn.v1.json",
    "ops/agent.suspend.v1.json",
    "ops/agent.terminate.v1.json",
    "ops/observation.emit.v1.json",
    "ops/operation.v1.json",
    "ops/resource.report_cpu.v1.json",
    "ops/resource.report_io.v1.json",
    "ops/resource.report_memory.v1.json",
    "ops/system.tick.v1.json",
    "ops/task.cancel.v1.json",
    "ops/task.claim.v1.json",
    "ops/task.complete.v1.json",
    "ops/task.fail.v1.json",
    "ops/task.heartbeat.v1.json",
    "ops/task.schedule.v1.json",
    "records/audit-record.v1.json",
    "records/kernel-record.v1.json",
    "wire/error.v1.json",
];

/// A document failed its schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{schema} at {}: {message}", if pointer.is_empty() { "the document root" } else { pointer })]
pub struct Error {
    /// The schema's path under `schemas/` (`ops/agent.spawn.v1.json`).
    pub schema: String,
    /// The JSON pointer of the failing value (`""` for the whole document).
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

/// The embedded schemas could not be compiled (a defect of the build, caught by the tests).
#[derive(Debug, Clone, thiserror::Error)]
#[error("schema {schema} does not compile: {message}")]
pub struct LoadError {
    schema: &'static str,
    message: String,
}

/// Compiled validators for every schema.
pub struct Registry {
    validators: BTreeMap<&'static str, jsonschema::Validator>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("schemas", &self.validators.len()).finish()
    }
}

impl Registry {
    /// Compiles every embedded schema.
    pub fn load() -> Result<Self, LoadError> {
        let mut documents = Vec::with_capacity(FILES.len());
        for (path, text) in FILES {
            let doc: Value =
                serde_json::from_str(text).map_err(|e| LoadError { schema: path, message: e.to_string() })?;
            documents.push((*path, doc));
        }
        let resources = documents.iter().map(|(path, doc)| (format!("{BASE_URI}{path}"), doc.clone()));
        let registry = jsonschema::Registry::new()
            .extend(resources)
            .and_then(|r| r.prepare())
            .map_err(|e| LoadError { schema: "(registry)", message: e.to_string() })?;
        let mut validators = BTreeMap::new();
        for (path, doc) in &documents {
            let validator = jsonschema::options()
                .with_registry(&registry)
                .with_base_uri(format!("{BASE_URI}{path}"))
                .should_validate_formats(true)
                .build(doc)
                .map_err(|e| LoadError { schema: path, message: e.to_string() })?;
            validators.insert(*path, validator);
        }
        Ok(Registry { validators })
    }

    /// The registry of the embedded schemas, compiled on first use.
    ///
    /// # Panics
    ///
    /// If an embedded schema does not compile: a build defect that the contract tests catch.
    pub fn global() -> &'static Registry {
        static GLOBAL: OnceLock<Registry> = OnceLock::new();
        #[allow(clippy::expect_used)]
        GLOBAL.get_or_init(|| Registry::load().expect("embedded schemas compile"))
    }

    /// The schema paths, in order.
    pub fn schemas(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.validators.keys().copied()
    }

    /// Validates `doc` against the schema at `path`.
    pub fn validate(&self, path: &str, doc: &Value) -> Result<(), Error> {
        let Some(validator) = self.validators.get(path) else {
            return Err(Error {
                schema: path.to_owned(),
                pointer: String::new(),
                message: "no such schema".to_owned(),
            });
        };
        validator.validate(doc).map_err(|e| {
            let mut message = e.to_string();
            if message.len() > MAX_MESSAGE {
                let cut = (0..=MAX_MESSAGE).rev().find(|&i| message.is_char_boundary(i)).unwrap_or(0);
                message.truncate(cut);
                message.push('…');
            }
            Error { schema: path.to_owned(), pointer: e.instance_path().to_string(), message }
        })
    }
}

/// A Rust type and the schema its JSON form satisfies.
pub trait Contract: Serialize + DeserializeOwned {
    /// The schema's path under `schemas/`.
    const SCHEMA: &'static str;

    /// The value of a document that satisfied [`Contract::SCHEMA`]. A type that keeps the
    /// document as received overrides this to take it as it is, without rebuilding it.
    fn from_document(doc: Value) -> Result<Self, serde_json::Error> {
        serde_json::from_value(doc)
    }
}

/// A reply body type; `Reply<Self>` satisfies `REPLY_SCHEMA`.
pub trait ReplyContract: Serialize + DeserializeOwned {
    /// The reply schema's path under `schemas/`.
    const REPLY_SCHEMA: &'static str;
}

impl<T: ReplyContract> Contract for Reply<T> {
    const SCHEMA: &'static str = T::REPLY_SCHEMA;
}

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all.
    #[error("not JSON: {0}")]
    Json(String),
    /// JSON that fails its schema.
    #[error(transparent)]
    Schema(#[from] Error),
}

/// Parses `bytes` as JSON, validates it against `T`'s schema, and deserializes it.
pub fn decode<T: Contract>(bytes: &[u8]) -> Result<T, DecodeError> {
    let doc: Value = serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
    Registry::global().validate(T::SCHEMA, &doc)?;
    // The schema accepted it; a type that still refuses it is a contract defect, reported at
    // the root with serde's reason.
    T::from_document(doc).map_err(|e| {
        DecodeError::Schema(Error { schema: T::SCHEMA.to_owned(), pointer: String::new(), message: e.to_string() })
    })
}

/// A contract type as a table entry: its schema and a function that decodes a document as the
/// type and encodes it again (what the contract tests run over every example).
#[derive(Debug, Clone, Copy)]
pub struct ContractType {
    /// The schema's path.
    pub schema: &'static str,
    /// The Rust type's name.
    pub rust_type: &'static str,
    /// Decode as the type, then encode again.
    pub round_trip: fn(&Value) -> Result<Value, String>,
}

fn round_trip<T: Contract>(doc: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(&typed).map_err(|e| e.to_string())
}

/// `Reply<B>` where `B` depends on the `log` of the reply (`storage.read`).
fn round_trip_read_reply(doc: &Value) -> Result<Value, String> {
    match doc.pointer("/ok/log").and_then(Value::as_str) {
        Some("audit") => round_trip::<Reply<storage::ReadReply<AuditEntry>>>(doc),
        _ => round_trip::<Reply<storage::ReadReply<Operation>>>(doc),
    }
}

macro_rules! contracts {
    (
        plain { $($ty:ty => $schema:literal,)* }
        replies { $($rty:ty => $rschema:literal,)* }
    ) => {
        $(impl Contract for $ty { const SCHEMA: &'static str = $schema; })*
        $(impl ReplyContract for $rty { const REPLY_SCHEMA: &'static str = $rschema; })*

        /// Every contract type with its schema. Schemas without an entry here are
        /// building blocks (`common/`, `external/`) or read per log (`storage.read` reply).
        pub const CONTRACTS: &[ContractType] = &[
            $(ContractType { schema: $schema, rust_type: stringify!($ty), round_trip: round_trip::<$ty> },)*
            $(ContractType { schema: $rschema, rust_type: stringify!(Reply<$rty>), round_trip: round_trip::<Reply<$rty>> },)*
            ContractType { schema: "api/storage.read.reply.v1.json", rust_type: "Reply<ReadReply<_>>", round_trip: round_trip_read_reply },
        ];
    };
}

contracts! {
    plain {
        Operation => "ops/operation.v1.json",
        Event => "events/event.v1.json",
        KernelRecord => "records/kernel-record.v1.json",
        AuditRecord => "records/audit-record.v1.json",
        Envelope => "envelope/envelope.v1.json",
        ErrorBody => "wire/error.v1.json",
        service::HealthRequest => "api/service.health.request.v1.json",
        kernel::SubmitRequest => "api/kernel.submit.request.v1.json",
        kernel::SubmitBatchRequest => "api/kernel.submit_batch.request.v1.json",
        kernel::AgentGetRequest => "api/kernel.agent.get.request.v1.json",
        kernel::AgentListRequest => "api/kernel.agent.list.request.v1.json",
        kernel::TaskGetRequest => "api/kernel.task.get.request.v1.json",
        kernel::StatusRequest => "api/kernel.status.request.v1.json",
        kernel::TaskListRequest => "api/kernel.task.list.request.v1.json",
        storage::AppendRequest<Operation> => "api/storage.append.kernel.request.v1.json",
        storage::AppendRequest<AuditEntry> => "api/storage.append.audit.request.v1.json",
        storage::ReadRequest => "api/storage.read.request.v1.json",
        storage::QueryRequest => "api/storage.query.request.v1.json",
        storage::HeadRequest => "api/storage.head.request.v1.json",
        storage::VerifyRequest => "api/storage.verify.request.v1.json",
        storage::SnapshotPutRequest => "api/storage.snapshot.put.request.v1.json",
        storage::SnapshotGetRequest => "api/storage.snapshot.get.request.v1.json",
        storage::StatusRequest => "api/storage.status.request.v1.json",
        auth::IssueRequest => "api/auth.issue.request.v1.json",
        auth::DelegateRequest => "api/auth.delegate.request.v1.json",
        auth::AgentTokenRequest => "api/auth.agent_token.request.v1.json",
        auth::RevokeRequest => "api/auth.revoke.request.v1.json",
        auth::JwksRequest => "api/auth.jwks.request.v1.json",
        auth::RotateRequest => "api/auth.rotate.request.v1.json",
        auth::RevocationsRequest => "api/auth.revocations.request.v1.json",
        auth::Heartbeat => "api/auth.heartbeat.v1.json",
        auth::Claims => "auth/claims.v1.json",
    }
    replies {
        service::HealthReply => "api/service.health.reply.v1.json",
        kernel::SubmitReply => "api/kernel.submit.reply.v1.json",
        kernel::SubmitBatchReply => "api/kernel.submit_batch.reply.v1.json",
        kernel::AgentView => "api/kernel.agent.get.reply.v1.json",
        kernel::AgentListReply => "api/kernel.agent.list.reply.v1.json",
        kernel::TaskView => "api/kernel.task.get.reply.v1.json",
        kernel::StatusReply => "api/kernel.status.reply.v1.json",
        kernel::TaskListReply => "api/kernel.task.list.reply.v1.json",
        storage::AppendReply => "api/storage.append.reply.v1.json",
        storage::QueryReply => "api/storage.query.reply.v1.json",
        storage::HeadReply => "api/storage.head.reply.v1.json",
        storage::VerifyReply => "api/storage.verify.reply.v1.json",
        storage::SnapshotPutReply => "api/storage.snapshot.put.reply.v1.json",
        storage::SnapshotGetReply => "api/storage.snapshot.get.reply.v1.json",
        storage::StatusReply => "api/storage.status.reply.v1.json",
        auth::TokenReply => "api/auth.token.reply.v1.json",
        auth::RevokeReply => "api/auth.revoke.reply.v1.json",
        auth::JwksReply => "api/auth.jwks.reply.v1.json",
        auth::RotateReply => "api/auth.rotate.reply.v1.json",
        auth::RevocationsReply => "api/auth.revocations.reply.v1.json",
    }
}

impl ReplyContract for storage::ReadReply<Operation> {
    const REPLY_SCHEMA: &'static str = "api/storage.read.reply.v1.json";
}
impl ReplyContract for storage::ReadReply<AuditEntry> {
    const REPLY_SCHEMA: &'static str = "api/storage.read.reply.v1.json";
}
