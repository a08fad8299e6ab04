//! Model-based property tests: random but mostly valid operation sequences.
//!
//! A sequence is generated as abstract steps ("suspend some running agent", "complete some
//! claimed task as its holder") that are bound to concrete ids against the live state when they
//! run, so most operations are accepted; a `wild` flag picks targets from everything instead, to
//! exercise refusals. After every step the state's invariants hold (no running agent or open
//! task under a terminated agent, no task in two places, attempts within the policy); at the
//! end, replaying the log from the start, and from snapshots taken along the way, gives the same
//! state hash and exactly the recorded events, and retried operation ids return their first
//! result.

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRunner};
use toka_contract::record::Hash;
use toka_contract::spec::{AgentSpec, ResourceLimits, RetryPolicy, TaskSpec, Timeouts};
use toka_contract::{Action, Pattern, Record};

use super::*;

const T0: u64 = 1_764_150_000_000_000;
const QUEUES: [&str; 3] = ["q0", "q1", "q2"];
const WORKERS: [&str; 2] = ["worker-0", "worker-1"];

#[derive(Debug, Clone)]
enum Step {
    Spawn {
        parent: Option<usize>,
    },
    Suspend(usize),
    Resume(usize),
    Terminate(usize),
    Schedule {
        agent: usize,
        queue: usize,
        priority: u8,
        s2s: Option<u64>,
        s2c: Option<u64>,
        hb: Option<u64>,
        attempts: u32,
    },
    Claim {
        queue: usize,
        worker: usize,
    },
    Heartbeat(usize),
    Complete(usize),
    Fail {
        task: usize,
        retryable: bool,
    },
    Cancel(usize),
    Observe(usize),
    Report {
        agent: usize,
        kind: u8,
        amount: u64,
    },
    Tick {
        advance_us: u64,
        max_fired: Option<u32>,
    },
    Retry(usize),
    Narrow(usize),
}

fn step() -> impl Strategy<Value = (Step, bool, u64)> {
    let pick = || 0usize..64;
    let dur = || proptest::option::weighted(0.3, 1_000u64..200_000);
    let s = prop_oneof![
        3 => proptest::option::weighted(0.7, pick()).prop_map(|parent| Step::Spawn { parent }),
        1 => pick().prop_map(Step::Suspend),
        1 => pick().prop_map(Step::Resume),
        1 => pick().prop_map(Step::Terminate),
        5 => (pick(), 0..QUEUES.len(), any::<u8>(), dur(), dur(), dur(), 1u32..4)
            .prop_map(|(agent, queue, priority, s2s, s2c, hb, attempts)| Step::Schedule { agent, queue, priority, s2s, s2c, hb, attempts }),
        4 => (0..QUEUES.len(), 0..WORKERS.len()).prop_map(|(queue, worker)| Step::Claim { queue, worker }),
        2 => pick().prop_map(Step::Heartbeat),
        3 => pick().prop_map(Step::Complete),
        2 => (pick(), any::<bool>()).prop_map(|(task, retryable)| Step::Fail { task, retryable }),
        1 => pick().prop_map(Step::Cancel),
        2 => pick().prop_map(Step::Observe),
        2 => (pick(), 0u8..3, 0u64..2_000).prop_map(|(agent, kind, amount)| Step::Report { agent, kind, amount }),
        2 => (0u64..300_000, proptest::option::of(1u32..4)).prop_map(|(advance_us, max_fired)| Step::Tick { advance_us, max_fired }),
        1 => pick().prop_map(Step::Retry),
        1 => pick().prop_map(Step::Narrow),
    ];
    // One step in ten picks its target from everything (mostly refused); time moves a little.
    (s, proptest::bool::weighted(0.1), 0u64..20_000)
}

/// The sequencer in miniature, with the log and the snapshots it took.
struct Run {
    state: State,
    time: u64,
    next_op: u128,
    log: Vec<KernelRecord>,
    snapshots: Vec<(usize, Vec<u8>)>,
    applied: Vec<(OpId, Principal, Operation)>,
    accepted: u64,
    submitted: u64,
}

