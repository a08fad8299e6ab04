//! One test per operation and per refusal rule. Every refusal is also checked to leave the
//! state byte-for-byte unchanged, and every test's log is replayed at the end.

use toka_contract::record::Hash;
use toka_contract::spec::{AgentSpec, ObservationKind, ResourceLimits, RetryPolicy, TaskSpec, Timeouts};
use toka_contract::wire::WireError;
use toka_contract::{Action, Pattern, Record};

use super::*;

const T0: u64 = 1_764_150_000_000_000;

fn all_agent_and_task_actions() -> Vec<Capability> {
    use Action::*;
    vec![
        Capability::new(
            Pattern::AnyAgent,
            &[Spawn, Suspend, Resume, Terminate, Schedule, Cancel, Observe, Report, Read],
        ),
        Capability::new(Pattern::AnyQueue, &[Claim, Heartbeat, Complete, Fail, Read]),
    ]
}

/// A sequencer in miniature: assigns sequence and time, keeps the log.
struct Harness {
    state: State,
    time: u64,
    next_op: u128,
    admin: Principal,
    caps: Vec<Capability>,
    log: Vec<KernelRecord>,
}

impl Harness {
    fn new() -> Self {
        Harness {
            state: State::default(),
            time: T0,
            next_op: 1,
            admin: "operator".parse().unwrap(),
            caps: all_agent_and_task_actions(),
            log: Vec::new(),
        }
    }

    fn op_id(&mut self) -> OpId {
        self.next_op += 1;
        OpId::from_u128(self.next_op << 20)
    }

    fn submit_with(
        &mut self,
        op_id: OpId,
        principal: &Principal,
        caps: &[Capability],
        op: Operation,
    ) -> Result<Outcome, Error> {
        self.time += 10;
        let before = self.state.hash().unwrap();
        let authority = if matches!(op, Operation::Tick { .. }) && caps.is_empty() {
            Authority::Sequencer
        } else {
            Authority::Client(caps)
        };
        let ctx = Ctx { seq: self.state.last_seq() + 1, time_us: self.time, op_id, principal, authority };
        let result = self.state.apply(&op, &ctx);
        match &result {
            Ok(Outcome::Applied(events)) => {
                let prev = self.log.last().map_or(Hash::ZERO, |r| r.hash);
                let r = Record::seal(ctx.seq, op_id, principal.clone(), ctx.time_us, op, events.clone(), prev).unwrap();
                self.log.push(r);
            }
            Ok(Outcome::Duplicate { .. }) | Err(_) => {
                assert_eq!(self.state.hash().unwrap(), before, "a refusal or duplicate changed the state");
            }
        }
        self.state.check_invariants().unwrap();
        result
    }

    fn submit_as(&mut self, principal: &str, caps: &[Capability], op: Operation) -> Result<Vec<Event>, Error> {
        let id = self.op_id();
        match self.submit_with(id, &principal.parse().unwrap(), caps, op)? {
            Outcome::Applied(events) => Ok(events),
            Outcome::Duplicate { .. } => panic!("fresh op id reported as duplicate"),
        }
    }

    fn try_op(&mut self, op: Operation) -> Result<Vec<Event>, Error> {
        let (admin, caps) = (self.admin.to_string(), self.caps.clone());
        self.submit_as(&admin, &caps, op)
    }

    fn ok(&mut self, op: Operation) -> Vec<Event> {
        self.try_op(op).unwrap()
    }

    fn err(&mut self, op: Operation) -> Error {
        self.try_op(op).unwrap_err()
    }

    /// A tick at `time` (which must not be in the past).
    fn tick_at(&mut self, time: u64) -> Vec<Event> {
        self.tick_at_most(time, None)
    }

    /// A tick at `time` firing at most `max_fired` deadlines.
    fn tick_at_most(&mut self, time: u64, max_fired: Option<u32>) -> Vec<Event> {
        self.time = time - 10;
        let id = self.op_id();
        let kernel: Principal = "toka-kernel".parse().unwrap();
        match self.submit_with(id, &kernel, &[], Operation::Tick { max_fired }).unwrap() {
            Outcome::Applied(events) => events,
            Outcome::Duplicate { .. } => unreachable!(),
        }
    }

    fn spawn(&mut self, parent: Option<AgentId>) -> AgentId {
        let spec = AgentSpec { name: "a".parse().unwrap(), parent, limits: ResourceLimits::default() };
        match self.ok(Operation::SpawnAgent(spec)).as_slice() {
            [Event::AgentSpawned { agent, .. }] => *agent,
            other => panic!("{other:?}"),
        }
    }

    fn schedule_with(
        &mut self,
        agent: AgentId,
        queue: &str,
        priority: u8,
        timeouts: Timeouts,
        retry: RetryPolicy,
    ) -> TaskId {
        let spec = TaskSpec { agent, queue: queue.parse().unwrap(), payload: "p".into(), priority, timeouts, retry };
        match self.ok(Operation::ScheduleTask(spec)).as_slice() {
            [Event::TaskScheduled { task, .. }] => *task,
            other => panic!("{other:?}"),
        }
    }

    fn schedule(&mut self, agent: AgentId, queue: &str) -> TaskId {
        self.schedule_with(agent, queue, 0, Timeouts::default(), RetryPolicy::default())
    }

    fn claim(&mut self, queue: &str) -> (TaskId, u32) {
        match self.ok(Operation::ClaimTask { queue: queue.parse().unwrap(), worker: "w".into() }).as_slice() {
            [Event::TaskClaimed { task, attempt, .. }] => (*task, *attempt),
            other => panic!("{other:?}"),
        }
    }

