//! Request and reply bodies of every endpoint in [`crate::subject`], one module per service.
//!
//! A reply body is always wrapped as [`crate::wire::Reply`]: `{"ok": <body>}` or
//! `{"error": …}`. Each body type names its schema through [`crate::schema::Contract`].

use serde::{Deserialize, Serialize};

/// Paging defaults shared by list endpoints.
pub const DEFAULT_PAGE: u32 = 100;
/// The largest page a list endpoint returns.
pub const MAX_PAGE: u32 = 1000;

fn default_page() -> u32 {
    DEFAULT_PAGE
}

/// Endpoints every service has.
pub mod service {
    use super::*;

    /// `toka.<service>.v1.health` (the request body is `{}`).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthRequest {}

    /// A service instance's health.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HealthReply {
        /// The service name (`toka-kernel`).
        pub service: String,
        /// Its version.
        pub version: String,
        /// The instance's id in the NATS services API.
        pub instance: String,
        /// Whether it is ready to serve (false while recovering or starting).
        pub ready: bool,
        /// Time since it started, in milliseconds.
        pub uptime_ms: u64,
    }
}

/// The kernel's endpoints.
pub mod kernel {
    use super::*;
    use crate::event::Event;
    use crate::op::Operation;
    use crate::spec::{AgentName, Principal, QueueName, ResourceLimits};
    use crate::wire::Reply;
    use crate::{AgentId, OpId, TaskId};

    /// The most operations one batch submission holds.
    pub const MAX_BATCH: usize = 1000;

    /// `toka.kernel.v1.submit`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SubmitRequest {
        /// Idempotency key: a retry with the same id returns the first result.
        pub op_id: OpId,
        /// The caller's capability token (a JWT).
        pub token: String,
        /// The operation.
        pub op: Operation,
    }

    /// The reply to an accepted operation, sent only after it is durable.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SubmitReply {
        /// The record's sequence in the `kernel` log.
        pub seq: u64,
        /// The sequencer's time.
        pub time_us: u64,
        /// The events the operation produced.
        pub events: Vec<Event>,
        /// For `agent.spawn`: a token for the new agent, scoped to it and its descendants.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub agent_token: Option<String>,
        /// For an accepted `task.claim`: the claimed task's payload, for the worker.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub task_payload: Option<String>,
    }

    /// One operation of a batch.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct BatchItem {
        /// Idempotency key.
        pub op_id: OpId,
        /// The operation.
        pub op: Operation,
    }

    /// `toka.kernel.v1.submit_batch`: operations under one token, applied in order; each has its
    /// own result.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SubmitBatchRequest {
        /// The caller's token.
        pub token: String,
        /// 1 to [`MAX_BATCH`] operations.
        pub ops: Vec<BatchItem>,
    }

    /// One result per operation, in order.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SubmitBatchReply {
        /// The results.
        pub results: Vec<Reply<SubmitReply>>,
    }

    /// An agent's lifecycle state.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum AgentState {
        /// May act.
        Running,
        /// Paused by an operator or a parent.
        Suspended,
        /// Gone for good.
        Terminated,
    }

    /// A task's lifecycle state.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum TaskState {
        /// Waiting in its queue (possibly until a retry time).
        Scheduled,
        /// Held by a worker.
        Claimed,
        /// Finished successfully.
        Completed,
        /// Finished unsuccessfully, not to be retried.
        Failed,
        /// A deadline passed and no attempt is left.
        TimedOut,
        /// Cancelled.
        Cancelled,
        /// Out of attempts after failures: set aside for a human.
        Parked,
    }

    /// Resource use of an agent.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ResourceUsage {
        /// Bytes held now.
        pub memory_bytes: u64,
        /// Millicores in use now.
        pub cpu_millicores: u64,
        /// Bytes read and written over the lifetime.
        pub io_bytes: u64,
    }

    /// An agent as the kernel knows it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AgentView {
        /// Its id.
        pub agent: AgentId,
        /// Its name.
        pub name: AgentName,
        /// Its parent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub parent: Option<AgentId>,
        /// Its state.
        pub state: AgentState,
        /// How many children it has.
        pub children: u32,
        /// Its limits.
        #[serde(default, skip_serializing_if = "crate::spec::is_default")]
        pub limits: ResourceLimits,
        /// Its use.
        pub usage: ResourceUsage,
        /// Observations it emitted.
        pub observations: u64,
        /// The record that spawned it.
        pub spawned_seq: u64,
        /// When.
        pub spawned_at_us: u64,
    }

    /// A task as the kernel knows it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TaskView {
        /// Its id.
        pub task: TaskId,
        /// Its owner.
        pub agent: AgentId,
        /// Its queue.
        pub queue: QueueName,
        /// Its priority.
        pub priority: u8,
        /// Its state.
        pub state: TaskState,
        /// The current (or last) attempt, 0 before the first claim.
        pub attempt: u32,
        /// Attempts allowed.
        pub max_attempts: u32,
        /// Who holds the claim.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub claimed_by: Option<Principal>,
        /// The next deadline, if one is running.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub deadline_us: Option<u64>,
        /// The last failure.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub last_error: String,
        /// The record that scheduled it.
        pub scheduled_seq: u64,
        /// When.
        pub scheduled_at_us: u64,
    }

    /// `toka.kernel.v1.agent.get`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AgentGetRequest {
        /// The caller's token.
        pub token: String,
        /// The agent.
        pub agent: AgentId,
    }

    /// `toka.kernel.v1.agent.list`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AgentListRequest {
        /// The caller's token.
        pub token: String,
        /// Only children of this agent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub parent: Option<AgentId>,
        /// Only agents in this state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub state: Option<AgentState>,
        /// Start after this id (the previous page's `next_after`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub after: Option<AgentId>,
        /// Page size, 1 to [`MAX_PAGE`].
        #[serde(default = "default_page")]
        pub limit: u32,
    }

    /// A page of agents, in id order.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AgentListReply {
        /// The agents.
        pub agents: Vec<AgentView>,
        /// Where the next page starts; absent on the last page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub next_after: Option<AgentId>,
    }

    /// `toka.kernel.v1.task.get`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TaskGetRequest {
        /// The caller's token.
        pub token: String,
        /// The task.
        pub task: TaskId,
    }

    /// `toka.kernel.v1.task.list`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TaskListRequest {
        /// The caller's token.
        pub token: String,
        /// Only tasks of this agent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub agent: Option<AgentId>,
        /// Only tasks of this queue.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub queue: Option<QueueName>,
        /// Only tasks in this state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub state: Option<TaskState>,
        /// Start after this id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub after: Option<TaskId>,
        /// Page size, 1 to [`MAX_PAGE`].
        #[serde(default = "default_page")]
        pub limit: u32,
    }

    /// A page of tasks, in id order.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TaskListReply {
        /// The tasks.
        pub tasks: Vec<TaskView>,
        /// Where the next page starts; absent on the last page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub next_after: Option<TaskId>,
    }
}

