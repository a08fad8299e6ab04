//! `State::apply` throughput, capability checks included.
//!
//! The mix, repeated per cycle over 64 agents that sit two levels under a root (so every
//! `agent:<root>/**` check walks the tree): `task.schedule` by the agent's own subtree token,
//! `task.claim` and `task.complete` by a worker holding `task:<queue>`, `observation.emit` and
//! `resource.report_memory` by the agent's token: five operations, all accepted. Tokens are
//! already verified (the service caches them), so what is measured is sequencing checks,
//! authorisation, the transition, event construction and the idempotency window.
//!
//! Run: `cargo bench -p toka-kernel --bench apply`

#![allow(clippy::unwrap_used)] // benchmark set-up: a parse failure is a bug in the benchmark

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use toka_contract::spec::{AgentSpec, Principal, QueueName, ResourceLimits, RetryPolicy, TaskSpec, Timeouts};
use toka_contract::{Action, AgentId, Capability, Event, OpId, Operation, Pattern};
use toka_kernel::machine::{Authority, Ctx, Outcome, State};

const AGENTS: usize = 64;

struct Bench {
    state: State,
    seq: u64,
    time: u64,
    op: u128,
}

impl Bench {
    fn apply(&mut self, op: &Operation, principal: &Principal, caps: &[Capability]) -> Vec<Event> {
        self.seq += 1;
        self.time += 7;
        self.op += 1;
        let ctx = Ctx {
            seq: self.seq,
            time_us: self.time,
            op_id: OpId::from_u128(self.op),
            principal,
            authority: Authority::Client(caps),
        };
        match self.state.apply(op, &ctx) {
            Ok(Outcome::Applied(events)) => events,
            other => panic!("benchmark operation not accepted: {other:?}"),
        }
    }
}

fn spawned(events: &[Event]) -> AgentId {
    match events {
        [Event::AgentSpawned { agent, .. }] => *agent,
        other => panic!("{other:?}"),
    }
}

fn apply_mix(c: &mut Criterion) {
    eprintln!(
        "config: mix per cycle = schedule, claim, complete, observe, report_memory (5 ops, all accepted); {AGENTS} agents at depth 2 with agent:<root>/** tokens; idempotency window {}",
        toka_kernel::machine::DEFAULT_IDEMPOTENCY_WINDOW
    );
    let admin: Principal = "operator".parse().unwrap();
    let admin_caps = [Capability::new(Pattern::AnyAgent, &[Action::Spawn])];
    let mut b = Bench { state: State::default(), seq: 0, time: 1_764_150_000_000_000, op: 0 };
    let spawn = |parent| {
        Operation::SpawnAgent(AgentSpec {
            name: "a".parse().unwrap(),
            parent,
            limits: ResourceLimits { memory_bytes: Some(1 << 30), ..ResourceLimits::default() },
        })
    };
    let root = spawned(&b.apply(&spawn(None), &admin, &admin_caps));
    let admin_caps = [Capability::new(Pattern::Subtree(root), &[Action::Spawn])];
    let middle = spawned(&b.apply(&spawn(Some(root)), &admin, &admin_caps));
    let agents: Vec<AgentId> =
        (0..AGENTS).map(|_| spawned(&b.apply(&spawn(Some(middle)), &admin, &admin_caps))).collect();
    let queue: QueueName = "llm".parse().unwrap();
    let agent_principal: Principal = format!("agent:{root}").parse().unwrap();
    let agent_caps = [Capability::new(Pattern::Subtree(root), &[Action::Schedule, Action::Observe, Action::Report])];
    let worker: Principal = "worker-1".parse().unwrap();
    let worker_caps = [Capability::new(
        Pattern::Queue(queue.clone()),
        &[Action::Claim, Action::Heartbeat, Action::Complete, Action::Fail],
    )];
    let kind: toka_contract::spec::ObservationKind = "tool.call".parse().unwrap();

    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(5));
    let mut i = 0usize;
    group.bench_function("mix_of_5_with_capability_checks", |bench| {
        bench.iter(|| {
            let agent = agents[i % AGENTS];
            i += 1;
            let schedule = Operation::ScheduleTask(TaskSpec {
                agent,
                queue: queue.clone(),
                payload: String::new(),
                priority: 0,
                timeouts: Timeouts::default(),
                retry: RetryPolicy::default(),
            });
            b.apply(&schedule, &agent_principal, &agent_caps);
            let task = match b
                .apply(&Operation::ClaimTask { queue: queue.clone(), worker: "w".into() }, &worker, &worker_caps)
                .as_slice()
            {
                [Event::TaskClaimed { task, .. }] => *task,
                other => panic!("{other:?}"),
            };
            b.apply(&Operation::CompleteTask { task, attempt: 1, result: String::new() }, &worker, &worker_caps);
            b.apply(
                &Operation::EmitObservation { agent, kind: kind.clone(), body: String::new() },
                &agent_principal,
                &agent_caps,
            );
            black_box(b.apply(&Operation::ReportMemory { agent, bytes: 4096 }, &agent_principal, &agent_caps));
        })
    });
    group.finish();
    eprintln!("state after the run: {} tasks, last seq {}", b.state.task_ids().count(), b.state.last_seq());
}

criterion_group!(benches, apply_mix);
criterion_main!(benches);