    fn task_state(&self, task: TaskId) -> TaskState {
        self.state.task_view(task).unwrap().state
    }

    fn agent_state(&self, agent: AgentId) -> AgentState {
        self.state.agent_view(agent).unwrap().state
    }

    /// Replays the log into a fresh state and compares hashes.
    fn assert_replays(&self) {
        let mut fresh = State::new(self.state.idempotency_window);
        for r in &self.log {
            fresh.replay(r).unwrap();
        }
        assert_eq!(fresh.hash().unwrap(), self.state.hash().unwrap());
        toka_contract::record::verify_chain(&self.log, 0, Hash::ZERO).unwrap();
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.assert_replays();
        }
    }
}

fn queue(s: &str) -> QueueName {
    s.parse().unwrap()
}

// ------------------------------------------------------------------ agents

#[test]
fn spawn_root_and_child() {
    let mut h = Harness::new();
    let root = h.spawn(None);
    assert_eq!(root, AgentId::mint(h.time, 1, 0), "ids derive from the log position");
    let child = h.spawn(Some(root));
    let view = h.state.agent_view(child).unwrap();
    assert_eq!((view.parent, view.state, view.spawned_seq), (Some(root), AgentState::Running, 2));
    assert_eq!(h.state.agent_view(root).unwrap().children, 1);
}

#[test]
fn spawn_under_missing_terminated_or_suspended_parent_is_refused() {
    let mut h = Harness::new();
    let missing = AgentId::mint(1, 99, 0);
    let spec = |parent| {
        Operation::SpawnAgent(AgentSpec {
            name: "x".parse().unwrap(),
            parent: Some(parent),
            limits: ResourceLimits::default(),
        })
    };
    assert_eq!(h.err(spec(missing)), Error::AgentNotFound(missing));
    let gone = h.spawn(None);
    h.ok(Operation::TerminateAgent { agent: gone, reason: String::new() });
    assert_eq!(h.err(spec(gone)), Error::AgentTerminated(gone));
    let paused = h.spawn(None);
    h.ok(Operation::SuspendAgent { agent: paused, reason: String::new() });
    assert_eq!(h.err(spec(paused)), Error::AgentNotRunning { agent: paused, state: AgentState::Suspended });
}

#[test]
fn suspend_and_resume() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let events = h.ok(Operation::SuspendAgent { agent: a, reason: "budget".into() });
    assert_eq!(events, [Event::AgentSuspended { agent: a, reason: "budget".into() }]);
    assert_eq!(h.agent_state(a), AgentState::Suspended);
    assert_eq!(h.ok(Operation::ResumeAgent { agent: a }), [Event::AgentResumed { agent: a }]);
    assert_eq!(h.agent_state(a), AgentState::Running);
}

#[test]
fn suspend_refusals() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    h.ok(Operation::SuspendAgent { agent: a, reason: String::new() });
    assert_eq!(
        h.err(Operation::SuspendAgent { agent: a, reason: String::new() }),
        Error::AgentNotRunning { agent: a, state: AgentState::Suspended }
    );
    let missing = AgentId::mint(1, 99, 0);
    assert_eq!(h.err(Operation::SuspendAgent { agent: missing, reason: String::new() }), Error::AgentNotFound(missing));
}

#[test]
fn resume_a_running_or_terminated_agent_is_refused() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    assert_eq!(h.err(Operation::ResumeAgent { agent: a }), Error::AgentNotSuspended(a));
    h.ok(Operation::TerminateAgent { agent: a, reason: String::new() });
    assert_eq!(h.err(Operation::ResumeAgent { agent: a }), Error::AgentTerminated(a));
}

#[test]
fn a_suspended_agents_tasks_wait_until_it_resumes() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let t = h.schedule(a, "q");
    h.ok(Operation::SuspendAgent { agent: a, reason: String::new() });
    assert_eq!(h.err(Operation::ClaimTask { queue: queue("q"), worker: "w".into() }), Error::EmptyQueue(queue("q")));
    assert_eq!(
        h.err(Operation::ScheduleTask(TaskSpec {
            agent: a,
            queue: queue("q"),
            payload: String::new(),
            priority: 0,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default()
        })),
        Error::AgentNotRunning { agent: a, state: AgentState::Suspended }
    );
    h.ok(Operation::ResumeAgent { agent: a });
    assert_eq!(h.claim("q").0, t);
}

#[test]
fn terminate_cascades_to_descendants_and_their_tasks() {
    let mut h = Harness::new();
    let root = h.spawn(None);
    let child = h.spawn(Some(root));
    let grandchild = h.spawn(Some(child));
    let sibling = h.spawn(None);
    let waiting = h.schedule(grandchild, "q");
    let held = h.schedule(child, "q");
    let other = h.schedule(sibling, "q");
    assert_eq!(h.claim("q").0, waiting);
    let _ = held;
    let events = h.ok(Operation::TerminateAgent { agent: child, reason: "done".into() });
    assert_eq!(
        events,
        [
            Event::TaskCancelled { task: held, reason: format!("owner {child} terminated") },
            Event::AgentTerminated { agent: child, cascade_from: None, reason: "done".into() },
            Event::TaskCancelled { task: waiting, reason: format!("owner {grandchild} terminated") },
            Event::AgentTerminated { agent: grandchild, cascade_from: Some(child), reason: "done".into() },
        ]
    );
    assert_eq!(h.agent_state(root), AgentState::Running);
    assert_eq!(h.agent_state(grandchild), AgentState::Terminated);
    assert_eq!((h.task_state(waiting), h.task_state(held)), (TaskState::Cancelled, TaskState::Cancelled));
    assert_eq!(h.task_state(other), TaskState::Scheduled);
    assert_eq!(
        h.err(Operation::TerminateAgent { agent: grandchild, reason: String::new() }),
        Error::AgentTerminated(grandchild)
    );
    // Terminating the root now skips the terminated subtree.
    let events = h.ok(Operation::TerminateAgent { agent: root, reason: String::new() });
    assert_eq!(events.len(), 1);
}