/// Storage's endpoints.
pub mod storage {
    use super::*;
    use crate::event::Event;
    use crate::record::{ChainBreak, Hash, LogName, Record};

    /// Default and largest byte budget of a read reply, under NATS's 1 MiB default payload.
    pub const MAX_READ_BYTES: u32 = 900_000;

    fn default_read_bytes() -> u32 {
        MAX_READ_BYTES
    }

    /// `toka.storage.v1.append.<log>`: records with contiguous sequences starting at
    /// `expected_seq`, the log's head + 1. An identical retry of a committed batch succeeds.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AppendRequest<B> {
        /// The sequence of the first record.
        pub expected_seq: u64,
        /// The records, hash-chained to the head.
        pub records: Vec<Record<B>>,
    }

    /// Sent once the batch is durable.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AppendReply {
        /// The first record's sequence.
        pub first_seq: u64,
        /// The last record's sequence (the new head, unless `duplicate`).
        pub last_seq: u64,
        /// The last record's hash.
        pub last_hash: Hash,
        /// Whether the batch had already been committed (an idempotent retry).
        pub duplicate: bool,
    }

    /// `toka.storage.v1.read`: records from `from_seq` on, in order.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ReadRequest {
        /// The log.
        pub log: LogName,
        /// The first sequence wanted.
        pub from_seq: u64,
        /// At most this many records, 1 to [`MAX_PAGE`].
        #[serde(default = "default_page")]
        pub max_records: u32,
        /// At most about this many bytes of records (at least one record is returned).
        #[serde(default = "default_read_bytes")]
        pub max_bytes: u32,
    }

    /// A page of records; `B` is the log's body type.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct ReadReply<B> {
        /// The log.
        pub log: LogName,
        /// The records, contiguous from the requested sequence.
        pub records: Vec<Record<B>>,
        /// The log's head when read.
        pub head_seq: u64,
    }

    /// An event's address in a log.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct EventAddress {
        /// The record.
        pub seq: u64,
        /// The event's index in the record.
        pub idx: u16,
    }

    /// `toka.storage.v1.query`: events by entity, type and time, in log order.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct QueryRequest {
        /// The log.
        pub log: LogName,
        /// Only events about this entity id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub entity: Option<String>,
        /// Only events of this type (`task.failed`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub event_type: Option<String>,
        /// Only events at or after this time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub from_time_us: Option<u64>,
        /// Only events before this time.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub to_time_us: Option<u64>,
        /// Start after this address (the previous page's `next_after`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub after: Option<EventAddress>,
        /// Page size, 1 to [`MAX_PAGE`].
        #[serde(default = "default_page")]
        pub limit: u32,
    }

    /// One event found by a query.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct QueryHit {
        /// Where it is.
        pub at: EventAddress,
        /// When it was recorded.
        pub time_us: u64,
        /// The event.
        pub event: Event,
    }

    /// A page of events.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct QueryReply {
        /// The events.
        pub hits: Vec<QueryHit>,
        /// Where the next page starts; absent on the last page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub next_after: Option<EventAddress>,
    }

    /// `toka.storage.v1.head`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HeadRequest {
        /// The log.
        pub log: LogName,
    }

    /// A log's head; `seq` 0 and [`Hash::ZERO`] for an empty log.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct HeadReply {
        /// The log.
        pub log: LogName,
        /// The last sequence.
        pub seq: u64,
        /// The last record's hash.
        pub hash: Hash,
    }

    /// `toka.storage.v1.verify`: recompute the chain over a range.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VerifyRequest {
        /// The log.
        pub log: LogName,
        /// The first sequence to check (default: the oldest kept).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub from_seq: Option<u64>,
        /// The last sequence to check (default: the head).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub to_seq: Option<u64>,
    }

    /// The outcome of a verification.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct VerifyReply {
        /// The log.
        pub log: LogName,
        /// Records checked.
        pub verified: u64,
        /// The head when checked.
        pub head_seq: u64,
        /// The first break, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub first_break: Option<ChainBreak>,
    }

    /// `toka.storage.v1.snapshot.put`: one chunk of a snapshot of the state after `seq`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SnapshotPutRequest {
        /// The log the snapshot summarises.
        pub log: LogName,
        /// The last sequence the snapshot covers.
        pub seq: u64,
        /// The hash of the whole encoded state.
        pub state_hash: Hash,
        /// This chunk's index, from 0.
        pub chunk: u32,
        /// How many chunks in all.
        pub chunks: u32,
        /// The chunk, base64 (standard alphabet, padded).
        pub data: String,
    }

    /// Progress of a snapshot upload.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SnapshotPutReply {
        /// The snapshot's sequence.
        pub seq: u64,
        /// Whether every chunk is now stored (and the snapshot usable).
        pub complete: bool,
    }

    /// `toka.storage.v1.snapshot.get`: a chunk of the newest complete snapshot at or before a
    /// sequence.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SnapshotGetRequest {
        /// The log.
        pub log: LogName,
        /// The newest snapshot at or before this sequence (default: the newest).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub at_or_before: Option<u64>,
        /// The chunk wanted.
        pub chunk: u32,
    }

    /// One chunk of a snapshot.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct SnapshotGetReply {
        /// The last sequence the snapshot covers.
        pub seq: u64,
        /// The hash of the whole encoded state.
        pub state_hash: Hash,
        /// This chunk's index.
        pub chunk: u32,
        /// How many chunks in all.
        pub chunks: u32,
        /// The chunk, base64.
        pub data: String,
    }

    /// `toka.storage.v1.status` (the request body is `{}`).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct StatusRequest {}

    /// One log's state.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct LogStatus {
        /// The log.
        pub log: LogName,
        /// The last sequence.
        pub head_seq: u64,
        /// The oldest sequence kept (after compaction), 1 if none was compacted.
        pub first_seq: u64,
        /// The last sequence whose events are published on the stream.
        pub published_seq: u64,
        /// The newest complete snapshot, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub snapshot_seq: Option<u64>,
    }

    /// Storage's state.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct StatusReply {
        /// `memory`, `sqlite` or `fdb`.
        pub backend: String,
        /// Each log.
        pub logs: Vec<LogStatus>,
    }
}