fn caps() -> Vec<Capability> {
    use Action::*;
    vec![
        Capability::new(Pattern::AnyAgent, &[Spawn, Suspend, Resume, Terminate, Schedule, Cancel, Observe, Report]),
        Capability::new(Pattern::AnyQueue, &[Claim, Heartbeat, Complete, Fail]),
    ]
}

fn choose<T: Copy>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()])
}

impl Run {
    fn new() -> Self {
        Run {
            state: State::new(50),
            time: T0,
            next_op: 0,
            log: Vec::new(),
            snapshots: Vec::new(),
            applied: Vec::new(),
            accepted: 0,
            submitted: 0,
        }
    }

    fn agents_where(&self, wild: bool, f: impl Fn(AgentState) -> bool) -> Vec<AgentId> {
        self.state.agent_ids().filter(|id| wild || self.state.agent_view(*id).is_some_and(|v| f(v.state))).collect()
    }

    fn tasks_where(&self, wild: bool, f: impl Fn(TaskState) -> bool) -> Vec<TaskId> {
        self.state.task_ids().filter(|id| wild || self.state.task_view(*id).is_some_and(|v| f(v.state))).collect()
    }

    fn holder(&self, task: TaskId, wild: bool) -> (String, u32) {
        let view = self.state.task_view(task);
        let holder = view.as_ref().and_then(|v| v.claimed_by.as_ref()).map_or(WORKERS[0].to_owned(), |p| p.to_string());
        let attempt = view.map_or(1, |v| v.attempt);
        if wild { (WORKERS[1].to_owned(), attempt + 1) } else { (holder, attempt) }
    }