#[test]
fn observations_are_recorded_and_counted() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let kind: ObservationKind = "tool.call".parse().unwrap();
    let events = h.ok(Operation::EmitObservation { agent: a, kind: kind.clone(), body: "{}".into() });
    assert_eq!(events, [Event::ObservationEmitted { agent: a, kind: kind.clone(), body: "{}".into() }]);
    h.ok(Operation::EmitObservation { agent: a, kind: kind.clone(), body: String::new() });
    assert_eq!(h.state.agent_view(a).unwrap().observations, 2);
    h.ok(Operation::TerminateAgent { agent: a, reason: String::new() });
    assert_eq!(h.err(Operation::EmitObservation { agent: a, kind, body: String::new() }), Error::AgentTerminated(a));
}

#[test]
fn resource_reports_update_usage_and_flag_crossed_limits() {
    let mut h = Harness::new();
    let limits = ResourceLimits { memory_bytes: Some(1000), cpu_millicores: Some(500), io_bytes: Some(100) };
    let a = match h.ok(Operation::SpawnAgent(AgentSpec { name: "a".parse().unwrap(), parent: None, limits })).as_slice()
    {
        [Event::AgentSpawned { agent, limits: l, .. }] if *l == limits => *agent,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        h.ok(Operation::ReportMemory { agent: a, bytes: 1000 }),
        [Event::MemoryAllocated { agent: a, bytes: 1000 }]
    );
    assert_eq!(
        h.ok(Operation::ReportMemory { agent: a, bytes: 1001 }),
        [
            Event::MemoryAllocated { agent: a, bytes: 1001 },
            Event::ResourceError { agent: a, resource: ResourceKind::Memory, used: 1001, limit: 1000 }
        ]
    );
    assert_eq!(
        h.ok(Operation::ReportCpu { agent: a, millicores: 750 }),
        [
            Event::CpuUtilization { agent: a, millicores: 750 },
            Event::ResourceError { agent: a, resource: ResourceKind::Cpu, used: 750, limit: 500 }
        ]
    );
    assert_eq!(
        h.ok(Operation::ReportIo { agent: a, read_bytes: 60, write_bytes: 40, ops: 2 }),
        [Event::IoOperation { agent: a, read_bytes: 60, write_bytes: 40, ops: 2, total_bytes: 100 }]
    );
    assert_eq!(
        h.ok(Operation::ReportIo { agent: a, read_bytes: 1, write_bytes: 0, ops: 1 }),
        [
            Event::IoOperation { agent: a, read_bytes: 1, write_bytes: 0, ops: 1, total_bytes: 101 },
            Event::ResourceError { agent: a, resource: ResourceKind::Io, used: 101, limit: 100 }
        ]
    );
    let usage = h.state.agent_view(a).unwrap().usage;
    assert_eq!((usage.memory_bytes, usage.cpu_millicores, usage.io_bytes), (1001, 750, 101));
    let missing = AgentId::mint(1, 99, 0);
    assert_eq!(h.err(Operation::ReportCpu { agent: missing, millicores: 1 }), Error::AgentNotFound(missing));
}

// ------------------------------------------------------------------ tasks

#[test]
fn schedule_on_missing_or_terminated_agent_is_refused() {
    let mut h = Harness::new();
    let spec = |agent| {
        Operation::ScheduleTask(TaskSpec {
            agent,
            queue: queue("q"),
            payload: String::new(),
            priority: 0,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        })
    };
    let missing = AgentId::mint(1, 99, 0);
    assert_eq!(h.err(spec(missing)), Error::AgentNotFound(missing));
    let a = h.spawn(None);
    h.ok(Operation::TerminateAgent { agent: a, reason: String::new() });
    assert_eq!(h.err(spec(a)), Error::AgentTerminated(a));
}

#[test]
fn claim_takes_highest_priority_then_oldest_per_queue() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let low = h.schedule_with(a, "q", 1, Timeouts::default(), RetryPolicy::default());
    let high_old = h.schedule_with(a, "q", 9, Timeouts::default(), RetryPolicy::default());
    let high_new = h.schedule_with(a, "q", 9, Timeouts::default(), RetryPolicy::default());
    let elsewhere = h.schedule_with(a, "other", 255, Timeouts::default(), RetryPolicy::default());
    assert_eq!(h.claim("q").0, high_old);
    assert_eq!(h.claim("q").0, high_new);
    assert_eq!(h.claim("q"), (low, 1));
    assert_eq!(h.err(Operation::ClaimTask { queue: queue("q"), worker: "w".into() }), Error::EmptyQueue(queue("q")));
    assert_eq!(h.claim("other").0, elsewhere);
    let view = h.state.task_view(low).unwrap();
    assert_eq!((view.state, view.claimed_by.map(|p| p.to_string())), (TaskState::Claimed, Some("operator".into())));
    assert_eq!(h.state.task_payload(low), Some("p"));
}

