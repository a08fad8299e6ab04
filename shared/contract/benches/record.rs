//! Sealing a kernel record (what the kernel does for every accepted operation) and checking a
//! received one's hash (what storage does for every appended record): both write the record's
//! canonical JSON and hash it.
//!
//! Run: `cargo bench -p toka-contract --bench record`

#![allow(clippy::unwrap_used)] // benchmark set-up

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use toka_contract::record::{Hash, Record};
use toka_contract::spec::TaskSpec;
use toka_contract::{AgentId, Event, KernelRecord, OpId, Operation, TaskId};

fn schedule(seq: u64) -> (Operation, Vec<Event>) {
    let time = 1_764_150_000_000_000 + seq;
    let agent = AgentId::mint(time, 1, 0);
    let task = TaskId::mint(time, seq, 0);
    let op = Operation::ScheduleTask(TaskSpec {
        agent,
        queue: "llm".parse().unwrap(),
        payload: "x".repeat(120),
        priority: 5,
        timeouts: Default::default(),
        retry: Default::default(),
    });
    (op, vec![Event::TaskScheduled { task, agent, queue: "llm".parse().unwrap(), priority: 5 }])
}

fn hashing(c: &mut Criterion) {
    eprintln!("config: a task.schedule record with a 120-character payload and its event");
    let (op, events) = schedule(7);
    let principal: toka_contract::spec::Principal = "operator".parse().unwrap();
    c.bench_function("seal/kernel_record", |b| {
        b.iter(|| {
            let r: KernelRecord = Record::seal(
                7,
                OpId::mint(1, 7, 1),
                principal.clone(),
                1_764_150_000_000_007,
                black_box(op.clone()),
                black_box(events.clone()),
                Hash::ZERO,
            )
            .unwrap();
            black_box(r)
        })
    });
    let sealed: KernelRecord =
        Record::seal(7, OpId::mint(1, 7, 1), principal, 1_764_150_000_000_007, op, events, Hash::ZERO).unwrap();
    let received: Record<Value> = serde_json::from_value(serde_json::to_value(&sealed).unwrap()).unwrap();
    assert_eq!(received.compute_hash().unwrap(), sealed.hash);
    c.bench_function("compute_hash/received_record", |b| b.iter(|| black_box(received.compute_hash().unwrap())));
}

criterion_group!(benches, hashing);
criterion_main!(benches);
