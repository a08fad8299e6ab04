//! Events: what happened, as the kernel and auth record it. A log record carries the events its
//! operation produced; storage publishes each committed event on
//! `toka.evt.<log>.<category>.<name>.<entity>`, wrapped in a CloudEvents envelope whose `type`
//! is `toka.<category>.<name>.v1`.
//!
//! On the wire an event is a JSON object whose `type` is `<category>.<name>`; each has its
//! schema `schemas/events/<category>.<name>.v1.json`.

use serde::{Deserialize, Serialize};

use crate::capability::Capability;
use crate::spec::{AgentName, ObservationKind, Principal, QueueName, ResourceLimits};
use crate::{AgentId, TaskId, TokenId};

/// Which deadline of a task passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeoutKind {
    /// Not claimed in time.
    ScheduleToStart,
    /// Claimed but not finished in time.
    StartToClose,
    /// The worker went silent.
    Heartbeat,
}

impl TimeoutKind {
    /// The wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            TimeoutKind::ScheduleToStart => "schedule_to_start",
            TimeoutKind::StartToClose => "start_to_close",
            TimeoutKind::Heartbeat => "heartbeat",
        }
    }
}

/// Which resource limit was crossed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    /// Memory held, in bytes.
    Memory,
    /// CPU in use, in millicores.
    Cpu,
    /// Bytes read and written over the lifetime.
    Io,
}