#[test]
fn complete_a_claimed_task() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let t = h.schedule(a, "q");
    let (_, attempt) = h.claim("q");
    let events = h.ok(Operation::CompleteTask { task: t, attempt, result: "42".into() });
    assert_eq!(events, [Event::TaskCompleted { task: t, attempt: 1 }]);
    assert_eq!(h.task_state(t), TaskState::Completed);
    assert_eq!(
        h.err(Operation::CompleteTask { task: t, attempt, result: String::new() }),
        Error::TaskNotClaimed { task: t, state: TaskState::Completed }
    );
}

#[test]
fn only_the_claim_holder_at_the_current_attempt_may_act() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let t = h.schedule(a, "q");
    let caps = all_agent_and_task_actions();
    assert_eq!(
        h.err(Operation::HeartbeatTask { task: t, attempt: 0 }),
        Error::TaskNotClaimed { task: t, state: TaskState::Scheduled }
    );
    let (_, attempt) = h.claim("q");
    assert_eq!(
        h.submit_as("someone-else", &caps, Operation::CompleteTask { task: t, attempt, result: String::new() }),
        Err(Error::ClaimedBySomeoneElse(t))
    );
    assert_eq!(
        h.err(Operation::FailTask { task: t, attempt: 7, error: "x".into(), retryable: true }),
        Error::StaleAttempt { task: t, given: 7, current: 1 }
    );
    let missing = TaskId::mint(1, 99, 0);
    assert_eq!(h.err(Operation::HeartbeatTask { task: missing, attempt: 1 }), Error::TaskNotFound(missing));
}

#[test]
fn failure_retries_with_backoff_then_parks() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff_us: 1_000,
        backoff_multiplier_pct: 300,
        max_backoff_us: 1_000_000,
    };
    let t = h.schedule_with(a, "q", 0, Timeouts::default(), retry);
    let mut expected_backoff = [1_000, 3_000].into_iter();
    for attempt in 1..=2 {
        assert_eq!(h.claim("q"), (t, attempt));
        let events = h.ok(Operation::FailTask { task: t, attempt, error: "flaky".into(), retryable: true });
        let retry_at = h.time + expected_backoff.next().unwrap();
        assert_eq!(
            events,
            [Event::TaskFailed { task: t, attempt, error: "flaky".into(), retry_at_us: Some(retry_at) }]
        );
        // Not claimable during the backoff, claimable after it.
        assert_eq!(
            h.err(Operation::ClaimTask { queue: queue("q"), worker: "w".into() }),
            Error::EmptyQueue(queue("q"))
        );
        h.time = retry_at;
    }
    assert_eq!(h.claim("q"), (t, 3));
    let events = h.ok(Operation::FailTask { task: t, attempt: 3, error: "flaky".into(), retryable: true });
    assert_eq!(
        events,
        [
            Event::TaskFailed { task: t, attempt: 3, error: "flaky".into(), retry_at_us: None },
            Event::TaskParked { task: t, attempts: 3, reason: "flaky".into() }
        ]
    );
    assert_eq!(h.task_state(t), TaskState::Parked);
    assert_eq!(h.state.task_view(t).unwrap().last_error, "flaky");
}

#[test]
fn a_non_retryable_failure_is_final() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let t = h.schedule(a, "q");
    h.claim("q");
    let events = h.ok(Operation::FailTask { task: t, attempt: 1, error: "bad input".into(), retryable: false });
    assert_eq!(events, [Event::TaskFailed { task: t, attempt: 1, error: "bad input".into(), retry_at_us: None }]);
    assert_eq!(h.task_state(t), TaskState::Failed);
}

#[test]
fn cancel_open_tasks_only() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let waiting = h.schedule(a, "q");
    let held = h.schedule(a, "q");
    assert_eq!(
        h.ok(Operation::CancelTask { task: waiting, reason: "no".into() }),
        [Event::TaskCancelled { task: waiting, reason: "no".into() }]
    );
    assert_eq!(h.claim("q").0, held);
    h.ok(Operation::CancelTask { task: held, reason: String::new() });
    assert_eq!(h.task_state(held), TaskState::Cancelled);
    assert_eq!(
        h.err(Operation::CancelTask { task: held, reason: String::new() }),
        Error::TaskFinished { task: held, state: TaskState::Cancelled }
    );
    // A cancelled claim cannot be completed.
    assert_eq!(
        h.err(Operation::CompleteTask { task: held, attempt: 1, result: String::new() }),
        Error::TaskNotClaimed { task: held, state: TaskState::Cancelled }
    );
}

#[test]
fn schedule_to_start_timeout_is_final() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let timeouts = Timeouts { schedule_to_start_us: Some(5_000), ..Timeouts::default() };
    let t = h.schedule_with(a, "q", 0, timeouts, RetryPolicy::default());
    let due = h.time + 5_000;
    assert_eq!(h.state.next_deadline_us(), Some(due));
    assert_eq!(h.tick_at(due - 1), []);
    assert_eq!(
        h.tick_at(due),
        [Event::TaskTimedOut { task: t, attempt: 0, timeout: TimeoutKind::ScheduleToStart, retry_at_us: None }]
    );
    assert_eq!(h.task_state(t), TaskState::TimedOut);
    assert_eq!(h.state.next_deadline_us(), None);
    // Claimed in time: the schedule-to-start deadline stops running.
    let claimed = h.schedule_with(a, "q", 0, timeouts, RetryPolicy::default());
    let due = h.time + 5_000;
    assert_eq!(h.claim("q").0, claimed);
    assert_eq!(h.state.next_deadline_us(), None);
    assert_eq!(h.tick_at(due + 1), []);
    assert_eq!(h.task_state(claimed), TaskState::Claimed);
}

