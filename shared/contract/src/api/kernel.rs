//! The kernel's endpoints.

use serde::{Deserialize, Serialize};

use super::default_page;
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
    /// Page size, 1 to [`MAX_PAGE`](super::MAX_PAGE).
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
    /// Page size, 1 to [`MAX_PAGE`](super::MAX_PAGE).
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

/// `toka.kernel.v1.status`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// The caller's token (needs `read` on `agent:*`).
    pub token: String,
}

/// Where the sequencer stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReply {
    /// The instance that answered: the sequencer, the only one serving.
    pub instance: String,
    /// Who holds the sequencer lease, as the lease bucket says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// The last durable record of the kernel log.
    pub head_seq: u64,
    /// The state hash after it.
    pub state_hash: crate::record::Hash,
    /// Kernel instances registered with the NATS services API besides this one.
    pub standbys: u32,
}
