//! Builders the crates' tests and benchmarks share (feature `test-util`; never in a product
//! build): chains of kernel records of a few sample kinds, token claims.

use crate::AgentId;
use crate::api::auth::{AUDIENCE, Claims, ISSUER};
use crate::capability::{Action, Capability, Pattern};
use crate::event::Event;
use crate::id::{OpId, TaskId, TokenId};
use crate::op::Operation;
use crate::record::{Chain, KernelRecord};
use crate::spec::{AgentSpec, TaskSpec};

/// Where sample records' times start: 2025-11-26, in microseconds.
pub const TIME_US: u64 = 1_764_150_000_000_000;

/// What a sample record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Resumes an agent of its own.
    Resume,
    /// Spawns a root agent named `a`.
    Spawn,
    /// Emits an observation whose body is the tag.
    Observe(u64),
    /// Schedules a task with a payload of 120 characters on queue `llm`.
    Schedule,
}

/// The operation and events of a sample record of `kind` at `seq`, sealed at `time_us`.
pub fn sample(kind: Sample, seq: u64, time_us: u64) -> (Operation, Vec<Event>) {
    let agent = AgentId::mint(time_us, seq, 0);
    let name = || "a".parse().expect("a valid name");
    match kind {
        Sample::Resume => (Operation::ResumeAgent { agent }, vec![Event::AgentResumed { agent }]),
        Sample::Spawn => (
            Operation::SpawnAgent(AgentSpec { name: name(), parent: None, limits: Default::default() }),
            vec![Event::AgentSpawned { agent, name: name(), parent: None, limits: Default::default() }],
        ),
        Sample::Observe(tag) => {
            let kind = "test.tick".parse().expect("a valid kind");
            let body = tag.to_string();
            (
                Operation::EmitObservation { agent, kind: Clone::clone(&kind), body: body.clone() },
                vec![Event::ObservationEmitted { agent, kind, body }],
            )
        }
        Sample::Schedule => {
            let queue: crate::spec::QueueName = "llm".parse().expect("a valid queue");
            let task = TaskId::mint(time_us, seq, 0);
            let spec = TaskSpec {
                agent,
                queue: queue.clone(),
                payload: "x".repeat(120),
                priority: 5,
                timeouts: Default::default(),
                retry: Default::default(),
            };
            (Operation::ScheduleTask(spec), vec![Event::TaskScheduled { task, agent, queue, priority: 5 }])
        }
    }
}

/// `n` sample records of `kind` sealed onto `chain` (which moves past them), by `operator`,
/// record `seq` at time [`TIME_US`] + `seq`.
pub fn kernel_records(chain: &mut Chain, n: u64, kind: Sample) -> Vec<KernelRecord> {
    let principal = "operator".parse().expect("a valid principal");
    (0..n)
        .map(|_| {
            let seq = chain.seq + 1;
            let time_us = TIME_US + seq;
            let (op, events) = sample(kind, seq, time_us);
            let tag = match kind {
                Sample::Observe(tag) => (tag % 60_000) as u16,
                _ => 1,
            };
            let (record, _) = chain
                .seal(OpId::mint(time_us, seq, tag), Clone::clone(&principal), time_us, op, events)
                .expect("a sample record seals");
            record
        })
        .collect()
}

/// `n` sample records of `kind` from the start of a log.
pub fn kernel_chain(n: u64, kind: Sample) -> Vec<KernelRecord> {
    let mut chain = Chain::START;
    kernel_records(&mut chain, n, kind)
}

/// The claims of an issued token `jti` held by `operator`, valid from 5 s before `now_s` for
/// 10 minutes, allowing `spawn` on `agent:*`.
pub fn claims(jti: u128, now_s: u64) -> Claims {
    Claims {
        iss: ISSUER.into(),
        sub: "operator".parse().expect("a valid principal"),
        aud: AUDIENCE.into(),
        exp: now_s + 600,
        nbf: now_s - 5,
        iat: now_s - 5,
        jti: TokenId::from_u128(jti),
        caps: vec![Capability::new(Pattern::AnyAgent, &[Action::Spawn])],
        chain: Vec::new(),
        depth: 0,
        once: false,
        root: None,
    }
}