#[test]
fn heartbeats_keep_a_claim_alive_and_silence_retries_then_parks() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let timeouts = Timeouts { heartbeat_us: Some(1_000), start_to_close_us: Some(1_000_000), ..Timeouts::default() };
    let retry =
        RetryPolicy { max_attempts: 2, initial_backoff_us: 100, backoff_multiplier_pct: 200, max_backoff_us: 100 };
    let t = h.schedule_with(a, "q", 0, timeouts, retry);
    h.claim("q");
    for _ in 0..3 {
        h.time += 500;
        assert_eq!(h.ok(Operation::HeartbeatTask { task: t, attempt: 1 }), []);
        assert_eq!(h.tick_at(h.time + 500), [], "a heartbeat moved the deadline");
    }
    let due = h.state.next_deadline_us().unwrap();
    let events = h.tick_at(due);
    assert_eq!(
        events,
        [Event::TaskTimedOut { task: t, attempt: 1, timeout: TimeoutKind::Heartbeat, retry_at_us: Some(due + 100) }]
    );
    assert_eq!(
        h.err(Operation::HeartbeatTask { task: t, attempt: 1 }),
        Error::TaskNotClaimed { task: t, state: TaskState::Scheduled }
    );
    h.time = due + 100;
    assert_eq!(h.claim("q"), (t, 2));
    let due = h.state.next_deadline_us().unwrap();
    assert_eq!(
        h.tick_at(due),
        [
            Event::TaskTimedOut { task: t, attempt: 2, timeout: TimeoutKind::Heartbeat, retry_at_us: None },
            Event::TaskParked { task: t, attempts: 2, reason: "heartbeat timeout".into() }
        ]
    );
}

#[test]
fn start_to_close_timeout_retries() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let timeouts = Timeouts { start_to_close_us: Some(2_000), ..Timeouts::default() };
    let t = h.schedule_with(a, "q", 0, timeouts, RetryPolicy::default());
    h.claim("q");
    let due = h.state.next_deadline_us().unwrap();
    let events = h.tick_at(due);
    assert_eq!(
        events,
        [Event::TaskTimedOut {
            task: t,
            attempt: 1,
            timeout: TimeoutKind::StartToClose,
            retry_at_us: Some(due + 1_000_000)
        }]
    );
}

// ------------------------------------------------------------------ authorisation, sequencing, idempotency

#[test]
fn a_subtree_token_acts_on_its_subtree_only() {
    let mut h = Harness::new();
    let root = h.spawn(None);
    let child = h.spawn(Some(root));
    let grandchild = h.spawn(Some(child));
    let sibling = h.spawn(Some(root));
    let principal = format!("agent:{child}");
    let caps = [Capability::new(Pattern::Subtree(child), &[Action::Suspend, Action::Spawn])];
    h.submit_as(&principal, &caps, Operation::SuspendAgent { agent: grandchild, reason: String::new() }).unwrap();
    for target in [root, sibling] {
        assert_eq!(
            h.submit_as(&principal, &caps, Operation::SuspendAgent { agent: target, reason: String::new() }),
            Err(Error::Forbidden { action: Action::Suspend, resource: format!("agent:{target}") })
        );
    }
    assert_eq!(
        h.submit_as(&principal, &caps, Operation::TerminateAgent { agent: child, reason: String::new() }),
        Err(Error::Forbidden { action: Action::Terminate, resource: format!("agent:{child}") })
    );
    let root_spawn = Operation::SpawnAgent(AgentSpec {
        name: "r".parse().unwrap(),
        parent: None,
        limits: ResourceLimits::default(),
    });
    assert_eq!(
        h.submit_as(&principal, &caps, root_spawn),
        Err(Error::Forbidden { action: Action::Spawn, resource: "agent:*".into() })
    );
}

#[test]
fn queue_capabilities_follow_the_task_to_its_queue() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let t = h.schedule(a, "gpu");
    h.schedule(a, "cpu");
    let worker = "worker-1";
    let caps = [Capability::new(Pattern::Queue(queue("gpu")), &[Action::Claim, Action::Complete])];
    assert_eq!(
        h.submit_as(worker, &caps, Operation::ClaimTask { queue: queue("cpu"), worker: "w".into() }),
        Err(Error::Forbidden { action: Action::Claim, resource: "task:cpu".into() })
    );
    h.submit_as(worker, &caps, Operation::ClaimTask { queue: queue("gpu"), worker: "w".into() }).unwrap();
    assert_eq!(
        h.submit_as(worker, &caps, Operation::FailTask { task: t, attempt: 1, error: "x".into(), retryable: true }),
        Err(Error::Forbidden { action: Action::Fail, resource: "task:gpu".into() })
    );
    h.submit_as(worker, &caps, Operation::CompleteTask { task: t, attempt: 1, result: String::new() }).unwrap();
}

#[test]
fn only_the_sequencer_ticks() {
    let mut h = Harness::new();
    let caps = h.caps.clone();
    assert_eq!(h.submit_as("operator", &caps, Operation::Tick { max_fired: None }), Err(Error::SequencerOnly));
}

