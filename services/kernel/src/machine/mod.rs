//! The kernel state machine: pure, deterministic, hashable.
//!
//! [`State::apply`] takes an operation and a [`Ctx`] (the sequence number and time the sequencer
//! assigned, the principal and its verified capabilities) and either refuses it, changing
//! nothing, or changes the state and returns the events it produced. It does no I/O, reads no
//! clock, draws no random number and iterates only ordered maps, so applying the same records
//! in the same order always gives the same state, byte for byte ([`State::hash`]).
//!
//! - `error`: the refusal rules.
//! - `agents`, `tasks`: what each operation does to agents and tasks.
//! - `views`: what queries and the sequencer read from the state.
//! - `invariants`: the internal invariants the tests check after every operation.
//! - `size`: the bound on a record's size, checked before an operation is applied.
//! - `snapshot`: the canonical, versioned binary encoding, its hash, and restore.
//!
//! Time only moves through `system.tick`: deadlines (schedule-to-start, start-to-close,
//! heartbeat) fire when a tick's time passes them, never on their own.

mod agents;
mod error;
mod invariants;
mod size;
mod snapshot;
mod tasks;
mod views;

use std::collections::BTreeMap;

use imbl::{OrdMap, OrdSet, Vector};

use serde::{Deserialize, Serialize};
use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::capability::{self, Lineage, Target};
use toka_contract::event::{ResourceKind, TimeoutKind};
use toka_contract::op::{Requirement, Resource};
use toka_contract::spec::{AgentName, Principal, QueueName};
use toka_contract::{AgentId, Capability, Event, KernelRecord, OpId, Operation, TaskId};

pub use error::Error;
pub use size::{MAX_DEADLINE_EVENTS_BYTES, RECORD_ENVELOPE_BYTES, json_len, max_fired_within};
pub use snapshot::{FORMAT_VERSION, SnapshotError, hash_encoded};

/// How far back duplicates are recognised by default, in sequence numbers.
pub const DEFAULT_IDEMPOTENCY_WINDOW: u64 = 100_000;

/// Who vouches for an operation.
#[derive(Debug, Clone, Copy)]
pub enum Authority<'a> {
    /// A client whose token verified with these capabilities.
    Client(&'a [Capability]),
    /// The sequencer itself (ticks).
    Sequencer,
    /// Replay of a record that was authorised when it was accepted.
    Replay,
}

/// What the sequencer decided about an operation before applying it.
#[derive(Debug, Clone, Copy)]
pub struct Ctx<'a> {
    /// The sequence number this operation gets if accepted: the last applied + 1.
    pub seq: u64,
    /// The sequencer's time, microseconds since the epoch; never less than the last applied.
    pub time_us: u64,
    /// The operation's idempotency key.
    pub op_id: OpId,
    /// Who submitted it.
    pub principal: &'a Principal,
    /// Why it may be applied.
    pub authority: Authority<'a>,
}

/// What applying an operation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied now; the caller logs the record with these events.
    Applied(Vec<Event>),
    /// The operation id was applied before at `seq`: nothing changed, here is the first result.
    Duplicate {
        /// The sequence of the first application.
        seq: u64,
        /// Its events.
        events: Vec<Event>,
    },
}

/// Why a record could not be replayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// The state machine refused the record's operation.
    #[error("record {seq} is refused on replay: {error}")]
    Refused {
        /// The record.
        seq: u64,
        /// Why.
        error: Error,
    },
    /// The record's operation was already applied under its id.
    #[error("record {seq} repeats operation id {op_id}")]
    Duplicate {
        /// The record.
        seq: u64,
        /// The repeated id.
        op_id: OpId,
    },
    /// Replay produced other events than the record holds.
    #[error("record {seq} replays to different events")]
    Diverged {
        /// The record.
        seq: u64,
        /// The events the record holds.
        recorded: Vec<Event>,
        /// The events replay produced.
        replayed: Vec<Event>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Agent {
    name: AgentName,
    parent: Option<AgentId>,
    children: OrdSet<AgentId>,
    state: AgentState,
    memory_limit: Option<u64>,
    cpu_limit: Option<u64>,
    io_limit: Option<u64>,
    memory_bytes: u64,
    cpu_millicores: u64,
    io_bytes: u64,
    observations: u64,
    /// Tasks it owns that are scheduled or claimed.
    open_tasks: OrdSet<TaskId>,
    spawned_seq: u64,
    spawned_at_us: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Task {
    agent: AgentId,
    queue: QueueName,
    priority: u8,
    payload: String,
    schedule_to_start_us: Option<u64>,
    start_to_close_us: Option<u64>,
    heartbeat_us: Option<u64>,
    max_attempts: u32,
    initial_backoff_us: u64,
    backoff_multiplier_pct: u32,
    max_backoff_us: u64,
    state: TaskState,
    /// The current (or last) attempt; 0 before the first claim.
    attempt: u32,
    /// When it may be claimed (later than scheduling after a failure: the backoff).
    ready_at_us: u64,
    claimed_by: Option<Principal>,
    worker: String,
    /// Running deadlines, each also in `State::deadlines`.
    deadlines: BTreeMap<Deadline, u64>,
    last_error: String,
    result: String,
    scheduled_seq: u64,
    scheduled_at_us: u64,
}

/// Which deadline; the order breaks ties between deadlines due at the same microsecond.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Deadline {
    ScheduleToStart,
    StartToClose,
    Heartbeat,
}

impl Deadline {
    fn kind(self) -> TimeoutKind {
        match self {
            Deadline::ScheduleToStart => TimeoutKind::ScheduleToStart,
            Deadline::StartToClose => TimeoutKind::StartToClose,
            Deadline::Heartbeat => TimeoutKind::Heartbeat,
        }
    }
}

/// Claim order within a queue: highest priority first, then the earliest ready, then the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct ReadyKey {
    inverse_priority: u8,
    ready_at_us: u64,
    task: TaskId,
}

