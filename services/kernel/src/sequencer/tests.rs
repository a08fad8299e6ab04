//! The sequencer against an in-memory log on Tokio's paused clock: group commit, answers held
//! until durable, rebuilds after a failed append, duplicates and queries released in order,
//! deadlines fired by logged ticks, snapshots.

use std::time::Duration;

use toka_contract::event::TimeoutKind;
use toka_contract::spec::{AgentSpec, TaskSpec, Timeouts};
use toka_contract::wire::ErrorCode;
use toka_contract::{Action, Capability, Event, OpId, Operation, Pattern};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Applied, Clock, Input, Sequencer, Settings};
use crate::log::memory::{Fault, MemoryLog};
use crate::machine::State;
use crate::recovery;

const WINDOW: u64 = 1_000;
/// 2025-11-26, in microseconds: where the test clock starts.
const EPOCH_US: u64 = 1_764_150_000_000_000;

fn settings(max_in_flight: usize) -> Settings {
    // Wall time that moves with Tokio's (paused) clock.
    let start = tokio::time::Instant::now();
    Settings {
        max_batch_records: 1_000,
        max_batch_bytes: 800_000,
        max_record_bytes: 512 * 1024,
        max_in_flight,
        tick: Duration::from_millis(10),
        snapshot_every: 0,
        idempotency_window: WINDOW,
        clock: Clock::new(move || EPOCH_US + start.elapsed().as_micros() as u64),
    }
}

struct Running {
    inputs: mpsc::Sender<Input>,
    hashes: watch::Receiver<(u64, toka_contract::Hash)>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

async fn start(log: &MemoryLog, settings: Settings) -> Running {
    let recovered = recovery::recover(log, WINDOW).await.unwrap();
    let (report, hashes) = watch::channel((0, toka_contract::Hash::ZERO));
    let (inputs, rx) = mpsc::channel(10_000);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(Sequencer::new(log.clone(), settings, recovered, report).run(rx, stopped));
    Running { inputs, hashes, stop, task }
}

fn caps() -> Vec<Capability> {
    vec![Capability::new(Pattern::AnyAgent, Action::ALL), Capability::new(Pattern::AnyQueue, Action::ALL)]
}

fn op_id(n: u64) -> OpId {
    OpId::from_u128(u128::from(n) | 1 << 100)
}

fn spawn(name: &str) -> Operation {
    Operation::SpawnAgent(AgentSpec { name: name.parse().unwrap(), parent: None, limits: Default::default() })
}

impl Running {
    /// Queues an operation; the wait for its outcome.
    fn send(&self, id: u64, op: Operation) -> oneshot::Receiver<Result<Applied, toka_contract::wire::WireError>> {
        let (reply, outcome) = oneshot::channel();
        let input = Input::Submit { op_id: op_id(id), principal: "operator".parse().unwrap(), caps: caps(), op, reply };
        self.inputs.try_send(input).unwrap();
        outcome
    }

    /// Applies an operation and waits until it is durable; its sequence.
    async fn durable(&self, id: u64, op: Operation) -> Result<u64, ErrorCode> {
        let applied = self.send(id, op).await.unwrap().map_err(|e| e.code)?;
        applied.durable.await.unwrap().map_err(|e| e.code)?;
        Ok(applied.accepted.seq)
    }

    /// Stops the sequencer after what is in flight.
    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap();
    }
}

/// The state the log replays to.
async fn replayed(log: &MemoryLog) -> State {
    recovery::recover(log, WINDOW).await.unwrap().state
}