#[test]
fn the_sequencer_must_hand_out_the_next_sequence_and_a_monotonic_clock() {
    let mut h = Harness::new();
    h.spawn(None);
    let admin = h.admin.clone();
    let caps = h.caps.clone();
    let op = Operation::SpawnAgent(AgentSpec {
        name: "a".parse().unwrap(),
        parent: None,
        limits: ResourceLimits::default(),
    });
    let ctx = |seq, time_us| Ctx {
        seq,
        time_us,
        op_id: OpId::from_u128(7),
        principal: &admin,
        authority: Authority::Client(&caps),
    };
    assert_eq!(h.state.apply(&op, &ctx(3, h.time + 1)), Err(Error::OutOfSequence { last: 1, given: 3 }));
    assert_eq!(h.state.apply(&op, &ctx(2, h.time - 1)), Err(Error::ClockWentBack { last: h.time, given: h.time - 1 }));
    h.state.apply(&op, &ctx(2, h.time)).unwrap();
    // Keep the harness log in step for its replay check.
    h.log.push(
        Record::seal(
            2,
            OpId::from_u128(7),
            admin.clone(),
            h.time,
            op,
            h.state.recent[&OpId::from_u128(7)].events.clone(),
            h.log[0].hash,
        )
        .unwrap(),
    );
}

#[test]
fn a_duplicate_operation_id_returns_the_first_result() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let id = h.op_id();
    let (admin, caps) = (h.admin.clone(), h.caps.clone());
    let op = Operation::ScheduleTask(TaskSpec {
        agent: a,
        queue: queue("q"),
        payload: String::new(),
        priority: 0,
        timeouts: Timeouts::default(),
        retry: RetryPolicy::default(),
    });
    let Outcome::Applied(first) = h.submit_with(id, &admin, &caps, op.clone()).unwrap() else { panic!() };
    h.spawn(None);
    assert_eq!(h.submit_with(id, &admin, &caps, op.clone()), Ok(Outcome::Duplicate { seq: 2, events: first }));
    assert_eq!(h.state.task_ids().count(), 1, "the duplicate scheduled nothing");
    assert_eq!(h.submit_with(id, &admin, &caps, Operation::ResumeAgent { agent: a }), Err(Error::OpIdReused(id)));
    let other: Principal = "someone-else".parse().unwrap();
    assert_eq!(h.submit_with(id, &other, &caps, op), Err(Error::OpIdReused(id)));
}

#[test]
fn operation_ids_are_forgotten_after_the_window() {
    let mut h = Harness::new();
    h.state = State::new(3);
    let a = h.spawn(None);
    let id = h.op_id();
    let (admin, caps) = (h.admin.clone(), h.caps.clone());
    let op = Operation::EmitObservation { agent: a, kind: "k".parse().unwrap(), body: String::new() };
    h.submit_with(id, &admin, &caps, op.clone()).unwrap();
    h.spawn(None);
    assert!(matches!(h.submit_with(id, &admin, &caps, op.clone()), Ok(Outcome::Duplicate { seq: 2, .. })));
    h.spawn(None);
    assert!(
        matches!(h.submit_with(id, &admin, &caps, op), Ok(Outcome::Applied(_))),
        "seq 2 is outside a window of 3 at seq 5"
    );
}

// ------------------------------------------------------------------ snapshots and replay

#[test]
fn snapshots_restore_to_an_equal_state() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    h.schedule(a, "q");
    h.claim("q");
    h.schedule_with(
        a,
        "q",
        3,
        Timeouts { schedule_to_start_us: Some(10), ..Timeouts::default() },
        RetryPolicy::default(),
    );
    let bytes = h.state.encode().unwrap();
    let restored = State::decode(&bytes).unwrap();
    assert_eq!(restored, h.state);
    assert_eq!(restored.hash().unwrap(), h.state.hash().unwrap());
    assert_eq!(hash_encoded(&bytes), h.state.hash().unwrap());
    assert_eq!(State::decode(b"nonsense"), Err(SnapshotError::NotASnapshot));
    let mut other_version = bytes.clone();
    other_version[10] = 9;
    assert_eq!(State::decode(&other_version), Err(SnapshotError::Version(9)));
    assert!(matches!(State::decode(&bytes[..bytes.len() - 3]), Err(SnapshotError::Decode(_))));
    let mut trailing = bytes;
    trailing.push(0);
    assert!(matches!(State::decode(&trailing), Err(SnapshotError::Decode(_))));
}

#[test]
fn a_copy_taken_for_a_snapshot_keeps_its_moment_while_the_original_goes_on() {
    // The sequencer snapshots a copy on another thread while it keeps applying; the copy
    // shares structure with the original, so a write to one must never show in the other.
    let mut h = Harness::new();
    let a = h.spawn(None);
    for _ in 0..200 {
        h.schedule(a, "q");
    }
    let copy = h.state.clone();
    let at_copy = copy.encode().unwrap();
    let b = h.spawn(Some(a));
    h.schedule(b, "q");
    h.claim("q");
    h.ok(Operation::ReportMemory { agent: a, bytes: 5 });
    assert_ne!(h.state, copy);
    assert_eq!(copy.encode().unwrap(), at_copy, "the copy is what the state was");
    assert_eq!(State::decode(&at_copy).unwrap().last_seq(), 201);
}