/// Something that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Event {
    /// An agent was spawned.
    #[serde(rename = "agent.spawned")]
    AgentSpawned {
        /// The new agent.
        agent: AgentId,
        /// Its name.
        name: AgentName,
        /// Its parent, if it is not a root.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent: Option<AgentId>,
        /// Its limits.
        #[serde(default, skip_serializing_if = "crate::spec::is_default")]
        limits: ResourceLimits,
    },
    /// An agent was suspended.
    #[serde(rename = "agent.suspended")]
    AgentSuspended {
        /// The agent.
        agent: AgentId,
        /// Why.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// An agent was resumed.
    #[serde(rename = "agent.resumed")]
    AgentResumed {
        /// The agent.
        agent: AgentId,
    },
    /// An agent was terminated, directly or because an ancestor was.
    #[serde(rename = "agent.terminated")]
    AgentTerminated {
        /// The agent.
        agent: AgentId,
        /// The agent whose termination caused this one, when it is not `agent` itself.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cascade_from: Option<AgentId>,
        /// Why.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// A task was scheduled.
    #[serde(rename = "task.scheduled")]
    TaskScheduled {
        /// The new task.
        task: TaskId,
        /// Its owner.
        agent: AgentId,
        /// Its queue.
        queue: QueueName,
        /// Its priority.
        #[serde(default, skip_serializing_if = "crate::spec::is_default")]
        priority: u8,
    },
    /// A worker claimed a task.
    #[serde(rename = "task.claimed")]
    TaskClaimed {
        /// The task.
        task: TaskId,
        /// The attempt this claim starts (1-based).
        attempt: u32,
        /// Who claimed it.
        principal: Principal,
        /// The worker's label.
        worker: String,
    },
    /// A task completed.
    #[serde(rename = "task.completed")]
    TaskCompleted {
        /// The task.
        task: TaskId,
        /// The attempt that completed it.
        attempt: u32,
    },
    /// An attempt failed; `retry_at_us` says when it runs again, if it does.
    #[serde(rename = "task.failed")]
    TaskFailed {
        /// The task.
        task: TaskId,
        /// The attempt that failed.
        attempt: u32,
        /// What went wrong.
        error: String,
        /// When the task becomes claimable again, in microseconds since the epoch.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at_us: Option<u64>,
    },
    /// A deadline of a task passed.
    #[serde(rename = "task.timed_out")]
    TaskTimedOut {
        /// The task.
        task: TaskId,
        /// The attempt that timed out (0 when it was never claimed).
        attempt: u32,
        /// Which deadline.
        timeout: TimeoutKind,
        /// When the task becomes claimable again, if it does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_at_us: Option<u64>,
    },
    /// A task was cancelled, directly or because its owner was terminated.
    #[serde(rename = "task.cancelled")]
    TaskCancelled {
        /// The task.
        task: TaskId,
        /// Why.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// A task used up its attempts and was set aside.
    #[serde(rename = "task.parked")]
    TaskParked {
        /// The task.
        task: TaskId,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        reason: String,
    },
    /// An agent emitted an observation.
    #[serde(rename = "observation.emitted")]
    ObservationEmitted {
        /// The agent.
        agent: AgentId,
        /// What kind.
        kind: ObservationKind,
        /// Opaque body.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        body: String,
    },
    /// An agent's memory changed.
    #[serde(rename = "resource.memory_allocated")]
    MemoryAllocated {
        /// The agent.
        agent: AgentId,
        /// Bytes held now.
        bytes: u64,
    },
    /// An agent's CPU use changed.
    #[serde(rename = "resource.cpu_utilization")]
    CpuUtilization {
        /// The agent.
        agent: AgentId,
        /// Millicores in use now.
        millicores: u64,
    },
    /// An agent did IO.
    #[serde(rename = "resource.io_operation")]
    IoOperation {
        /// The agent.
        agent: AgentId,
        /// Bytes read in this report.
        read_bytes: u64,
        /// Bytes written in this report.
        write_bytes: u64,
        /// Operations in this report.
        ops: u64,
        /// Bytes read and written over the agent's lifetime.
        total_bytes: u64,
    },
    /// An agent crossed a resource limit.
    #[serde(rename = "resource.error")]
    ResourceError {
        /// The agent.
        agent: AgentId,
        /// Which limit.
        resource: ResourceKind,
        /// The amount reported.
        used: u64,
        /// The limit.
        limit: u64,
    },
    /// A service hit an internal fault worth recording.
    #[serde(rename = "system.error")]
    SystemError {
        /// The service.
        service: String,
        /// What went wrong.
        message: String,
    },
    /// A message failed schema validation.
    #[serde(rename = "system.validation_error")]
    ValidationError {
        /// The schema id.
        schema: String,
        /// The JSON pointer of the failing value.
        pointer: String,
        /// What failed.
        message: String,
    },
    /// Auth issued a token.
    #[serde(rename = "auth.token_issued")]
    TokenIssued {
        /// The token.
        jti: TokenId,
        /// Its subject.
        sub: Principal,
        /// What it allows.
        capabilities: Vec<Capability>,
        /// When it expires, in microseconds since the epoch.
        expires_at_us: u64,
    },
    /// Auth delegated a child token.
    #[serde(rename = "auth.token_delegated")]
    TokenDelegated {
        /// The child token.
        jti: TokenId,
        /// The token it was delegated from.
        parent: TokenId,
        /// Its subject.
        sub: Principal,
        /// Its depth in the delegation chain (1 = child of an issued token).
        depth: u8,
        /// What it allows.
        capabilities: Vec<Capability>,
        /// When it expires.
        expires_at_us: u64,
    },
    /// A token and its descendants were revoked.
    #[serde(rename = "auth.token_revoked")]
    TokenRevoked {
        /// The token.
        jti: TokenId,
        /// The revocation epoch after this revocation.
        epoch: u64,
        /// Why.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
        /// When the revoked token expires, where auth knows it: the revocation is kept until
        /// then (and the leeway), not for the longest token lifetime.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at_us: Option<u64>,
    },
    /// The signing key rotated.
    #[serde(rename = "auth.key_rotated")]
    KeyRotated {
        /// The new signing key id.
        kid: String,
        /// The key it replaces, if any; it still verifies until `retire_at_us`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        previous_kid: Option<String>,
        /// When the previous key stops verifying.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retire_at_us: Option<u64>,
    },
    /// Requests were denied (aggregated per principal and interval).
    #[serde(rename = "auth.access_denied")]
    AccessDenied {
        /// Who asked.
        principal: Principal,
        /// What they asked to do.
        action: String,
        /// On what.
        resource: String,
        /// Why it was refused.
        reason: String,
        /// How many such denials this event stands for (at least 1).
        count: u32,
    },
}

impl Event {
    /// Every event type, in the order of the enum.
    pub const TYPES: &'static [&'static str] = &[
        "agent.spawned",
        "agent.suspended",
        "agent.resumed",
        "agent.terminated",
        "task.scheduled",
        "task.claimed",
        "task.completed",
        "task.failed",
        "task.timed_out",
        "task.cancelled",
        "task.parked",
        "observation.emitted",
        "resource.memory_allocated",
        "resource.cpu_utilization",
        "resource.io_operation",
        "resource.error",
        "system.error",
        "system.validation_error",
        "auth.token_issued",
        "auth.token_delegated",
        "auth.token_revoked",
        "auth.key_rotated",
        "auth.access_denied",
    ];

    /// The `type` on the wire: `<category>.<name>`.
    pub fn type_name(&self) -> &'static str {
        Self::TYPES[self.index()]
    }

    /// The category (first part of the type).
    pub fn category(&self) -> &'static str {
        self.split().0
    }

    /// The name within the category.
    pub fn name(&self) -> &'static str {
        self.split().1
    }

    fn split(&self) -> (&'static str, &'static str) {
        let t = self.type_name();
        t.split_once('.').unwrap_or((t, ""))
    }

    /// The entity the event is about, as a subject token; `None` where there is none.
    pub fn entity(&self) -> Option<String> {
        use Event::*;
        match self {
            AgentSpawned { agent, .. }
            | AgentSuspended { agent, .. }
            | AgentResumed { agent }
            | AgentTerminated { agent, .. }
            | ObservationEmitted { agent, .. }
            | MemoryAllocated { agent, .. }
            | CpuUtilization { agent, .. }
            | IoOperation { agent, .. }
            | ResourceError { agent, .. } => Some(agent.to_string()),
            TaskScheduled { task, .. }
            | TaskClaimed { task, .. }
            | TaskCompleted { task, .. }
            | TaskFailed { task, .. }
            | TaskTimedOut { task, .. }
            | TaskCancelled { task, .. }
            | TaskParked { task, .. } => Some(task.to_string()),
            TokenIssued { jti, .. } | TokenDelegated { jti, .. } | TokenRevoked { jti, .. } => Some(jti.to_string()),
            SystemError { .. } | ValidationError { .. } | KeyRotated { .. } | AccessDenied { .. } => None,
        }
    }

    fn index(&self) -> usize {
        use Event::*;
        match self {
            AgentSpawned { .. } => 0,
            AgentSuspended { .. } => 1,
            AgentResumed { .. } => 2,
            AgentTerminated { .. } => 3,
            TaskScheduled { .. } => 4,
            TaskClaimed { .. } => 5,
            TaskCompleted { .. } => 6,
            TaskFailed { .. } => 7,
            TaskTimedOut { .. } => 8,
            TaskCancelled { .. } => 9,
            TaskParked { .. } => 10,
            ObservationEmitted { .. } => 11,
            MemoryAllocated { .. } => 12,
            CpuUtilization { .. } => 13,
            IoOperation { .. } => 14,
            ResourceError { .. } => 15,
            SystemError { .. } => 16,
            ValidationError { .. } => 17,
            TokenIssued { .. } => 18,
            TokenDelegated { .. } => 19,
            TokenRevoked { .. } => 20,
            KeyRotated { .. } => 21,
            AccessDenied { .. } => 22,
        }
    }
}
