//! The kernel state machine: pure, deterministic, hashable.
//!
//! [`State::apply`] takes an operation and a [`Ctx`] (the sequence number and time the sequencer
//! assigned, the principal and its verified capabilities) and either refuses it, changing
//! nothing, or changes the state and returns the events it produced. It does no I/O, reads no
//! clock, draws no random number and iterates only ordered maps, so applying the same records
//! in the same order always gives the same state, byte for byte ([`State::hash`]).
//!
//! - `error`: the refusal rules.
//! - `snapshot`: the canonical, versioned binary encoding, its hash, and restore.
//!
//! Time only moves through `system.tick`: deadlines (schedule-to-start, start-to-close,
//! heartbeat) fire when a tick's time passes them, never on their own.

mod error;
mod snapshot;

use std::collections::BTreeMap;

use imbl::{OrdMap, OrdSet, Vector};

use serde::{Deserialize, Serialize};
use toka_contract::api::kernel::{AgentState, AgentView, ResourceUsage, TaskState, TaskView};
use toka_contract::capability::{self, Lineage, Target};
use toka_contract::event::{ResourceKind, TimeoutKind};
use toka_contract::op::{Requirement, Resource};
use toka_contract::spec::{AgentName, AgentSpec, ObservationKind, Principal, QueueName, TaskSpec};
use toka_contract::{AgentId, Capability, Event, KernelRecord, OpId, Operation, TaskId};