#[test]
fn the_state_hash_is_pinned() {
    // A change to the state layout changes this hash: bump FORMAT_VERSION with it.
    let mut h = Harness::new();
    let a = h.spawn(None);
    h.schedule(a, "q");
    assert_eq!(h.state.hash().unwrap().to_string(), "b579df14e40703bd8acc1d329ac9f405df47ac46c09166acc7c7e9d8ae9e15b8");
}

#[test]
fn replay_detects_a_record_whose_events_were_altered() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    h.ok(Operation::ReportMemory { agent: a, bytes: 5 });
    let mut fresh = State::default();
    fresh.replay(&h.log[0]).unwrap();
    let mut altered = h.log[1].clone();
    altered.events = vec![Event::MemoryAllocated { agent: a, bytes: 6 }];
    assert!(matches!(fresh.replay(&altered), Err(ReplayError::Diverged { seq: 2, .. })));
    let mut refused = h.log[0].clone();
    refused.seq = 2;
    refused.op = Operation::ResumeAgent { agent: a };
    refused.op_id = OpId::from_u128(99);
    let mut fresh = State::default();
    fresh.replay(&h.log[0]).unwrap();
    assert!(matches!(fresh.replay(&refused), Err(ReplayError::Refused { seq: 2, error: Error::AgentNotSuspended(_) })));
}

#[test]
fn architecture_lists_every_refusal_rule_with_its_code() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../ARCHITECTURE.md")).unwrap();
    let (a, t) = (AgentId::mint(1, 1, 0), TaskId::mint(1, 1, 0));
    let every = [
        Error::Forbidden { action: Action::Read, resource: String::new() },
        Error::SequencerOnly,
        Error::AgentNotFound(a),
        Error::TaskNotFound(t),
        Error::EmptyQueue(queue("q")),
        Error::AgentTerminated(a),
        Error::AgentNotRunning { agent: a, state: AgentState::Suspended },
        Error::AgentNotSuspended(a),
        Error::TaskNotClaimed { task: t, state: TaskState::Scheduled },
        Error::ClaimedBySomeoneElse(t),
        Error::StaleAttempt { task: t, given: 1, current: 2 },
        Error::TaskFinished { task: t, state: TaskState::Completed },
        Error::OpIdReused(OpId::from_u128(1)),
        Error::OutOfSequence { last: 1, given: 3 },
        Error::ClockWentBack { last: 2, given: 1 },
    ];
    let mut rules: Vec<&str> = every.iter().map(Error::rule).collect();
    rules.sort_unstable();
    rules.dedup();
    assert_eq!(rules.len(), every.len(), "rule names are distinct");
    for e in &every {
        let row = format!("| `{}` | `{}` |", e.rule(), e.code());
        assert!(doc.contains(&row), "ARCHITECTURE.md lacks the refusal row starting {row}");
    }
}

#[test]
fn the_state_machine_source_uses_nothing_nondeterministic() {
    // A cheap guard against the usual ways determinism is lost; the model tests catch the rest.
    let sources = [
        ("mod.rs", include_str!("mod.rs")),
        ("error.rs", include_str!("error.rs")),
        ("snapshot.rs", include_str!("snapshot.rs")),
    ];
    let forbidden = [
        "HashMap",
        "HashSet",
        "SystemTime",
        "Instant",
        "rand::",
        "std::fs",
        "std::net",
        "tokio",
        "async fn",
        "f32",
        "f64",
        "thread_rng",
    ];
    for (file, text) in sources {
        for word in forbidden {
            assert!(!text.contains(word), "machine/{file} uses {word}");
        }
    }
}

#[test]
fn a_tick_fires_at_most_max_fired_deadlines_in_firing_order() {
    let mut h = Harness::new();
    let a = h.spawn(None);
    let tasks: Vec<TaskId> = (0..5)
        .map(|i| {
            let timeouts = Timeouts { schedule_to_start_us: Some(1_000 - i * 100), ..Timeouts::default() };
            h.schedule_with(a, "q", 0, timeouts, RetryPolicy::default())
        })
        .collect();
    let fired = |events: &[Event]| -> Vec<TaskId> {
        events
            .iter()
            .map(|e| match e {
                Event::TaskTimedOut { task, .. } => *task,
                other => panic!("{other:?}"),
            })
            .collect()
    };
    // Scheduled 10 µs apart with deadlines 100 µs shorter each: the last is due first.
    let later = h.time + 10_000;
    assert_eq!(fired(&h.tick_at_most(later, Some(2))), [tasks[4], tasks[3]]);
    assert_eq!(fired(&h.tick_at_most(later + 20, Some(2))), [tasks[2], tasks[1]]);
    assert_eq!(h.state.next_deadline_us().map(|d| d < later), Some(true), "one left, already due");
    assert_eq!(fired(&h.tick_at_most(later + 40, None)), [tasks[0]]);
    assert_eq!(h.state.next_deadline_us(), None);
}

#[test]
fn one_fired_deadline_produces_at_most_max_deadline_events_bytes() {
    let task = TaskId::mint(u64::MAX, u64::MAX, u16::MAX);
    let longest = [TimeoutKind::ScheduleToStart, TimeoutKind::StartToClose, TimeoutKind::Heartbeat]
        .into_iter()
        .map(|t| format!("{} timeout", t.as_str()))
        .max_by_key(String::len)
        .unwrap();
    let timed_out = Event::TaskTimedOut {
        task,
        attempt: u32::MAX,
        timeout: TimeoutKind::ScheduleToStart,
        retry_at_us: Some(u64::MAX),
    };
    let parked = Event::TaskParked { task, attempts: u32::MAX, reason: longest };
    let worst = json_len(&timed_out) + 1 + json_len(&parked) + 1;
    assert!(worst <= MAX_DEADLINE_EVENTS_BYTES, "{worst} bytes");
}