#[tokio::test(start_paused = true)]
async fn operations_arriving_while_an_append_is_in_flight_go_out_as_one_append() {
    let log = MemoryLog::default();
    log.set_latency(Duration::from_millis(10));
    let kernel = start(&log, settings(1)).await;
    let first = kernel.send(1, spawn("first"));
    tokio::task::yield_now().await;
    let rest: Vec<_> = (2..=21).map(|i| kernel.send(i, spawn("more"))).collect();
    let mut durables = vec![first.await.unwrap().unwrap().durable];
    for outcome in rest {
        durables.push(outcome.await.unwrap().unwrap().durable);
    }
    for durable in durables {
        durable.await.unwrap().unwrap();
    }
    assert_eq!(log.batches(), [1, 20], "the first alone, the twenty that waited for it together");
    assert_eq!(log.records().len(), 21);
    assert_eq!(log.most_in_flight(), 1, "never more appends at once than max_in_flight");
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn appends_overlap_up_to_max_in_flight() {
    let log = MemoryLog::default();
    log.set_latency(Duration::from_millis(10));
    let kernel = start(&log, settings(2)).await;
    let mut waits = Vec::new();
    for i in 1..=30 {
        waits.push(kernel.send(i, spawn("a")));
        // Arrivals spread over the appends' time, so each slot finds work.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for wait in waits {
        wait.await.unwrap().unwrap().durable.await.unwrap().unwrap();
    }
    assert_eq!(log.most_in_flight(), 2);
    assert_eq!(log.records().len(), 30);
    assert!(log.batches().len() < 30, "grouped: {:?}", log.batches());
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_caller_is_answered_only_once_its_record_is_durable() {
    let log = MemoryLog::default();
    log.set_latency(Duration::from_millis(10));
    let kernel = start(&log, settings(2)).await;
    let applied = kernel.send(1, spawn("a")).await.unwrap().unwrap();
    assert_eq!(applied.accepted.seq, 1, "applied at once");
    let mut durable = applied.durable;
    assert!(tokio::time::timeout(Duration::from_millis(9), &mut durable).await.is_err(), "not before the append");
    assert!(log.records().is_empty());
    durable.await.unwrap().unwrap();
    assert_eq!(log.records().len(), 1, "answered after the record landed");
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_append_fails_its_callers_and_the_state_is_rebuilt_from_the_log() {
    let log = MemoryLog::default();
    let kernel = start(&log, settings(2)).await;
    for i in 1..=3 {
        assert_eq!(kernel.durable(i, spawn("kept")).await, Ok(i));
    }
    log.fail_next(&[Fault::Lost]);
    assert_eq!(kernel.durable(4, spawn("lost")).await, Err(ErrorCode::Unavailable));
    // The lost operation left the state with the log: the next one takes its sequence.
    assert_eq!(kernel.durable(5, spawn("after")).await, Ok(4));
    let mut hashes = kernel.hashes.clone();
    let (seq, hash) = *hashes.wait_for(|(seq, _)| *seq == 4).await.unwrap();
    assert_eq!((seq, hash), (4, replayed(&log).await.hash().unwrap()));
    assert!(log.records().iter().all(|r| r.op_id != op_id(4)), "the lost operation is nowhere");
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_append_that_landed_unanswered_is_rebuilt_and_its_retry_gets_the_first_result() {
    let log = MemoryLog::default();
    let kernel = start(&log, settings(2)).await;
    log.fail_next(&[Fault::Unacknowledged]);
    assert_eq!(kernel.durable(1, spawn("landed")).await, Err(ErrorCode::Unavailable));
    // The retry, with the same operation id, is a duplicate of what the log holds.
    let retry = kernel.send(1, spawn("landed")).await.unwrap().unwrap();
    assert_eq!(retry.accepted.seq, 1);
    assert!(matches!(&retry.accepted.events[..], [Event::AgentSpawned { .. }]));
    retry.durable.await.unwrap().unwrap();
    assert_eq!(log.records().len(), 1, "written once");
    // The same id for another operation is refused.
    let reused = kernel.send(1, spawn("other")).await.unwrap().unwrap_err();
    assert_eq!(reused.code, ErrorCode::Conflict);
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_is_released_only_once_the_first_is_durable() {
    let log = MemoryLog::default();
    log.set_latency(Duration::from_millis(10));
    let kernel = start(&log, settings(1)).await;
    let first = kernel.send(1, spawn("once")).await.unwrap().unwrap();
    let again = kernel.send(1, spawn("once")).await.unwrap().unwrap();
    assert_eq!((again.accepted.seq, &again.accepted.events), (first.accepted.seq, &first.accepted.events));
    let mut again_durable = again.durable;
    assert!(tokio::time::timeout(Duration::from_millis(9), &mut again_durable).await.is_err());
    assert!(log.records().is_empty(), "the first is not durable yet");
    again_durable.await.unwrap().unwrap();
    assert_eq!(log.records().len(), 1);
    first.durable.await.unwrap().unwrap();
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_query_sees_what_was_applied_before_it_once_that_is_durable() {
    let log = MemoryLog::default();
    log.set_latency(Duration::from_millis(10));
    let kernel = start(&log, settings(2)).await;
    let spawned = kernel.send(1, spawn("seen")).await.unwrap().unwrap();
    let (tx, mut answer) = oneshot::channel();
    let query: super::Query = Box::new(move |state: &State| {
        let agents = state.agent_ids().count();
        Box::new(move || {
            let _ = tx.send(agents);
        })
    });
    kernel.inputs.try_send(Input::Query(query)).unwrap();
    assert!(tokio::time::timeout(Duration::from_millis(9), &mut answer).await.is_err(), "held until durable");
    assert_eq!(answer.await.unwrap(), 1, "computed after the spawn");
    spawned.durable.await.unwrap().unwrap();
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_passed_deadline_fires_through_a_logged_tick() {
    let log = MemoryLog::default();
    let kernel = start(&log, settings(2)).await;
    kernel.durable(1, spawn("owner")).await.unwrap();
    let agent = match &log.records()[0].events[..] {
        [Event::AgentSpawned { agent, .. }] => *agent,
        other => panic!("{other:?}"),
    };
    let task = TaskSpec {
        agent,
        queue: "jobs".parse().unwrap(),
        payload: "x".into(),
        priority: 5,
        timeouts: Timeouts { schedule_to_start_us: Some(50_000), ..Timeouts::default() },
        retry: Default::default(),
    };
    let scheduled_at = tokio::time::Instant::now();
    kernel.durable(2, Operation::ScheduleTask(task)).await.unwrap();
    let mut hashes = kernel.hashes.clone();
    hashes.wait_for(|(seq, _)| *seq == 3).await.unwrap();
    let waited = scheduled_at.elapsed();
    assert!(waited >= Duration::from_millis(50) && waited <= Duration::from_millis(70), "fired after {waited:?}");
    let tick = &log.records()[2];
    assert_eq!(
        (&tick.op, tick.principal.as_str()),
        (&Operation::Tick { max_fired: Some(crate::machine::max_fired_within(512 * 1024)) }, super::SEQUENCER)
    );
    assert!(matches!(
        &tick.events[..],
        [Event::TaskTimedOut { timeout: TimeoutKind::ScheduleToStart, retry_at_us: None, .. }]
    ));
    // Replay fires the same timeout.
    assert_eq!(replayed(&log).await.hash().unwrap(), hashes.borrow().1);
    kernel.stop().await;
}

#[tokio::test]
async fn a_snapshot_is_stored_and_recovery_starts_from_it() {
    let log = MemoryLog::default();
    let kernel = start(&log, Settings { snapshot_every: 5, ..settings(2) }).await;
    for i in 1..=7 {
        kernel.durable(i, spawn("a")).await.unwrap();
    }
    // Encoded and uploaded off the sequencer's task.
    let mut waited = 0;
    while log.snapshots().is_empty() {
        assert!(waited < 500, "no snapshot within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 1;
    }
    let mut hashes = kernel.hashes.clone();
    let hash = hashes.wait_for(|(seq, _)| *seq == 7).await.unwrap().1;
    kernel.stop().await;
    let recovered = recovery::recover(&log, WINDOW).await.unwrap();
    assert!(recovered.snapshot_seq >= 5, "started from the snapshot at {}", recovered.snapshot_seq);
    assert_eq!(recovered.replayed, 7 - recovered.snapshot_seq);
    assert_eq!(recovered.state.hash().unwrap(), hash);
}

/// The log in `fixtures/kernel-log-v1.jsonl`: every operation type, deadlines of each kind
/// firing through ticks (a retry, a parking), a terminate cascading through a subtree with open
/// tasks. Written by the sequencer of December 2026 (run with `TOKA_WRITE_FIXTURE=1` and
/// `--ignored` to write it again, which only a change of the log's format may need).
#[tokio::test(start_paused = true)]
#[ignore = "writes the fixture"]
async fn write_the_replay_fixture() {
    use toka_contract::spec::{ResourceLimits, RetryPolicy};
    use toka_contract::{AgentId, TaskId};
    assert_eq!(std::env::var("TOKA_WRITE_FIXTURE").as_deref(), Ok("1"), "set TOKA_WRITE_FIXTURE=1");
    let log = MemoryLog::default();
    let kernel = start(&log, settings(2)).await;
    let mut n = 0;
    let mut run = async |op: Operation| {
        n += 1;
        let applied = kernel.send(n, op).await.unwrap().unwrap();
        applied.durable.await.unwrap().unwrap();
        applied.accepted.events
    };
    let agent_of = |events: Vec<Event>| match &events[..] {
        [Event::AgentSpawned { agent, .. }] => *agent,
        other => panic!("{other:?}"),
    };
    let task_of = |events: Vec<Event>| match &events[..] {
        [Event::TaskScheduled { task, .. }] => *task,
        other => panic!("{other:?}"),
    };
    let child = |name: &str, parent: AgentId| {
        Operation::SpawnAgent(AgentSpec {
            name: name.parse().unwrap(),
            parent: Some(parent),
            limits: Default::default(),
        })
    };
    let limits = ResourceLimits { memory_bytes: Some(1_000), cpu_millicores: Some(500), io_bytes: Some(10_000) };
    let root =
        agent_of(run(Operation::SpawnAgent(AgentSpec { name: "root".parse().unwrap(), parent: None, limits })).await);
    let planner = agent_of(run(child("planner", root)).await);
    let helper = agent_of(run(child("helper", planner)).await);
    let task = |agent: AgentId, queue: &str, timeouts: Timeouts, max_attempts: u32| {
        Operation::ScheduleTask(TaskSpec {
            agent,
            queue: queue.parse().unwrap(),
            payload: format!("{{\"queue\":\"{queue}\"}}"),
            priority: 3,
            timeouts,
            retry: RetryPolicy {
                max_attempts,
                initial_backoff_us: 20_000,
                backoff_multiplier_pct: 200,
                max_backoff_us: 100_000,
            },
        })
    };
    let claim = |queue: &str| Operation::ClaimTask { queue: queue.parse().unwrap(), worker: "w-1".into() };
    let ms = |ms: u64| Some(ms * 1_000);
    // Never claimed: schedule-to-start fires.
    task_of(run(task(root, "unclaimed", Timeouts { schedule_to_start_us: ms(50), ..Timeouts::default() }, 3)).await);
    // Start-to-close fires twice: a retry, then parked.
    task_of(run(task(root, "slow", Timeouts { start_to_close_us: ms(30), ..Timeouts::default() }, 2)).await);
    run(claim("slow")).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    run(claim("slow")).await;
    tokio::time::sleep(Duration::from_millis(80)).await;
    // A heartbeat, then the heartbeat deadline fires.
    let beat = task_of(run(task(planner, "beat", Timeouts { heartbeat_us: ms(40), ..Timeouts::default() }, 1)).await);
    run(claim("beat")).await;
    run(Operation::HeartbeatTask { task: beat, attempt: 1 }).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Completed; failed and retried, then completed; cancelled.
    let done = task_of(run(task(planner, "work", Timeouts::default(), 3)).await);
    run(claim("work")).await;
    run(Operation::CompleteTask { task: done, attempt: 1, result: "ok".into() }).await;
    let flaky = task_of(run(task(planner, "work", Timeouts::default(), 3)).await);
    run(claim("work")).await;
    run(Operation::FailTask { task: flaky, attempt: 1, error: "tool crashed".into(), retryable: true }).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    run(claim("work")).await;
    run(Operation::CompleteTask { task: flaky, attempt: 2, result: "ok on retry".into() }).await;
    let dropped = task_of(run(task(root, "work", Timeouts::default(), 3)).await);
    run(Operation::CancelTask { task: dropped, reason: "not needed".into() }).await;
    // Observations, reports (over the limits), suspend and resume.
    run(Operation::EmitObservation {
        agent: helper,
        kind: "tool.call".parse().unwrap(),
        body: "{\"tool\":\"search\"}".into(),
    })
    .await;
    run(Operation::ReportMemory { agent: root, bytes: 2_000 }).await;
    run(Operation::ReportCpu { agent: root, millicores: 250 }).await;
    run(Operation::ReportIo { agent: root, read_bytes: 6_000, write_bytes: 6_000, ops: 3 }).await;
    run(Operation::SuspendAgent { agent: helper, reason: "paused".into() }).await;
    run(Operation::ResumeAgent { agent: helper }).await;
    // Open tasks under the subtree, then a terminate cascading through it.
    let _open: Vec<TaskId> = vec![
        task_of(run(task(helper, "later", Timeouts::default(), 3)).await),
        task_of(
            run(task(planner, "later", Timeouts { schedule_to_start_us: ms(500), ..Timeouts::default() }, 3)).await,
        ),
    ];
    run(Operation::TerminateAgent { agent: planner, reason: "plan finished".into() }).await;
    let mut hashes = kernel.hashes.clone();
    let last = log.records().len() as u64;
    hashes.wait_for(|(seq, _)| *seq == last).await.unwrap();
    let hash = hashes.borrow().1;
    kernel.stop().await;
    let records = log.records();
    let ticks = records.iter().filter(|r| matches!(r.op, Operation::Tick { .. })).count();
    assert!(ticks >= 4, "{ticks} ticks");
    let mut out = String::new();
    for record in &records {
        out.push_str(&serde_json::to_string(record).unwrap());
        out.push('\n');
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("kernel-log-v1.jsonl"), out).unwrap();
    std::fs::write(dir.join("kernel-log-v1.state-hash"), format!("{hash}\n")).unwrap();
}

/// A log written before a change of the operations (see `write_the_replay_fixture`) replays,
/// chained as it was, to the state hash the kernel that wrote it reported.
#[test]
fn a_log_written_by_an_earlier_kernel_replays_to_its_state_hash() {
    let records: Vec<toka_contract::KernelRecord> = include_str!("../../fixtures/kernel-log-v1.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let mut state = State::new(WINDOW);
    let mut prev = toka_contract::Hash::ZERO;
    for record in &records {
        assert_eq!((record.prev_hash, record.compute_hash().unwrap()), (prev, record.hash), "record {}", record.seq);
        prev = record.hash;
        state.replay(record).unwrap();
    }
    assert_eq!(records.len(), 33);
    let expected = include_str!("../../fixtures/kernel-log-v1.state-hash").trim();
    assert_eq!(state.hash().unwrap().to_string(), expected);
}

/// The agent a spawn made.
fn spawned(events: &[Event]) -> toka_contract::AgentId {
    match events {
        [Event::AgentSpawned { agent, .. }] => *agent,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_backlog_of_passed_deadlines_fires_over_ticks_that_each_fit_the_record_bound() {
    let log = MemoryLog::default();
    let max_record_bytes = 16 * 1024;
    let kernel = start(&log, Settings { max_record_bytes, ..settings(2) }).await;
    let applied = kernel.send(1, spawn("owner")).await.unwrap().unwrap();
    let agent = spawned(&applied.accepted.events);
    let timeouts = Timeouts { schedule_to_start_us: Some(50_000), ..Timeouts::default() };
    let waits: Vec<_> = (0..500)
        .map(|i| {
            let spec = TaskSpec {
                agent,
                queue: "jobs".parse().unwrap(),
                payload: String::new(),
                priority: 0,
                timeouts,
                retry: Default::default(),
            };
            kernel.send(2 + i, Operation::ScheduleTask(spec))
        })
        .collect();
    for wait in waits {
        wait.await.unwrap().unwrap().durable.await.unwrap().unwrap();
    }
    let mut hashes = kernel.hashes.clone();
    let fired = |log: &MemoryLog| {
        log.records().iter().flat_map(|r| r.events.clone()).filter(|e| matches!(e, Event::TaskTimedOut { .. })).count()
    };
    let mut waited = 0;
    while fired(&log) < 500 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        waited += 10;
        assert!(waited < 2_000, "{} of 500 fired", fired(&log));
    }
    let per_tick = crate::machine::max_fired_within(max_record_bytes);
    let ticks: Vec<_> = log.records().into_iter().filter(|r| matches!(r.op, Operation::Tick { .. })).collect();
    assert_eq!(ticks.len(), 500usize.div_ceil(per_tick as usize), "{per_tick} deadlines a tick");
    for tick in &ticks {
        assert_eq!(tick.op, Operation::Tick { max_fired: Some(per_tick) });
        let bytes = serde_json::to_vec(tick).unwrap().len();
        assert!(bytes <= max_record_bytes, "a tick of {bytes} bytes");
    }
    // Replay fires the same deadlines at the same ticks.
    let last = log.records().len() as u64;
    hashes.wait_for(|(seq, _)| *seq == last).await.unwrap();
    assert_eq!(replayed(&log).await.hash().unwrap(), hashes.borrow().1);
    kernel.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_terminate_too_large_for_a_record_is_refused_and_the_kernel_goes_on() {
    let log = MemoryLog::default();
    let kernel = start(&log, Settings { max_record_bytes: 16 * 1024, ..settings(2) }).await;
    let root = spawned(&kernel.send(1, spawn("root")).await.unwrap().unwrap().accepted.events);
    let children: Vec<_> = (0..300)
        .map(|i| {
            let spec = AgentSpec { name: "child".parse().unwrap(), parent: Some(root), limits: Default::default() };
            kernel.send(2 + i, Operation::SpawnAgent(spec))
        })
        .collect();
    for child in children {
        child.await.unwrap().unwrap().durable.await.unwrap().unwrap();
    }
    let mut hashes = kernel.hashes.clone();
    hashes.wait_for(|(seq, _)| *seq == 301).await.unwrap();
    let before = hashes.borrow().1;
    let refused = kernel.send(400, Operation::TerminateAgent { agent: root, reason: "all".into() }).await.unwrap();
    let error = refused.unwrap_err();
    assert_eq!(error.code, ErrorCode::TooLarge);
    assert_eq!(
        (error.details["limit"].as_str(), error.details["max"].as_u64()),
        (Some("kernel.max_record_bytes"), Some(16_384))
    );
    // Nothing changed, nothing was logged, and the kernel takes the next operation.
    assert_eq!(kernel.durable(401, spawn("after")).await, Ok(302));
    assert_eq!(log.records().len(), 302);
    hashes.wait_for(|(seq, _)| *seq == 302).await.unwrap();
    assert_eq!(replayed(&log).await.hash().unwrap(), hashes.borrow().1);
    assert_ne!(before, hashes.borrow().1);
    kernel.stop().await;
}