pub use error::Error;
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
            Operation::Tick {} => self.tick(ctx.time_us),
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
        if !matches!(op, Operation::Tick {}) {
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

    // ------------------------------------------------------------------ agents

    fn spawn(&mut self, spec: &AgentSpec, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        if let Some(parent) = spec.parent {
            self.running_agent(parent)?;
        }
        let id = AgentId::mint(ctx.time_us, ctx.seq, 0);
        let limits = spec.limits;
        self.agents.insert(
            id,
            Agent {
                name: spec.name.clone(),
                parent: spec.parent,
                children: OrdSet::new(),
                state: AgentState::Running,
                memory_limit: limits.memory_bytes,
                cpu_limit: limits.cpu_millicores,
                io_limit: limits.io_bytes,
                memory_bytes: 0,
                cpu_millicores: 0,
                io_bytes: 0,
                observations: 0,
                open_tasks: OrdSet::new(),
                spawned_seq: ctx.seq,
                spawned_at_us: ctx.time_us,
            },
        );
        if let Some(parent) = spec.parent.and_then(|p| self.agents.get_mut(&p)) {
            parent.children.insert(id);
        }
        Ok(vec![Event::AgentSpawned { agent: id, name: spec.name.clone(), parent: spec.parent, limits }])
    }

    fn suspend(&mut self, id: AgentId, reason: &str) -> Result<Vec<Event>, Error> {
        let open: Vec<TaskId> = self.running_agent(id)?.open_tasks.iter().copied().collect();
        self.set_agent_state(id, AgentState::Suspended);
        for task in open {
            self.unready(task);
        }
        Ok(vec![Event::AgentSuspended { agent: id, reason: reason.to_owned() }])
    }

    fn resume(&mut self, id: AgentId) -> Result<Vec<Event>, Error> {
        let agent = self.live_agent(id)?;
        if agent.state != AgentState::Suspended {
            return Err(Error::AgentNotSuspended(id));
        }
        let open: Vec<TaskId> = agent.open_tasks.iter().copied().collect();
        self.set_agent_state(id, AgentState::Running);
        for task in open {
            self.make_ready(task);
        }
        Ok(vec![Event::AgentResumed { agent: id }])
    }

    fn terminate(&mut self, id: AgentId, reason: &str) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        // The subtree in pre-order; terminated descendants have terminated subtrees already.
        let mut order = Vec::new();
        let mut stack = vec![id];
        while let Some(at) = stack.pop() {
            let Some(agent) = self.agents.get(&at) else { continue };
            if agent.state == AgentState::Terminated {
                continue;
            }
            order.push(at);
            stack.extend(agent.children.iter().rev().copied());
        }
        let mut events = Vec::new();
        for agent in order {
            let open: Vec<TaskId> =
                self.agents.get(&agent).map(|a| a.open_tasks.iter().copied().collect()).unwrap_or_default();
            for task in open {
                self.finish(task, TaskState::Cancelled);
                events.push(Event::TaskCancelled { task, reason: format!("owner {agent} terminated") });
            }
            self.set_agent_state(agent, AgentState::Terminated);
            let cascade_from = (agent != id).then_some(id);
            events.push(Event::AgentTerminated { agent, cascade_from, reason: reason.to_owned() });
        }
        Ok(events)
    }

    fn set_agent_state(&mut self, id: AgentId, state: AgentState) {
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.state = state;
        }
    }

    fn observe(&mut self, id: AgentId, kind: &ObservationKind, body: &str) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.observations += 1;
        }
        Ok(vec![Event::ObservationEmitted { agent: id, kind: kind.clone(), body: body.to_owned() }])
    }

    /// A gauge report (memory held, CPU in use): set the usage, flag a crossed limit.
    fn report(&mut self, id: AgentId, resource: ResourceKind, amount: u64) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        let Some(agent) = self.agents.get_mut(&id) else { return Err(Error::AgentNotFound(id)) };
        let (event, limit) = if resource == ResourceKind::Memory {
            agent.memory_bytes = amount;
            (Event::MemoryAllocated { agent: id, bytes: amount }, agent.memory_limit)
        } else {
            agent.cpu_millicores = amount;
            (Event::CpuUtilization { agent: id, millicores: amount }, agent.cpu_limit)
        };
        let mut events = vec![event];
        if let Some(limit) = limit.filter(|&l| amount > l) {
            events.push(Event::ResourceError { agent: id, resource, used: amount, limit });
        }
        Ok(events)
    }

    fn report_io(&mut self, id: AgentId, read_bytes: u64, write_bytes: u64, ops: u64) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        let Some(agent) = self.agents.get_mut(&id) else { return Err(Error::AgentNotFound(id)) };
        agent.io_bytes = agent.io_bytes.saturating_add(read_bytes).saturating_add(write_bytes);
        let total_bytes = agent.io_bytes;
        let mut events = vec![Event::IoOperation { agent: id, read_bytes, write_bytes, ops, total_bytes }];
        if let Some(limit) = agent.io_limit.filter(|&l| total_bytes > l) {
            events.push(Event::ResourceError { agent: id, resource: ResourceKind::Io, used: total_bytes, limit });
        }
        Ok(events)
    }

    // ------------------------------------------------------------------ tasks

    fn schedule(&mut self, spec: &TaskSpec, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        self.running_agent(spec.agent)?;
        let id = TaskId::mint(ctx.time_us, ctx.seq, 0);
        let (t, r) = (spec.timeouts, spec.retry);
        self.tasks.insert(
            id,
            Task {
                agent: spec.agent,
                queue: spec.queue.clone(),
                priority: spec.priority,
                payload: spec.payload.clone(),
                schedule_to_start_us: t.schedule_to_start_us,
                start_to_close_us: t.start_to_close_us,
                heartbeat_us: t.heartbeat_us,
                max_attempts: r.max_attempts.max(1),
                initial_backoff_us: r.initial_backoff_us,
                backoff_multiplier_pct: r.backoff_multiplier_pct,
                max_backoff_us: r.max_backoff_us,
                state: TaskState::Scheduled,
                attempt: 0,
                ready_at_us: ctx.time_us,
                claimed_by: None,
                worker: String::new(),
                deadlines: BTreeMap::new(),
                last_error: String::new(),
                result: String::new(),
                scheduled_seq: ctx.seq,
                scheduled_at_us: ctx.time_us,
            },
        );
        if let Some(agent) = self.agents.get_mut(&spec.agent) {
            agent.open_tasks.insert(id);
        }
        if let Some(d) = t.schedule_to_start_us {
            self.set_deadline(id, Deadline::ScheduleToStart, ctx.time_us.saturating_add(d));
        }
        self.make_ready(id);
        Ok(vec![Event::TaskScheduled {
            task: id,
            agent: spec.agent,
            queue: spec.queue.clone(),
            priority: spec.priority,
        }])
    }

    fn claim(&mut self, queue: &QueueName, worker: &str, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        let now = ctx.time_us;
        let key = self
            .ready
            .get(queue)
            .and_then(|ready| ready.iter().find(|k| k.ready_at_us <= now).copied())
            .ok_or_else(|| Error::EmptyQueue(queue.clone()))?;
        let id = key.task;
        self.unready(id);
        self.clear_deadline(id, Deadline::ScheduleToStart);
        let Some(task) = self.tasks.get_mut(&id) else { return Err(Error::TaskNotFound(id)) };
        task.state = TaskState::Claimed;
        task.attempt += 1;
        task.claimed_by = Some(ctx.principal.clone());
        task.worker = worker.to_owned();
        let (attempt, s2c, hb) = (task.attempt, task.start_to_close_us, task.heartbeat_us);
        if let Some(d) = s2c {
            self.set_deadline(id, Deadline::StartToClose, now.saturating_add(d));
        }
        if let Some(d) = hb {
            self.set_deadline(id, Deadline::Heartbeat, now.saturating_add(d));
        }
        Ok(vec![Event::TaskClaimed { task: id, attempt, principal: ctx.principal.clone(), worker: worker.to_owned() }])
    }

    /// The task, which `ctx.principal` must hold claimed at `attempt`.
    fn held_task(&self, id: TaskId, attempt: u32, ctx: &Ctx<'_>) -> Result<&Task, Error> {
        let task = self.task(id)?;
        if task.state != TaskState::Claimed {
            return Err(Error::TaskNotClaimed { task: id, state: task.state });
        }
        if task.claimed_by.as_ref() != Some(ctx.principal) {
            return Err(Error::ClaimedBySomeoneElse(id));
        }
        if task.attempt != attempt {
            return Err(Error::StaleAttempt { task: id, given: attempt, current: task.attempt });
        }
        Ok(task)
    }

    fn heartbeat(&mut self, id: TaskId, attempt: u32, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        if let Some(d) = self.held_task(id, attempt, ctx)?.heartbeat_us {
            self.set_deadline(id, Deadline::Heartbeat, ctx.time_us.saturating_add(d));
        }
        Ok(Vec::new())
    }

    fn complete(&mut self, id: TaskId, attempt: u32, result: &str, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        self.held_task(id, attempt, ctx)?;
        self.finish(id, TaskState::Completed);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.result = result.to_owned();
        }
        Ok(vec![Event::TaskCompleted { task: id, attempt }])
    }

    fn fail(
        &mut self,
        id: TaskId,
        attempt: u32,
        error: &str,
        retryable: bool,
        ctx: &Ctx<'_>,
    ) -> Result<Vec<Event>, Error> {
        self.held_task(id, attempt, ctx)?;
        if let Some(task) = self.tasks.get_mut(&id) {
            task.last_error = error.to_owned();
        }
        if !retryable {
            self.finish(id, TaskState::Failed);
            return Ok(vec![Event::TaskFailed { task: id, attempt, error: error.to_owned(), retry_at_us: None }]);
        }
        Ok(self.after_failed_attempt(id, ctx.time_us, |retry_at_us| Event::TaskFailed {
            task: id,
            attempt,
            error: error.to_owned(),
            retry_at_us,
        }))
    }

    /// A claimed attempt failed or timed out: retry after the backoff, or park the task when
    /// it has used its attempts. `event` builds the failure event given the retry time.
    fn after_failed_attempt(&mut self, id: TaskId, now: u64, event: impl FnOnce(Option<u64>) -> Event) -> Vec<Event> {
        let Some(task) = self.tasks.get(&id) else { return Vec::new() };
        let (attempt, reason) = (task.attempt, task.last_error.clone());
        if attempt >= task.max_attempts {
            self.finish(id, TaskState::Parked);
            return vec![event(None), Event::TaskParked { task: id, attempts: attempt, reason }];
        }
        let policy = toka_contract::spec::RetryPolicy {
            max_attempts: task.max_attempts,
            initial_backoff_us: task.initial_backoff_us,
            backoff_multiplier_pct: task.backoff_multiplier_pct,
            max_backoff_us: task.max_backoff_us,
        };
        let retry_at = now.saturating_add(policy.backoff_us(attempt));
        let s2s = task.schedule_to_start_us;
        self.clear_deadline(id, Deadline::StartToClose);
        self.clear_deadline(id, Deadline::Heartbeat);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.state = TaskState::Scheduled;
            task.claimed_by = None;
            task.worker.clear();
            task.ready_at_us = retry_at;
        }
        if let Some(d) = s2s {
            self.set_deadline(id, Deadline::ScheduleToStart, retry_at.saturating_add(d));
        }
        self.make_ready(id);
        vec![event(Some(retry_at))]
    }

    fn cancel(&mut self, id: TaskId, reason: &str) -> Result<Vec<Event>, Error> {
        let task = self.task(id)?;
        if !matches!(task.state, TaskState::Scheduled | TaskState::Claimed) {
            return Err(Error::TaskFinished { task: id, state: task.state });
        }
        self.finish(id, TaskState::Cancelled);
        Ok(vec![Event::TaskCancelled { task: id, reason: reason.to_owned() }])
    }

    fn tick(&mut self, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(&(due, id, which)) = self.deadlines.get_min() {
            if due > now {
                break;
            }
            self.clear_deadline(id, which);
            let Some(task) = self.tasks.get(&id) else { continue };
            let attempt = task.attempt;
            let timeout = which.kind();
            if let Some(task) = self.tasks.get_mut(&id) {
                task.last_error = format!("{} timeout", which.kind().as_str());
            }
            match which {
                Deadline::ScheduleToStart => {
                    self.finish(id, TaskState::TimedOut);
                    events.push(Event::TaskTimedOut { task: id, attempt, timeout, retry_at_us: None });
                }
                Deadline::StartToClose | Deadline::Heartbeat => {
                    events.extend(self.after_failed_attempt(id, now, |retry_at_us| Event::TaskTimedOut {
                        task: id,
                        attempt,
                        timeout,
                        retry_at_us,
                    }));
                }
            }
        }
        events
    }

    /// Moves a task to a final state and out of every index.
    fn finish(&mut self, id: TaskId, state: TaskState) {
        self.unready(id);
        let Some(task) = self.tasks.get_mut(&id) else { return };
        task.state = state;
        let owner = task.agent;
        let running: Vec<(Deadline, u64)> = std::mem::take(&mut task.deadlines).into_iter().collect();
        for (which, due) in running {
            self.deadlines.remove(&(due, id, which));
        }
        if let Some(agent) = self.agents.get_mut(&owner) {
            agent.open_tasks.remove(&id);
        }
    }

    /// Puts a scheduled task in its queue's ready set if its owner is running.
    fn make_ready(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else { return };
        let owner_running = self.agents.get(&task.agent).is_some_and(|a| a.state == AgentState::Running);
        if task.state == TaskState::Scheduled && owner_running {
            let key = ReadyKey { inverse_priority: u8::MAX - task.priority, ready_at_us: task.ready_at_us, task: id };
            self.ready.entry(task.queue.clone()).or_default().insert(key);
        }
    }

    /// Takes a task out of its queue's ready set, if it is there.
    fn unready(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else { return };
        let key = ReadyKey { inverse_priority: u8::MAX - task.priority, ready_at_us: task.ready_at_us, task: id };
        if let Some(ready) = self.ready.get_mut(&task.queue) {
            ready.remove(&key);
            if ready.is_empty() {
                self.ready.remove(&task.queue);
            }
        }
    }

    fn set_deadline(&mut self, id: TaskId, which: Deadline, due: u64) {
        self.clear_deadline(id, which);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.deadlines.insert(which, due);
            self.deadlines.insert((due, id, which));
        }
    }

    fn clear_deadline(&mut self, id: TaskId, which: Deadline) {
        if let Some(due) = self.tasks.get_mut(&id).and_then(|t| t.deadlines.remove(&which)) {
            self.deadlines.remove(&(due, id, which));
        }
    }

    // ------------------------------------------------------------------ queries

    /// The agent as queries show it.
    pub fn agent_view(&self, id: AgentId) -> Option<AgentView> {
        let a = self.agents.get(&id)?;
        Some(AgentView {
            agent: id,
            name: a.name.clone(),
            parent: a.parent,
            state: a.state,
            children: u32::try_from(a.children.len()).unwrap_or(u32::MAX),
            limits: toka_contract::spec::ResourceLimits {
                memory_bytes: a.memory_limit,
                cpu_millicores: a.cpu_limit,
                io_bytes: a.io_limit,
            },
            usage: ResourceUsage {
                memory_bytes: a.memory_bytes,
                cpu_millicores: a.cpu_millicores,
                io_bytes: a.io_bytes,
            },
            observations: a.observations,
            spawned_seq: a.spawned_seq,
            spawned_at_us: a.spawned_at_us,
        })
    }

    /// The task as queries show it.
    pub fn task_view(&self, id: TaskId) -> Option<TaskView> {
        let t = self.tasks.get(&id)?;
        Some(TaskView {
            task: id,
            agent: t.agent,
            queue: t.queue.clone(),
            priority: t.priority,
            state: t.state,
            attempt: t.attempt,
            max_attempts: t.max_attempts,
            claimed_by: t.claimed_by.clone(),
            deadline_us: t.deadlines.values().min().copied(),
            last_error: t.last_error.clone(),
            scheduled_seq: t.scheduled_seq,
            scheduled_at_us: t.scheduled_at_us,
        })
    }

    /// The opaque payload of a task, for the worker that claims it.
    pub fn task_payload(&self, id: TaskId) -> Option<&str> {
        self.tasks.get(&id).map(|t| t.payload.as_str())
    }

    /// Whether `caps` allow `action` on `target`, descendant patterns resolved against the tree
    /// (queries check reads with it).
    pub fn permits(&self, caps: &[Capability], action: toka_contract::Action, target: Target<'_>) -> bool {
        toka_contract::capability::allows(caps, action, target, &Tree(&self.agents))
    }

    /// Of `caps`, the one that covers `pattern` with the most actions (descent resolved against
    /// the tree): what a spawned agent's token is delegated from.
    pub fn widest_covering<'c>(
        &self,
        caps: &'c [Capability],
        pattern: &toka_contract::capability::Pattern,
    ) -> Option<&'c Capability> {
        caps.iter().filter(|c| c.resource.covers(pattern, &Tree(&self.agents))).max_by_key(|c| c.actions.iter().count())
    }

    /// Every agent id, in order.
    pub fn agent_ids(&self) -> impl Iterator<Item = AgentId> + '_ {
        self.agents.keys().copied()
    }

    /// Every task id, in order.
    pub fn task_ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.keys().copied()
    }

    /// Checks every internal invariant; `Err` names the first that fails. Tests run it after
    /// every operation; it walks the whole state, so the service does not.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut indexed_ready = 0;
        for (queue, ready) in &self.ready {
            if ready.is_empty() {
                return Err(format!("empty ready set kept for {queue}"));
            }
            for key in ready {
                let t = self.tasks.get(&key.task).ok_or(format!("ready task {} unknown", key.task))?;
                if t.state != TaskState::Scheduled || &t.queue != queue || t.ready_at_us != key.ready_at_us {
                    return Err(format!("ready index wrong for task {}", key.task));
                }
                indexed_ready += 1;
            }
        }
        let mut expected_ready = 0;
        let mut deadlines = 0;
        for (id, t) in &self.tasks {
            let owner = self.agents.get(&t.agent).ok_or(format!("task {id} has no owner"))?;
            let open = matches!(t.state, TaskState::Scheduled | TaskState::Claimed);
            if open != owner.open_tasks.contains(id) {
                return Err(format!("open-task index wrong for task {id} ({:?})", t.state));
            }
            if open && owner.state == AgentState::Terminated {
                return Err(format!("task {id} open under terminated agent {}", t.agent));
            }
            if t.state == TaskState::Scheduled && owner.state == AgentState::Running {
                expected_ready += 1;
            }
            if t.attempt > t.max_attempts {
                return Err(format!("task {id} on attempt {} of {}", t.attempt, t.max_attempts));
            }
            if (t.state == TaskState::Claimed && t.claimed_by.is_none())
                || (t.state == TaskState::Scheduled && t.claimed_by.is_some())
            {
                return Err(format!("task {id} claim holder does not match its state"));
            }
            if !open && !t.deadlines.is_empty() {
                return Err(format!("finished task {id} keeps deadlines"));
            }
            for (which, due) in &t.deadlines {
                if !self.deadlines.contains(&(*due, *id, *which)) {
                    return Err(format!("deadline of task {id} missing from the index"));
                }
                deadlines += 1;
            }
        }
        if indexed_ready != expected_ready {
            return Err(format!("{indexed_ready} tasks ready, {expected_ready} expected"));
        }
        if deadlines != self.deadlines.len() {
            return Err("deadline index holds unknown deadlines".into());
        }
        for (id, a) in &self.agents {
            if let Some(parent) = a.parent {
                let p = self.agents.get(&parent).ok_or(format!("agent {id} has unknown parent"))?;
                if !p.children.contains(id) {
                    return Err(format!("agent {id} missing from its parent's children"));
                }
                if p.state == AgentState::Terminated && a.state != AgentState::Terminated {
                    return Err(format!("agent {id} is {:?} under terminated parent {parent}", a.state));
                }
            }
        }
        if self.recent.len() != self.recent_order.len() {
            return Err("idempotency index out of step".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod model;