    fn run(&mut self, (step, wild, dt): (Step, bool, u64)) {
        self.time += dt;
        let admin = "operator".to_owned();
        let running = |s| s == AgentState::Running;
        let open = |s| matches!(s, TaskState::Scheduled | TaskState::Claimed);
        let (principal, op) = match step {
            Step::Spawn { parent } => {
                let parent = match parent {
                    Some(i) => match choose(&self.agents_where(wild, running), i) {
                        Some(p) => Some(p),
                        None => return,
                    },
                    None => None,
                };
                let spec = AgentSpec {
                    name: "agent".parse().unwrap(),
                    parent,
                    limits: ResourceLimits {
                        memory_bytes: Some(1_000),
                        cpu_millicores: Some(1_000),
                        io_bytes: Some(5_000),
                    },
                };
                (admin, Operation::SpawnAgent(spec))
            }
            Step::Suspend(i) => {
                let Some(agent) = choose(&self.agents_where(wild, running), i) else { return };
                (admin, Operation::SuspendAgent { agent, reason: String::new() })
            }
            Step::Resume(i) => {
                let Some(agent) = choose(&self.agents_where(wild, |s| s == AgentState::Suspended), i) else { return };
                (admin, Operation::ResumeAgent { agent })
            }
            Step::Terminate(i) => {
                let Some(agent) = choose(&self.agents_where(wild, |s| s != AgentState::Terminated), i) else { return };
                (admin, Operation::TerminateAgent { agent, reason: "model".into() })
            }
            Step::Schedule { agent, queue, priority, s2s, s2c, hb, attempts } => {
                let Some(agent) = choose(&self.agents_where(wild, running), agent) else { return };
                let timeouts = Timeouts { schedule_to_start_us: s2s, start_to_close_us: s2c, heartbeat_us: hb };
                let retry = RetryPolicy {
                    max_attempts: attempts,
                    initial_backoff_us: 5_000,
                    backoff_multiplier_pct: 200,
                    max_backoff_us: 50_000,
                };
                let spec = TaskSpec {
                    agent,
                    queue: QUEUES[queue].parse().unwrap(),
                    payload: "p".into(),
                    priority,
                    timeouts,
                    retry,
                };
                (admin, Operation::ScheduleTask(spec))
            }
            Step::Claim { queue, worker } => (
                WORKERS[worker].to_owned(),
                Operation::ClaimTask { queue: QUEUES[queue].parse().unwrap(), worker: "w".into() },
            ),
            Step::Heartbeat(i) => {
                let Some(task) = choose(&self.tasks_where(wild, |s| s == TaskState::Claimed), i) else { return };
                let (who, attempt) = self.holder(task, wild);
                (who, Operation::HeartbeatTask { task, attempt })
            }
            Step::Complete(i) => {
                let Some(task) = choose(&self.tasks_where(wild, |s| s == TaskState::Claimed), i) else { return };
                let (who, attempt) = self.holder(task, wild);
                (who, Operation::CompleteTask { task, attempt, result: "r".into() })
            }
            Step::Fail { task, retryable } => {
                let Some(task) = choose(&self.tasks_where(wild, |s| s == TaskState::Claimed), task) else { return };
                let (who, attempt) = self.holder(task, wild);
                (who, Operation::FailTask { task, attempt, error: "e".into(), retryable })
            }
            Step::Cancel(i) => {
                let Some(task) = choose(&self.tasks_where(wild, open), i) else { return };
                (admin, Operation::CancelTask { task, reason: String::new() })
            }
            Step::Observe(i) => {
                let Some(agent) = choose(&self.agents_where(wild, |s| s != AgentState::Terminated), i) else { return };
                (admin, Operation::EmitObservation { agent, kind: "tool.call".parse().unwrap(), body: String::new() })
            }
            Step::Report { agent, kind, amount } => {
                let Some(agent) = choose(&self.agents_where(wild, |s| s != AgentState::Terminated), agent) else {
                    return;
                };
                let op = match kind {
                    0 => Operation::ReportMemory { agent, bytes: amount },
                    1 => Operation::ReportCpu { agent, millicores: amount },
                    _ => Operation::ReportIo { agent, read_bytes: amount, write_bytes: amount / 2, ops: 1 },
                };
                (admin, op)
            }
            Step::Tick { advance_us, max_fired } => {
                self.time += advance_us;
                ("toka-kernel".to_owned(), Operation::Tick { max_fired })
            }
            Step::Retry(i) => {
                let Some((op_id, principal, op)) = self.applied.get(i % self.applied.len().max(1)).cloned() else {
                    return;
                };
                self.submitted += 1;
                let ctx = Ctx {
                    seq: self.state.last_seq() + 1,
                    time_us: self.time,
                    op_id,
                    principal: &principal,
                    authority: Authority::Client(&caps()),
                };
                match self.state.apply(&op, &ctx) {
                    Ok(Outcome::Duplicate { seq, events }) => {
                        self.accepted += 1;
                        let first = &self.log[usize::try_from(seq).unwrap() - 1];
                        assert_eq!((first.op_id, &first.events), (op_id, &events), "a retry returned another result");
                    }
                    Ok(Outcome::Applied(_)) => panic!("a retry inside the window was applied again"),
                    Err(e) => panic!("a retry was refused: {e}"),
                }
                return;
            }
            Step::Narrow(i) => {
                // An agent's own token acting on some agent: allowed on its subtree only.
                let agents: Vec<AgentId> = self.state.agent_ids().collect();
                let (Some(me), Some(target)) = (choose(&agents, i), choose(&agents, i / 3 + 1)) else { return };
                let caps = [Capability::new(Pattern::Subtree(me), &[Action::Observe])];
                let op =
                    Operation::EmitObservation { agent: target, kind: "narrow".parse().unwrap(), body: String::new() };
                let result = self.submit(&format!("agent:{me}"), &caps, op);
                let allowed = target == me || Tree(&self.state.agents).is_descendant(target, me);
                if let Err(Error::Forbidden { .. }) = result {
                    assert!(!allowed, "own subtree refused");
                } else {
                    assert!(allowed || result.is_err(), "outside the subtree allowed");
                }
                return;
            }
        };
        let tick = matches!(op, Operation::Tick { .. });
        let caps = if tick { Vec::new() } else { caps() };
        let _ = self.submit(&principal, &caps, op);
    }