#[test]
fn every_operations_record_stays_within_its_bound_at_the_longest_texts() {
    let mut h = Harness::new();
    // The longest texts the schemas allow, each character escaped on the wire (`\u0001`).
    let text = "\u{1}".repeat(65_536);
    let short = "\u{1}".repeat(1_024);
    let principal = format!("a{}", "b".repeat(127));
    let caps = h.caps.clone();
    let check = |h: &mut Harness, op: Operation| -> Vec<Event> {
        let bound = h.state.events_bound(&op);
        let op_len = json_len(&op);
        let events = h.submit_as(&principal, &caps, op.clone()).unwrap_or_else(|e| panic!("{op:?}: {e}"));
        assert!(json_len(&events) <= bound, "{}: events of {} bytes over {bound}", op.type_name(), json_len(&events));
        let record = json_len(h.log.last().unwrap());
        assert!(record <= RECORD_ENVELOPE_BYTES + op_len + bound, "{}: record of {record} bytes", op.type_name());
        events
    };
    let name: AgentName = "n".repeat(64).parse().unwrap();
    let limits = ResourceLimits { memory_bytes: Some(1), cpu_millicores: Some(1), io_bytes: Some(1) };
    let spawn = |parent| Operation::SpawnAgent(AgentSpec { name: name.clone(), parent, limits });
    let Event::AgentSpawned { agent: root, .. } = check(&mut h, spawn(None))[0] else { panic!() };
    let Event::AgentSpawned { agent: child, .. } = check(&mut h, spawn(Some(root)))[0] else { panic!() };
    check(&mut h, Operation::SuspendAgent { agent: child, reason: short.clone() });
    check(&mut h, Operation::ResumeAgent { agent: child });
    let retry = RetryPolicy { max_attempts: 1, initial_backoff_us: 1, backoff_multiplier_pct: 100, max_backoff_us: 1 };
    let queue: QueueName = "q".repeat(64).parse().unwrap();
    let schedule = Operation::ScheduleTask(TaskSpec {
        agent: child,
        queue: queue.clone(),
        payload: text.clone(),
        priority: u8::MAX,
        timeouts: Timeouts { heartbeat_us: Some(u64::MAX / 4), ..Timeouts::default() },
        retry,
    });
    let claim = Operation::ClaimTask { queue: queue.clone(), worker: short.clone() };
    let next_task = |h: &mut Harness| {
        check(h, schedule.clone());
        let Event::TaskClaimed { task, .. } = check(h, claim.clone())[0] else { panic!() };
        task
    };
    let task = next_task(&mut h);
    check(&mut h, Operation::HeartbeatTask { task, attempt: 1 });
    // The last attempt fails: task.failed and task.parked both carry the error.
    assert_eq!(check(&mut h, Operation::FailTask { task, attempt: 1, error: text.clone(), retryable: true }).len(), 2);
    let task = next_task(&mut h);
    check(&mut h, Operation::CompleteTask { task, attempt: 1, result: text.clone() });
    check(&mut h, schedule.clone());
    let open = next_task(&mut h);
    check(&mut h, Operation::CancelTask { task: open, reason: short.clone() });
    let kind: ObservationKind = "k".repeat(64).parse().unwrap();
    check(&mut h, Operation::EmitObservation { agent: child, kind, body: text.clone() });
    check(&mut h, Operation::ReportMemory { agent: child, bytes: u64::MAX });
    check(&mut h, Operation::ReportCpu { agent: child, millicores: u64::MAX });
    check(
        &mut h,
        Operation::ReportIo { agent: child, read_bytes: u64::MAX / 2, write_bytes: u64::MAX / 2, ops: u64::MAX },
    );
    check(&mut h, schedule.clone());
    check(&mut h, Operation::TerminateAgent { agent: root, reason: short.clone() });
}

#[test]
fn a_terminate_whose_record_would_exceed_the_bound_is_refused_before_anything_changes() {
    let mut h = Harness::new();
    let root = h.spawn(None);
    for _ in 0..200 {
        let child = h.spawn(Some(root));
        h.schedule(child, "q");
    }
    let op = Operation::TerminateAgent { agent: root, reason: "cleanup".into() };
    // Exact for a terminate: the events' array is what the bound says.
    let bound = h.state.events_bound(&op);
    let fits = RECORD_ENVELOPE_BYTES + json_len(&op) + bound;
    let before = h.state.hash().unwrap();
    let refused = h.state.check_record_size(&op, fits - 1).unwrap_err();
    assert_eq!(refused, Error::RecordTooLarge { bytes: fits, limit: fits - 1 });
    let wire = WireError::from(&refused);
    assert_eq!(wire.code, toka_contract::wire::ErrorCode::TooLarge);
    assert_eq!(
        (wire.details["limit"].as_str(), wire.details["max"].as_u64(), wire.details["size"].as_u64()),
        (Some("kernel.max_record_bytes"), Some(fits as u64 - 1), Some(fits as u64))
    );
    assert_eq!(h.state.hash().unwrap(), before, "checking changed nothing");
    h.state.check_record_size(&op, fits).unwrap();
    let events = h.ok(op);
    assert_eq!(events.len(), 401);
    assert_eq!(json_len(&events), bound);
}