/// A remembered result, for idempotent retries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Remembered {
    seq: u64,
    principal: Principal,
    #[serde(with = "snapshot::as_json")]
    op: Operation,
    #[serde(with = "snapshot::as_json")]
    events: Vec<Event>,
}

/// The kernel's state: agents, tasks, their indexes, and recent operation ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    idempotency_window: u64,
    last_seq: u64,
    last_time_us: u64,
    agents: OrdMap<AgentId, Agent>,
    tasks: OrdMap<TaskId, Task>,
    /// Scheduled tasks whose owner is running, per queue, in claim order.
    ready: OrdMap<QueueName, OrdSet<ReadyKey>>,
    /// Every running deadline, in firing order.
    deadlines: OrdSet<(u64, TaskId, Deadline)>,
    recent: OrdMap<OpId, Remembered>,
    /// `recent` in sequence order, for expiry.
    recent_order: Vector<(u64, OpId)>,
}

impl Default for State {
    fn default() -> Self {
        State::new(DEFAULT_IDEMPOTENCY_WINDOW)
    }
}

/// The agent tree as a [`Lineage`] for capability checks.
struct Tree<'a>(&'a OrdMap<AgentId, Agent>);

impl Lineage for Tree<'_> {
    fn is_descendant(&self, agent: AgentId, ancestor: AgentId) -> bool {
        let mut at = self.0.get(&agent).and_then(|a| a.parent);
        while let Some(id) = at {
            if id == ancestor {
                return true;
            }
            at = self.0.get(&id).and_then(|a| a.parent);
        }
        false
    }
}

impl State {
    /// An empty state that recognises duplicate operation ids applied within the last
    /// `idempotency_window` sequence numbers.
    pub fn new(idempotency_window: u64) -> Self {
        State {
            idempotency_window,
            last_seq: 0,
            last_time_us: 0,
            agents: OrdMap::new(),
            tasks: OrdMap::new(),
            ready: OrdMap::new(),
            deadlines: OrdSet::new(),
            recent: OrdMap::new(),
            recent_order: Vector::new(),
        }
    }

    /// The sequence of the last applied operation (0 for none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// The time of the last applied operation.
    pub fn last_time_us(&self) -> u64 {
        self.last_time_us
    }

    /// The earliest running deadline: the sequencer issues a tick once its clock passes it.
    pub fn next_deadline_us(&self) -> Option<u64> {
        self.deadlines.get_min().map(|d| d.0)
    }

    /// Applies `op` as the sequencer decided in `ctx`. On `Err` nothing changed.
    pub fn apply(&mut self, op: &Operation, ctx: &Ctx<'_>) -> Result<Outcome, Error> {
        // Entries past the window are evicted when the next operation is remembered; until then
        // they are ignored here.
        let window_start = (self.last_seq + 1).saturating_sub(self.idempotency_window);
        if let Some(first) = self.recent.get(&ctx.op_id).filter(|f| f.seq > window_start) {
            if first.principal != *ctx.principal || first.op != *op {
                return Err(Error::OpIdReused(ctx.op_id));
            }
            return Ok(Outcome::Duplicate { seq: first.seq, events: first.events.clone() });
        }
        if ctx.seq != self.last_seq + 1 {
            return Err(Error::OutOfSequence { last: self.last_seq, given: ctx.seq });
        }
        if ctx.time_us < self.last_time_us {
            return Err(Error::ClockWentBack { last: self.last_time_us, given: ctx.time_us });
        }
        self.authorize(op, ctx)?;
        let events = match op {
            Operation::SpawnAgent(spec) => self.spawn(spec, ctx)?,
            Operation::SuspendAgent { agent, reason } => self.suspend(*agent, reason)?,
            Operation::ResumeAgent { agent } => self.resume(*agent)?,
            Operation::TerminateAgent { agent, reason } => self.terminate(*agent, reason)?,
            Operation::ScheduleTask(spec) => self.schedule(spec, ctx)?,
            Operation::ClaimTask { queue, worker } => self.claim(queue, worker, ctx)?,
            Operation::HeartbeatTask { task, attempt } => self.heartbeat(*task, *attempt, ctx)?,
            Operation::CompleteTask { task, attempt, result } => self.complete(*task, *attempt, result, ctx)?,
            Operation::FailTask { task, attempt, error, retryable } => {
                self.fail(*task, *attempt, error, *retryable, ctx)?
            }
            Operation::CancelTask { task, reason } => self.cancel(*task, reason)?,
            Operation::EmitObservation { agent, kind, body } => self.observe(*agent, kind, body)?,
            Operation::ReportMemory { agent, bytes } => self.report(*agent, ResourceKind::Memory, *bytes)?,
            Operation::ReportCpu { agent, millicores } => self.report(*agent, ResourceKind::Cpu, *millicores)?,
            Operation::ReportIo { agent, read_bytes, write_bytes, ops } => {
                self.report_io(*agent, *read_bytes, *write_bytes, *ops)?
            }
            Operation::Tick { max_fired } => self.tick(ctx.time_us, *max_fired),
        };
        self.last_seq = ctx.seq;
        self.last_time_us = ctx.time_us;
        self.remember(op, ctx, &events);
        Ok(Outcome::Applied(events))
    }

