//! Why the state machine refused an operation. Each variant is one rule, with a stable name
//! ([`Error::rule`]) and the wire code it maps to ([`Error::code`]); the table is in
//! `ARCHITECTURE.md`. A refusal changes nothing and is not logged.

use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::spec::QueueName;
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Action, AgentId, OpId, TaskId};

/// A refused operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No capability of the caller allows the action on the target.
    #[error("no capability allows {action} on {resource}")]
    Forbidden {
        /// The action needed.
        action: Action,
        /// The resource, in the capability grammar.
        resource: String,
    },
    /// Only the sequencer issues this operation.
    #[error("only the sequencer may issue system.tick")]
    SequencerOnly,
    /// The agent does not exist.
    #[error("agent {0} does not exist")]
    AgentNotFound(AgentId),
    /// The task does not exist.
    #[error("task {0} does not exist")]
    TaskNotFound(TaskId),
    /// No task of the queue is ready to be claimed.
    #[error("queue {0} has no task ready to claim")]
    EmptyQueue(QueueName),
    /// The agent is terminated; nothing can act on it or under it.
    #[error("agent {0} is terminated")]
    AgentTerminated(AgentId),
    /// The agent must be running for this (suspend, spawn under it, schedule on it).
    #[error("agent {agent} is {state:?}, not running")]
    AgentNotRunning {
        /// The agent.
        agent: AgentId,
        /// Its state.
        state: AgentState,
    },
    /// Only a suspended agent can be resumed.
    #[error("agent {0} is running, not suspended")]
    AgentNotSuspended(AgentId),
    /// Heartbeat, complete and fail need a claimed task.
    #[error("task {task} is {state:?}, not claimed")]
    TaskNotClaimed {
        /// The task.
        task: TaskId,
        /// Its state.
        state: TaskState,
    },
    /// The claim is held by another principal.
    #[error("task {0} is claimed by someone else")]
    ClaimedBySomeoneElse(TaskId),
    /// The attempt named is not the current one (the claim timed out and the task moved on).
    #[error("task {task} is on attempt {current}, not {given}")]
    StaleAttempt {
        /// The task.
        task: TaskId,
        /// The attempt the caller named.
        given: u32,
        /// The current attempt.
        current: u32,
    },
    /// The task already finished; it cannot be cancelled.
    #[error("task {task} is already {state:?}")]
    TaskFinished {
        /// The task.
        task: TaskId,
        /// Its final state.
        state: TaskState,
    },
    /// The operation id was used before for a different operation or by another principal.
    #[error("operation id {0} was already used for a different operation")]
    OpIdReused(OpId),
    /// The operation's record could exceed the bound on a record's size (a terminate of a very
    /// large subtree, or an operation with very large texts).
    #[error("the record of this operation could reach {bytes} bytes, over kernel.max_record_bytes = {limit}")]
    RecordTooLarge {
        /// What the record could come to.
        bytes: usize,
        /// The bound.
        limit: usize,
    },
    /// The sequencer handed out a sequence that does not follow the last one (a sequencer bug).
    #[error("sequence {given} does not follow {last}")]
    OutOfSequence {
        /// The last applied sequence.
        last: u64,
        /// The sequence given.
        given: u64,
    },
    /// The sequencer's clock went backwards (a sequencer bug: it must use max(now, last)).
    #[error("time {given} µs is before the last applied time {last} µs")]
    ClockWentBack {
        /// The last applied time.
        last: u64,
        /// The time given.
        given: u64,
    },
}

impl Error {
    /// The stable name of the rule that refused the operation.
    pub fn rule(&self) -> &'static str {
        match self {
            Error::Forbidden { .. } => "auth.forbidden",
            Error::SequencerOnly => "auth.sequencer_only",
            Error::AgentNotFound(_) => "agent.not_found",
            Error::TaskNotFound(_) => "task.not_found",
            Error::EmptyQueue(_) => "queue.empty",
            Error::AgentTerminated(_) => "agent.terminated",
            Error::AgentNotRunning { .. } => "agent.not_running",
            Error::AgentNotSuspended(_) => "agent.not_suspended",
            Error::TaskNotClaimed { .. } => "task.not_claimed",
            Error::ClaimedBySomeoneElse(_) => "task.claimed_by_other",
            Error::StaleAttempt { .. } => "task.stale_attempt",
            Error::TaskFinished { .. } => "task.finished",
            Error::OpIdReused(_) => "op.id_reused",
            Error::RecordTooLarge { .. } => "record.too_large",
            Error::OutOfSequence { .. } => "sequencer.out_of_sequence",
            Error::ClockWentBack { .. } => "sequencer.clock_went_back",
        }
    }

    /// The wire code of the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Forbidden { .. } | Error::SequencerOnly | Error::ClaimedBySomeoneElse(_) => ErrorCode::Forbidden,
            Error::AgentNotFound(_) | Error::TaskNotFound(_) | Error::EmptyQueue(_) => ErrorCode::NotFound,
            Error::AgentTerminated(_)
            | Error::AgentNotRunning { .. }
            | Error::AgentNotSuspended(_)
            | Error::TaskNotClaimed { .. }
            | Error::StaleAttempt { .. }
            | Error::TaskFinished { .. }
            | Error::OpIdReused(_) => ErrorCode::Conflict,
            Error::RecordTooLarge { .. } => ErrorCode::TooLarge,
            Error::OutOfSequence { .. } | Error::ClockWentBack { .. } => ErrorCode::Internal,
        }
    }
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        let wire = match e {
            Error::RecordTooLarge { bytes, limit } => {
                WireError::too_large(e.to_string(), "kernel.max_record_bytes", *limit as u64, Some(*bytes as u64))
            }
            _ => WireError::new(e.code(), e.to_string()),
        };
        let wire = wire.with_detail("rule", e.rule());
        match e {
            Error::Forbidden { resource, .. } => wire.with_detail("resource", resource.as_str()),
            _ => wire,
        }
    }
}