    fn submit(&mut self, principal: &str, caps: &[Capability], op: Operation) -> Result<Vec<Event>, Error> {
        self.next_op += 1;
        let op_id = OpId::from_u128(self.next_op);
        let principal: Principal = principal.parse().unwrap();
        let authority =
            if matches!(op, Operation::Tick { .. }) { Authority::Sequencer } else { Authority::Client(caps) };
        let ctx = Ctx { seq: self.state.last_seq() + 1, time_us: self.time, op_id, principal: &principal, authority };
        let before = self.state.clone();
        self.submitted += 1;
        let result = self.state.apply(&op, &ctx);
        self.state.check_invariants().unwrap_or_else(|e| panic!("after {op:?}: {e}"));
        match result {
            Ok(Outcome::Applied(events)) => {
                self.accepted += 1;
                let prev = self.log.last().map_or(Hash::ZERO, |r| r.hash);
                let record =
                    Record::seal(ctx.seq, op_id, principal.clone(), ctx.time_us, op.clone(), events.clone(), prev)
                        .unwrap();
                self.log.push(record);
                if !matches!(op, Operation::Tick { .. }) {
                    self.applied.push((op_id, principal, op));
                    if self.applied.len() > 20 {
                        self.applied.remove(0);
                    }
                }
                if self.log.len().is_multiple_of(17) {
                    self.snapshots.push((self.log.len(), self.state.encode().unwrap()));
                }
                Ok(events)
            }
            Ok(Outcome::Duplicate { .. }) => panic!("fresh id reported as duplicate"),
            Err(e) => {
                assert_eq!(self.state, before, "refused {op:?} changed the state");
                Err(e)
            }
        }
    }

    fn check_replays(&self) {
        let live = self.state.hash().unwrap();
        let mut fresh = State::new(50);
        for r in &self.log {
            fresh.replay(r).unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(fresh.hash().unwrap(), live, "replay from the start");
        for (at, bytes) in &self.snapshots {
            let mut restored = State::decode(bytes).unwrap();
            for r in &self.log[*at..] {
                restored.replay(r).unwrap_or_else(|e| panic!("{e}"));
            }
            assert_eq!(restored.hash().unwrap(), live, "replay from the snapshot after record {at}");
        }
        // Retries recognised after a replay too.
        for (op_id, principal, op) in self.applied.iter().rev().take(5) {
            let ctx = Ctx {
                seq: fresh.last_seq() + 1,
                time_us: self.time,
                op_id: *op_id,
                principal,
                authority: Authority::Replay,
            };
            assert!(
                matches!(fresh.apply(op, &ctx), Ok(Outcome::Duplicate { .. })),
                "retry not recognised after replay"
            );
        }
        toka_contract::record::verify_chain(&self.log, 0, Hash::ZERO).unwrap();
    }
}

fn steps() -> impl Strategy<Value = Vec<(Step, bool, u64)>> {
    proptest::collection::vec(step(), 1..160)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn replay_from_the_start_and_from_snapshots_reproduces_the_state(steps in steps()) {
        let mut run = Run::new();
        for s in steps {
            run.run(s);
        }
        run.check_replays();
    }
}

#[test]
fn most_generated_operations_are_accepted() {
    let mut runner = TestRunner::new(Config { cases: 64, ..Config::default() });
    let (mut accepted, mut submitted) = (0u64, 0u64);
    let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
    for _ in 0..64 {
        let steps = steps().new_tree(&mut runner).unwrap().current();
        let mut run = Run::new();
        for s in steps {
            run.run(s);
        }
        accepted += run.accepted;
        submitted += run.submitted;
        for event in run.log.iter().flat_map(|r| &r.events) {
            *seen.entry(event.type_name()).or_default() += 1;
        }
    }
    eprintln!("model: events produced: {seen:?}");
    // The generator reaches every corner of the task lifecycle, not just the happy path.
    for t in ["agent.terminated", "task.cancelled", "task.timed_out", "task.parked", "task.failed", "resource.error"] {
        assert!(seen.get(t).copied().unwrap_or(0) > 0, "the generator never produced {t}");
    }
    let rate = accepted as f64 / submitted as f64;
    eprintln!("model: {accepted} of {submitted} generated operations accepted ({:.1}%)", rate * 100.0);
    assert!(rate >= 0.5, "acceptance rate {rate:.2} under one half: the generator tests refusals, not behaviour");
}