    /// Re-applies a logged record and checks that it produces exactly the recorded events.
    /// On `Err` the state may be partly advanced and must be discarded.
    pub fn replay(&mut self, record: &KernelRecord) -> Result<(), ReplayError> {
        let ctx = Ctx {
            seq: record.seq,
            time_us: record.time_us,
            op_id: record.op_id,
            principal: &record.principal,
            authority: Authority::Replay,
        };
        match self.apply(&record.op, &ctx) {
            Ok(Outcome::Applied(events)) if events == record.events => Ok(()),
            Ok(Outcome::Applied(events)) => {
                Err(ReplayError::Diverged { seq: record.seq, recorded: record.events.clone(), replayed: events })
            }
            Ok(Outcome::Duplicate { .. }) => Err(ReplayError::Duplicate { seq: record.seq, op_id: record.op_id }),
            Err(error) => Err(ReplayError::Refused { seq: record.seq, error }),
        }
    }

    fn authorize(&self, op: &Operation, ctx: &Ctx<'_>) -> Result<(), Error> {
        let caps = match (op.requirement(), ctx.authority) {
            (_, Authority::Replay) => return Ok(()),
            (Requirement::SequencerOnly, Authority::Sequencer) => return Ok(()),
            (Requirement::SequencerOnly, Authority::Client(_)) => return Err(Error::SequencerOnly),
            (Requirement::Capability(..), Authority::Sequencer) => &[][..],
            (Requirement::Capability(..), Authority::Client(caps)) => caps,
        };
        let Requirement::Capability(action, resource) = op.requirement() else { return Ok(()) };
        let target = match resource {
            Resource::Root => Target::Root,
            Resource::Agent(id) => Target::Agent(id),
            Resource::Queue(q) => Target::Queue(q),
            Resource::QueueOf(task) => Target::Queue(&self.task(task)?.queue),
            Resource::OwnerOf(task) => Target::Agent(self.task(task)?.agent),
        };
        if capability::allows(caps, action, target, &Tree(&self.agents)) {
            Ok(())
        } else {
            Err(Error::Forbidden { action, resource: target.to_string() })
        }
    }

    fn remember(&mut self, op: &Operation, ctx: &Ctx<'_>, events: &[Event]) {
        // Ticks come from the sequencer and are never retried by a client.
        if !matches!(op, Operation::Tick { .. }) {
            let first =
                Remembered { seq: ctx.seq, principal: ctx.principal.clone(), op: op.clone(), events: events.to_vec() };
            self.recent.insert(ctx.op_id, first);
            self.recent_order.push_back((ctx.seq, ctx.op_id));
        }
        while let Some(&(seq, id)) = self.recent_order.front() {
            if seq > (ctx.seq + 1).saturating_sub(self.idempotency_window) {
                break;
            }
            self.recent_order.pop_front();
            self.recent.remove(&id);
        }
    }

    fn agent(&self, id: AgentId) -> Result<&Agent, Error> {
        self.agents.get(&id).ok_or(Error::AgentNotFound(id))
    }

    fn task(&self, id: TaskId) -> Result<&Task, Error> {
        self.tasks.get(&id).ok_or(Error::TaskNotFound(id))
    }

    /// The agent, which must not be terminated.
    fn live_agent(&self, id: AgentId) -> Result<&Agent, Error> {
        let agent = self.agent(id)?;
        if agent.state == AgentState::Terminated {
            return Err(Error::AgentTerminated(id));
        }
        Ok(agent)
    }

    /// The agent, which must be running.
    fn running_agent(&self, id: AgentId) -> Result<&Agent, Error> {
        let agent = self.live_agent(id)?;
        if agent.state != AgentState::Running {
            return Err(Error::AgentNotRunning { agent: id, state: agent.state });
        }
        Ok(agent)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model;