/// Auth's endpoints.
pub mod auth {
    use super::*;
    use crate::TokenId;
    use crate::capability::Capability;
    use crate::spec::Principal;

    /// How a caller of an administrative endpoint proves itself.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(rename_all = "snake_case", deny_unknown_fields)]
    pub enum Credential {
        /// A token holding the needed `token:*` action.
        Token(String),
        /// The admin key configured at deploy time.
        AdminKey(String),
    }

    /// `toka.auth.v1.issue`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct IssueRequest {
        /// Who asks (admin key, or a token with `issue` on `token:*`).
        pub credential: Credential,
        /// The new token's subject.
        pub sub: Principal,
        /// What it allows (at least one).
        pub capabilities: Vec<Capability>,
        /// Lifetime in milliseconds, at most the configured maximum.
        pub ttl_ms: u64,
        /// Whether verifiers accept it only once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub one_time: bool,
    }

    /// A token handed out by issue or delegate.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TokenReply {
        /// The JWT.
        pub token: String,
        /// Its id.
        pub jti: TokenId,
        /// When it expires.
        pub expires_at_us: u64,
        /// Its delegation depth (0 for an issued token).
        pub depth: u8,
    }

    /// `toka.auth.v1.delegate`: a child of `token` with a subset of its capabilities.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct DelegateRequest {
        /// The parent token, held by the caller.
        pub token: String,
        /// The child's subject (default: the parent's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub sub: Option<Principal>,
        /// What the child allows; each must be covered by one of the parent's.
        pub capabilities: Vec<Capability>,
        /// Lifetime in milliseconds; the child never outlives its parent.
        pub ttl_ms: u64,
        /// Whether verifiers accept it only once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub one_time: bool,
    }

    /// `toka.auth.v1.revoke`: revoke a token and every token delegated from it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RevokeRequest {
        /// Who asks: the admin key, a token with `revoke` on `token:*`, or the token itself or
        /// an ancestor of it.
        pub credential: Credential,
        /// The token to revoke.
        pub jti: TokenId,
        /// Why.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        pub reason: String,
    }

    /// The outcome of a revocation.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RevokeReply {
        /// The revoked token.
        pub jti: TokenId,
        /// The revocation epoch now.
        pub epoch: u64,
    }

    /// `toka.auth.v1.jwks` (the request body is `{}`): RFC 7517 key set.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct JwksRequest {}

    /// One public key (RFC 8037 OKP, Ed25519).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Jwk {
        /// Always `OKP`.
        pub kty: String,
        /// Always `Ed25519`.
        pub crv: String,
        /// Always `EdDSA`.
        pub alg: String,
        /// Always `sig`.
        #[serde(rename = "use")]
        pub use_: String,
        /// The key id, as in tokens' `kid` header.
        pub kid: String,
        /// The public key, base64url without padding.
        pub x: String,
    }

    /// The key set.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct JwksReply {
        /// Every key that verifies now, the signing key first.
        pub keys: Vec<Jwk>,
    }

    /// `toka.auth.v1.rotate`
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RotateRequest {
        /// Who asks (admin key, or a token with `rotate` on `token:*`).
        pub credential: Credential,
    }

    /// The outcome of a rotation.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RotateReply {
        /// The new signing key.
        pub kid: String,
        /// The key it replaces.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub previous_kid: Option<String>,
        /// When the previous key stops verifying.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub retire_at_us: Option<u64>,
    }

    /// `toka.auth.v1.revocations` (the request body is `{}`).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RevocationsRequest {}

    /// One revocation in force.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Revocation {
        /// The revoked token.
        pub jti: TokenId,
        /// When.
        pub revoked_at_us: u64,
        /// When the token would have expired; the entry can be dropped after.
        pub expires_at_us: u64,
    }

    /// Every revocation in force.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct RevocationsReply {
        /// The revocation epoch (how many revocations ever).
        pub epoch: u64,
        /// The revocations.
        pub revoked: Vec<Revocation>,
    }

    /// Published on [`crate::subject::AUTH_HEARTBEAT`] every `interval_ms`.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Heartbeat {
        /// The revocation epoch.
        pub epoch: u64,
        /// Auth's clock when sent.
        pub time_us: u64,
        /// The heartbeat interval.
        pub interval_ms: u64,
    }

    /// The claims of a Toka token (the JWT payload).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Claims {
        /// The issuer (the deployment's auth).
        pub iss: String,
        /// The subject.
        pub sub: Principal,
        /// The audience.
        pub aud: String,
        /// Expiry, seconds since the epoch.
        pub exp: u64,
        /// Not before, seconds since the epoch.
        pub nbf: u64,
        /// Issued at, seconds since the epoch.
        pub iat: u64,
        /// The token id.
        pub jti: TokenId,
        /// What it allows.
        pub caps: Vec<Capability>,
        /// Ancestors' ids, the issued root first; empty for an issued token.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub chain: Vec<TokenId>,
        /// Delegation depth: `chain.len()`.
        #[serde(default, skip_serializing_if = "crate::spec::is_default")]
        pub depth: u8,
        /// Accepted only once.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub once: bool,
    }
}
