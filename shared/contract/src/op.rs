//! Operations: the requests that change the kernel's state. Each accepted operation becomes one
//! record of the `kernel` log, and replay re-applies it.
//!
//! On the wire an operation is a JSON object whose `type` names it (`agent.spawn`); each type has
//! its schema `schemas/ops/<type>.v1.json`.

use serde::{Deserialize, Serialize};

use crate::capability::Action;
use crate::spec::{AgentSpec, ObservationKind, QueueName, TaskSpec};
use crate::{AgentId, TaskId};

/// A state-changing request to the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum Operation {
    /// Spawn an agent, as a root or as the child of `parent`.
    #[serde(rename = "agent.spawn")]
    SpawnAgent(AgentSpec),
    /// Suspend a running agent: its tasks stay, it may not act until resumed.
    #[serde(rename = "agent.suspend")]
    SuspendAgent {
        /// The agent.
        agent: AgentId,
        /// Why, for humans.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Resume a suspended agent.
    #[serde(rename = "agent.resume")]
    ResumeAgent {
        /// The agent.
        agent: AgentId,
    },
    /// Terminate an agent, its descendants and their open tasks.
    #[serde(rename = "agent.terminate")]
    TerminateAgent {
        /// The agent.
        agent: AgentId,
        /// Why, for humans.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Schedule a task owned by an agent.
    #[serde(rename = "task.schedule")]
    ScheduleTask(TaskSpec),
    /// Claim the next task of a queue (highest priority, then oldest).
    #[serde(rename = "task.claim")]
    ClaimTask {
        /// The queue.
        queue: QueueName,
        /// A label for the claiming worker process, for humans.
        worker: String,
    },
    /// Prove the worker holding a claim is alive.
    #[serde(rename = "task.heartbeat")]
    HeartbeatTask {
        /// The task.
        task: TaskId,
        /// The attempt the claim was for; a stale attempt is refused.
        attempt: u32,
    },
    /// Complete a claimed task.
    #[serde(rename = "task.complete")]
    CompleteTask {
        /// The task.
        task: TaskId,
        /// The attempt the claim was for.
        attempt: u32,
        /// Opaque result.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        result: String,
    },
    /// Fail a claimed task; it is retried by its policy unless `retryable` is false.
    #[serde(rename = "task.fail")]
    FailTask {
        /// The task.
        task: TaskId,
        /// The attempt the claim was for.
        attempt: u32,
        /// What went wrong.
        error: String,
        /// Whether another attempt could succeed.
        retryable: bool,
    },
    /// Cancel a task that has not finished.
    #[serde(rename = "task.cancel")]
    CancelTask {
        /// The task.
        task: TaskId,
        /// Why, for humans.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// Record something an agent observed or did.
    #[serde(rename = "observation.emit")]
    EmitObservation {
        /// The agent.
        agent: AgentId,
        /// What kind of observation.
        kind: ObservationKind,
        /// Opaque body.
        #[serde(default, skip_serializing_if = "String::is_empty")]
        body: String,
    },
    /// Report the memory an agent holds now.
    #[serde(rename = "resource.report_memory")]
    ReportMemory {
        /// The agent.
        agent: AgentId,
        /// Bytes held.
        bytes: u64,
    },
    /// Report the CPU an agent uses now.
    #[serde(rename = "resource.report_cpu")]
    ReportCpu {
        /// The agent.
        agent: AgentId,
        /// Millicores in use.
        millicores: u64,
    },
    /// Report IO an agent did since its last report.
    #[serde(rename = "resource.report_io")]
    ReportIo {
        /// The agent.
        agent: AgentId,
        /// Bytes read.
        read_bytes: u64,
        /// Bytes written.
        write_bytes: u64,
        /// Operations performed.
        ops: u64,
    },
    /// The passage of time, issued only by the sequencer; deadlines that it passes fire, in
    /// firing order, at most `max_fired` of them (the rest at later ticks), so that the record
    /// stays within the kernel's bound on a record's size.
    #[serde(rename = "system.tick")]
    Tick {
        /// The most deadlines this tick fires; absent (in logs written before the bound
        /// existed) means every passed deadline.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_fired: Option<u32>,
    },
}

/// What an operation needs from the caller's capabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement<'a> {
    /// Only the sequencer may issue it; every client submission is refused.
    SequencerOnly,
    /// `action` on `resource`.
    Capability(Action, Resource<'a>),
}

/// The resource an operation acts on, before the kernel resolves task ids against its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// The top of the agent tree (`agent:*` only).
    Root,
    /// An agent.
    Agent(AgentId),
    /// A queue named in the operation.
    Queue(&'a QueueName),
    /// The queue of the named task.
    QueueOf(TaskId),
    /// The agent that owns the named task.
    OwnerOf(TaskId),
}

impl Operation {
    /// Every operation type, in the order of the enum.
    pub const TYPES: &'static [&'static str] = &[
        "agent.spawn",
        "agent.suspend",
        "agent.resume",
        "agent.terminate",
        "task.schedule",
        "task.claim",
        "task.heartbeat",
        "task.complete",
        "task.fail",
        "task.cancel",
        "observation.emit",
        "resource.report_memory",
        "resource.report_cpu",
        "resource.report_io",
        "system.tick",
    ];

    /// The `type` of the operation on the wire.
    pub fn type_name(&self) -> &'static str {
        Self::TYPES[self.index()]
    }

    fn index(&self) -> usize {
        match self {
            Operation::SpawnAgent(_) => 0,
            Operation::SuspendAgent { .. } => 1,
            Operation::ResumeAgent { .. } => 2,
            Operation::TerminateAgent { .. } => 3,
            Operation::ScheduleTask(_) => 4,
            Operation::ClaimTask { .. } => 5,
            Operation::HeartbeatTask { .. } => 6,
            Operation::CompleteTask { .. } => 7,
            Operation::FailTask { .. } => 8,
            Operation::CancelTask { .. } => 9,
            Operation::EmitObservation { .. } => 10,
            Operation::ReportMemory { .. } => 11,
            Operation::ReportCpu { .. } => 12,
            Operation::ReportIo { .. } => 13,
            Operation::Tick { .. } => 14,
        }
    }

    /// The capability the caller must hold (the table in `ARCHITECTURE.md`).
    pub fn requirement(&self) -> Requirement<'_> {
        use Requirement::Capability as Cap;
        match self {
            Operation::SpawnAgent(spec) => match spec.parent {
                Some(parent) => Cap(Action::Spawn, Resource::Agent(parent)),
                None => Cap(Action::Spawn, Resource::Root),
            },
            Operation::SuspendAgent { agent, .. } => Cap(Action::Suspend, Resource::Agent(*agent)),
            Operation::ResumeAgent { agent } => Cap(Action::Resume, Resource::Agent(*agent)),
            Operation::TerminateAgent { agent, .. } => Cap(Action::Terminate, Resource::Agent(*agent)),
            Operation::ScheduleTask(spec) => Cap(Action::Schedule, Resource::Agent(spec.agent)),
            Operation::ClaimTask { queue, .. } => Cap(Action::Claim, Resource::Queue(queue)),
            Operation::HeartbeatTask { task, .. } => Cap(Action::Heartbeat, Resource::QueueOf(*task)),
            Operation::CompleteTask { task, .. } => Cap(Action::Complete, Resource::QueueOf(*task)),
            Operation::FailTask { task, .. } => Cap(Action::Fail, Resource::QueueOf(*task)),
            Operation::CancelTask { task, .. } => Cap(Action::Cancel, Resource::OwnerOf(*task)),
            Operation::EmitObservation { agent, .. } => Cap(Action::Observe, Resource::Agent(*agent)),
            Operation::ReportMemory { agent, .. }
            | Operation::ReportCpu { agent, .. }
            | Operation::ReportIo { agent, .. } => Cap(Action::Report, Resource::Agent(*agent)),
            Operation::Tick { .. } => Requirement::SequencerOnly,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_form_is_tagged_by_type() {
        let agent = AgentId::mint(1_000, 1, 0);
        let op = Operation::ResumeAgent { agent };
        let json = serde_json::to_value(&op).unwrap();
        assert_eq!(json, serde_json::json!({"type": "agent.resume", "agent": agent.to_string()}));
        assert_eq!(serde_json::from_value::<Operation>(json).unwrap(), op);
        let tick = serde_json::to_value(Operation::Tick { max_fired: Some(2_000) }).unwrap();
        assert_eq!(tick, serde_json::json!({"type": "system.tick", "max_fired": 2_000}));
        // A tick of a log written before the bound fires every passed deadline.
        let old: Operation = serde_json::from_value(serde_json::json!({"type": "system.tick"})).unwrap();
        assert_eq!(old, Operation::Tick { max_fired: None });
    }

    #[test]
    fn unknown_fields_and_types_are_refused() {
        let agent = AgentId::mint(1_000, 1, 0);
        assert!(
            serde_json::from_value::<Operation>(
                serde_json::json!({"type": "agent.resume", "agent": agent.to_string(), "x": 1})
            )
            .is_err()
        );
        assert!(
            serde_json::from_value::<Operation>(serde_json::json!({"type": "agent.spawn", "name": "a", "x": 1}))
                .is_err()
        );
        assert!(serde_json::from_value::<Operation>(serde_json::json!({"type": "agent.fly"})).is_err());
    }
}
