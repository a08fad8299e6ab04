//! The kernel over NATS with storage and auth running: operations verified, sequenced, made
//! durable and answered; duplicates; denials; queries; deadlines fired by logged ticks; a
//! standby taking over with the same state hash; storage stopped mid-load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use toka_contract::access::Role;
use toka_contract::api::auth::{Credential, IssueRequest, TokenReply};
use toka_contract::api::kernel::{
    AgentGetRequest, AgentListReply, AgentListRequest, AgentState, AgentView, BatchItem, SubmitBatchReply,
    SubmitBatchRequest, SubmitReply, SubmitRequest, TaskGetRequest, TaskListReply, TaskListRequest, TaskState,
    TaskView,
};
use toka_contract::capability::{Action, Capability, Pattern};
use toka_contract::record::{Hash, LogName};
use toka_contract::spec::{AgentSpec, TaskSpec};
use toka_contract::subject::{self, service};
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{AgentId, Event, OpId, Operation, TaskId};
use toka_runtime::bus::{Bus, RequestError};
use tokio::sync::watch;

use crate::assert_eventually;
use crate::auth::start_auth;
use crate::harness::{Nats, Running, TempDir, spawn_service, temp_dir};
use crate::storage::start_storage;

/// A kernel reporting its (durable seq, state hash).
pub(crate) async fn start_kernel(nats: &Nats, instance: &str) -> (Running, watch::Receiver<(u64, Hash)>) {
    start_kernel_with(nats, instance, |_| {}).await
}

/// A kernel with the test's changes to its settings, reporting its (durable seq, state hash).
pub(crate) async fn start_kernel_with(
    nats: &Nats,
    instance: &str,
    tweak: impl FnOnce(&mut toka_kernel::KernelConfig),
) -> (Running, watch::Receiver<(u64, Hash)>) {
    let (report, hashes) = watch::channel((0, Hash::ZERO));
    let mut kernel = toka_kernel::KernelConfig {
        instance: instance.into(),
        lease_ttl_ms: 900,
        tick_ms: 20,
        snapshot_every: 50,
        ..Default::default()
    };
    tweak(&mut kernel);
    let running = spawn_service(service::KERNEL, nats, Role::Kernel, move |nats, admin, bus, stop| {
        toka_kernel::run_reporting(toka_kernel::Config { nats, admin, kernel, ..Default::default() }, bus, stop, report)
    })
    .await;
    (running, hashes)
}

pub(crate) struct Stack {
    pub(crate) nats: Nats,
    pub(crate) dir: TempDir,
    pub(crate) storage: Option<Running>,
    pub(crate) auth: Running,
    admin_key: String,
    /// The operator's connection, which issues tokens with the admin key.
    pub(crate) operators: Bus,
    /// A client's connection, admitted with a token that may do everything to agents and tasks.
    pub(crate) client: Bus,
}

impl Stack {
    pub(crate) async fn start(tag: &str) -> Option<Stack> {
        Self::start_with(tag, |_| {}).await
    }

    /// A stack whose auth is configured by `tweak` as well.
    pub(crate) async fn start_with(tag: &str, tweak: impl FnOnce(&mut toka_auth::AuthConfig)) -> Option<Stack> {
        let nats = Nats::start().await?;
        let dir = temp_dir(tag);
        let storage = start_storage(&nats, &dir.path().join("storage")).await;
        let admin_key = toka_runtime::deploy::new_admin_key().unwrap();
        let key_file = dir.path().join("admin.key");
        toka_runtime::deploy::write_secret(&key_file, &admin_key).unwrap();
        let auth = start_auth(&nats, &dir.path().join("keys"), move |c| {
            c.admin_key_file = Some(key_file);
            tweak(c);
        })
        .await;
        let operators = nats.connect(Role::Operator).await;
        let token = issue(&operators, &admin_key, "client", everything(), Duration::from_secs(3_600)).await;
        let client = nats.client(&token).await.bus().clone();
        Some(Stack { nats, dir, storage: Some(storage), auth, admin_key, operators, client })
    }

    pub(crate) async fn token(&self, sub: &str, caps: Vec<Capability>) -> String {
        issue(&self.operators, &self.admin_key, sub, caps, Duration::from_secs(3_600)).await
    }

    /// A token that lives `ttl`.
    pub(crate) async fn short_token(&self, sub: &str, caps: Vec<Capability>, ttl: Duration) -> String {
        issue(&self.operators, &self.admin_key, sub, caps, ttl).await
    }

    /// Where auth keeps its signing keys.
    pub(crate) fn keys_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("keys")
    }

    /// Revokes `jti` with the admin key.
    pub(crate) async fn revoke(&self, jti: toka_contract::TokenId) {
        let request = toka_contract::api::auth::RevokeRequest {
            credential: Credential::AdminKey(self.admin_key.clone()),
            jti,
            reason: "test".into(),
        };
        let _: toka_contract::api::auth::RevokeReply =
            self.operators.request(subject::AUTH_REVOKE.subject, &request).await.unwrap();
    }

    /// Rotates auth's signing key with the admin key.
    pub(crate) async fn rotate(&self) {
        let request =
            toka_contract::api::auth::RotateRequest { credential: Credential::AdminKey(self.admin_key.clone()) };
        let _: toka_contract::api::auth::RotateReply =
            self.operators.request(subject::AUTH_ROTATE.subject, &request).await.unwrap();
    }

    pub(crate) async fn operator(&self) -> String {
        self.token("operator", everything()).await
    }

    pub(crate) async fn kernel_log(&self) -> Vec<toka_contract::KernelRecord> {
        self.nats.read_log::<Operation>(LogName::Kernel).await
    }

    pub(crate) async fn audit_log(&self) -> Vec<toka_contract::AuditRecord> {
        self.nats.read_log::<toka_contract::record::AuditEntry>(LogName::Audit).await
    }
}

/// A token from auth, issued with the admin key over the operator's connection.
async fn issue(operators: &Bus, admin_key: &str, sub: &str, caps: Vec<Capability>, ttl: Duration) -> String {
    let request = IssueRequest {
        credential: Credential::AdminKey(admin_key.to_owned()),
        sub: sub.parse().unwrap(),
        capabilities: caps,
        ttl_ms: ttl.as_millis() as u64,
        one_time: false,
    };
    let reply: TokenReply = operators.request(subject::AUTH_ISSUE.subject, &request).await.unwrap();
    reply.token
}

/// Every action on every agent and every queue.
pub(crate) fn everything() -> Vec<Capability> {
    vec![Capability::new(Pattern::AnyAgent, AGENT_ACTIONS), Capability::new(Pattern::AnyQueue, TASK_ACTIONS)]
}

const AGENT_ACTIONS: &[Action] = &[
    Action::Spawn,
    Action::Suspend,
    Action::Resume,
    Action::Terminate,
    Action::Schedule,
    Action::Cancel,
    Action::Observe,
    Action::Report,
    Action::Read,
];
const TASK_ACTIONS: &[Action] = &[Action::Claim, Action::Heartbeat, Action::Complete, Action::Fail, Action::Read];

static NEXT_OP: AtomicU64 = AtomicU64::new(1);

/// The state `records` replay to, from nothing; every record must replay.
fn replay(records: &[toka_contract::KernelRecord]) -> toka_kernel::machine::State {
    let mut state = toka_kernel::machine::State::default();
    for record in records {
        state.replay(record).unwrap();
    }
    state
}

pub(crate) fn op_id() -> OpId {
    OpId::from_u128(u128::from(NEXT_OP.fetch_add(1, Ordering::Relaxed)) | (7 << 100))
}

pub(crate) async fn submit(bus: &Bus, token: &str, op_id: OpId, op: Operation) -> Result<SubmitReply, WireError> {
    let request = SubmitRequest { op_id, token: token.to_owned(), op };
    bus.request(subject::KERNEL_SUBMIT.subject, &request).await.map_err(|e| match e {
        RequestError::Remote(e) => e,
        other => other.to_wire(),
    })
}

pub(crate) fn spawn(name: &str, parent: Option<AgentId>) -> Operation {
    Operation::SpawnAgent(AgentSpec { name: name.parse().unwrap(), parent, limits: Default::default() })
}

pub(crate) fn spawned(reply: &SubmitReply) -> AgentId {
    match &reply.events[0] {
        Event::AgentSpawned { agent, .. } => *agent,
        other => panic!("expected agent.spawned, got {other:?}"),
    }
}

fn scheduled(reply: &SubmitReply) -> TaskId {
    match &reply.events[0] {
        Event::TaskScheduled { task, .. } => *task,
        other => panic!("expected task.scheduled, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_verified_sequenced_durable_and_queryable() {
    let Some(stack) = Stack::start("kernel-e2e").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k1").await;
    let op = stack.operator().await;
    let bus = &stack.client;

    let first_id = op_id();
    let root = submit(bus, &op, first_id, spawn("root", None)).await.unwrap();
    let agent = spawned(&root);
    let again = submit(bus, &op, first_id, spawn("root", None)).await.unwrap();
    assert_eq!((again.seq, again.events.clone()), (root.seq, root.events.clone()), "a duplicate gets the first result");
    let reused = submit(bus, &op, first_id, spawn("other", None)).await.unwrap_err();
    assert_eq!(reused.code, ErrorCode::Conflict, "{reused:?}");

    let spec = |timeouts| TaskSpec {
        agent,
        queue: "builds".parse().unwrap(),
        payload: "make all".into(),
        priority: 0,
        timeouts,
        retry: toka_contract::spec::RetryPolicy { max_attempts: 1, ..Default::default() },
    };
    let task = scheduled(&submit(bus, &op, op_id(), Operation::ScheduleTask(spec(Default::default()))).await.unwrap());
    let worker = stack
        .token(
            "worker-1",
            vec![Capability::new(
                Pattern::Queue("builds".parse().unwrap()),
                &[Action::Claim, Action::Complete, Action::Read],
            )],
        )
        .await;
    let claim = Operation::ClaimTask { queue: "builds".parse().unwrap(), worker: "w1".into() };
    let claimed = submit(bus, &worker, op_id(), claim.clone()).await.unwrap();
    assert!(matches!(&claimed.events[0], Event::TaskClaimed { task: t, .. } if *t == task), "{:?}", claimed.events);
    let complete = Operation::CompleteTask { task, attempt: 1, result: "ok".into() };
    let done = submit(bus, &worker, op_id(), complete).await.unwrap();
    assert!(matches!(&done.events[0], Event::TaskCompleted { .. }), "{:?}", done.events);
    let empty = submit(bus, &worker, op_id(), claim).await.unwrap_err();
    assert_eq!(empty.code, ErrorCode::NotFound, "{empty:?}");

    // Deadlines fire through logged ticks. Never claimed within 100 ms: timed out.
    let task_state = |task: TaskId| {
        let req = TaskGetRequest { token: op.clone(), task };
        async move { bus.request::<_, TaskView>(subject::KERNEL_TASK_GET.subject, &req).await.unwrap() }
    };
    let timeouts = toka_contract::spec::Timeouts { schedule_to_start_us: Some(100_000), ..Default::default() };
    let late = scheduled(&submit(bus, &op, op_id(), Operation::ScheduleTask(spec(timeouts))).await.unwrap());
    assert_eventually!(
        Duration::from_secs(5),
        task_state(late).await.state == TaskState::TimedOut,
        "timed out unclaimed"
    );
    // Claimed but never completed within 100 ms: retried after its backoff, then parked when
    // the attempts are used up.
    let flaky = TaskSpec {
        queue: "slow".parse().unwrap(),
        timeouts: toka_contract::spec::Timeouts { start_to_close_us: Some(100_000), ..Default::default() },
        retry: toka_contract::spec::RetryPolicy { max_attempts: 2, initial_backoff_us: 50_000, ..Default::default() },
        ..spec(Default::default())
    };
    let flaky = scheduled(&submit(bus, &op, op_id(), Operation::ScheduleTask(flaky)).await.unwrap());
    let claim_slow = Operation::ClaimTask { queue: "slow".parse().unwrap(), worker: "w2".into() };
    submit(bus, &op, op_id(), claim_slow.clone()).await.unwrap();
    assert_eventually!(
        Duration::from_secs(5),
        {
            let view = task_state(flaky).await;
            view.state == TaskState::Scheduled && view.attempt == 1
        },
        "the timed-out attempt is retried"
    );
    assert_eventually!(
        Duration::from_secs(5),
        submit(bus, &op, op_id(), claim_slow.clone()).await.is_ok(),
        "claimed again after the backoff"
    );
    assert_eventually!(
        Duration::from_secs(5),
        task_state(flaky).await.state == TaskState::Parked,
        "parked after two attempts"
    );

    // A token for another agent may not act on this one; the kernel says why.
    let other = spawned(&submit(bus, &op, op_id(), spawn("other", None)).await.unwrap());
    let narrow = stack.token("agent-other", vec![Capability::new(Pattern::Subtree(other), AGENT_ACTIONS)]).await;
    let denied =
        submit(bus, &narrow, op_id(), Operation::TerminateAgent { agent, reason: "no".into() }).await.unwrap_err();
    assert_eq!(denied.code, ErrorCode::Forbidden, "{denied:?}");
    let child = submit(bus, &narrow, op_id(), spawn("child", Some(other))).await.unwrap();
    assert!(matches!(&child.events[0], Event::AgentSpawned { parent: Some(p), .. } if *p == other));
    assert_eventually!(
        Duration::from_secs(5),
        stack.audit_log().await.iter().any(|r| {
            r.principal.as_str() == "agent-other"
                && r.op.action == "agent.terminate"
                && r.op.decision == toka_contract::record::Decision::Deny
                && r.op.resource == format!("agent:{agent}")
        }),
        "the denial is in the audit log"
    );
    let garbage = submit(bus, "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln", op_id(), spawn("x", None)).await.unwrap_err();
    assert_eq!(garbage.code, ErrorCode::Unauthorized);

    // Queries, with the caller's read rights applied.
    let view: AgentView =
        bus.request(subject::KERNEL_AGENT_GET.subject, &AgentGetRequest { token: op.clone(), agent }).await.unwrap();
    assert_eq!((view.name.as_str(), view.state), ("root", AgentState::Running));
    let hidden = bus
        .request::<_, AgentView>(subject::KERNEL_AGENT_GET.subject, &AgentGetRequest { token: narrow.clone(), agent })
        .await
        .unwrap_err();
    assert!(matches!(hidden, RequestError::Remote(ref e) if e.code == ErrorCode::Forbidden), "{hidden:?}");
    let list = AgentListRequest { token: narrow.clone(), parent: None, state: None, after: None, limit: 100 };
    let mine: AgentListReply = bus.request(subject::KERNEL_AGENT_LIST.subject, &list).await.unwrap();
    assert_eq!(mine.agents.len(), 2, "only its own subtree: {:?}", mine.agents);
    let page = AgentListRequest { token: op.clone(), parent: None, state: None, after: None, limit: 1 };
    let first: AgentListReply = bus.request(subject::KERNEL_AGENT_LIST.subject, &page).await.unwrap();
    assert_eq!(first.agents.len(), 1);
    assert!(first.next_after.is_some(), "paged");
    let tasks = TaskListRequest {
        token: worker.clone(),
        agent: None,
        queue: Some("builds".parse().unwrap()),
        state: Some(TaskState::Completed),
        after: None,
        limit: 10,
    };
    let completed: TaskListReply = bus.request(subject::KERNEL_TASK_LIST.subject, &tasks).await.unwrap();
    assert_eq!(completed.tasks.iter().map(|t| t.task).collect::<Vec<_>>(), vec![task]);

    // A spawned agent gets a token for itself and its descendants, delegated by auth; it uses
    // it to spawn in turn (auth checks the descent against the kernel log), not upwards.
    let kid_reply = submit(bus, &op, op_id(), spawn("kid", Some(agent))).await.unwrap();
    let kid = spawned(&kid_reply);
    let kid_token = kid_reply.agent_token.expect("a token for the spawned agent");
    let claims = toka_runtime::token::Verifier::new(
        &bus.request(subject::AUTH_JWKS.subject, &toka_contract::api::auth::JwksRequest::default()).await.unwrap(),
        0,
    )
    .unwrap()
    .verify(&kid_token, std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs())
    .unwrap();
    assert_eq!(claims.sub.as_str(), format!("agent:{kid}"));
    assert_eq!(claims.caps.iter().map(|c| c.resource.clone()).collect::<Vec<_>>(), vec![Pattern::Subtree(kid)]);
    assert_eq!(claims.depth, 1, "delegated from the spawner's token");
    let grandkid_reply = submit(bus, &kid_token, op_id(), spawn("grandkid", Some(kid))).await.unwrap();
    let grandkid_token = grandkid_reply.agent_token.expect("the child's child gets one too");
    let upwards =
        submit(bus, &kid_token, op_id(), Operation::SuspendAgent { agent, reason: "mine".into() }).await.unwrap_err();
    assert_eq!(upwards.code, ErrorCode::Forbidden, "{upwards:?}");
    let sideways = submit(bus, &grandkid_token, op_id(), spawn("x", Some(kid))).await.unwrap_err();
    assert_eq!(sideways.code, ErrorCode::Forbidden, "{sideways:?}");

    // Terminating an agent terminates its subtree.
    let cascade =
        submit(bus, &op, op_id(), Operation::TerminateAgent { agent: other, reason: "done".into() }).await.unwrap();
    let terminated: Vec<AgentId> = cascade
        .events
        .iter()
        .filter_map(|e| match e {
            Event::AgentTerminated { agent, .. } => Some(*agent),
            _ => None,
        })
        .collect();
    assert_eq!(terminated.len(), 2, "the agent and its child: {:?}", cascade.events);
    assert!(terminated.contains(&other));

    // A batch: one result per operation, in order, contiguous sequences.
    let ops = (0..50).map(|i| BatchItem { op_id: op_id(), op: spawn(&format!("b{i}"), Some(agent)) }).collect();
    let batch: SubmitBatchReply = bus
        .request(subject::KERNEL_SUBMIT_BATCH.subject, &SubmitBatchRequest { token: op.clone(), ops })
        .await
        .unwrap();
    let replies: Vec<SubmitReply> = batch.results.into_iter().map(|r| r.into_result().unwrap()).collect();
    let seqs: Vec<u64> = replies.iter().map(|r| r.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    assert!(replies.iter().all(|r| r.agent_token.is_some()), "every spawned agent of the batch gets its token");

    // Everything acknowledged is in the log, chained, and replays.
    let log = stack.kernel_log().await;
    assert_eq!(log.last().unwrap().seq, *seqs.last().unwrap());
    toka_contract::record::verify_chain(&log, 0, Hash::ZERO).unwrap();
    assert!(log.iter().any(|r| matches!(r.op, Operation::Tick { .. })), "the tick is logged");
    replay(&log);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_with_the_state_hash_of_the_log() {
    let Some(stack) = Stack::start("kernel-standby").await else { return };
    let (active, active_hash) = start_kernel(&stack.nats, "active").await;
    let (report, mut standby_hash) = watch::channel((0, Hash::ZERO));
    let standby_config =
        toka_kernel::KernelConfig { instance: "standby".into(), lease_ttl_ms: 900, ..Default::default() };
    let standby_bus = stack.nats.connect(Role::Kernel).await;
    let (stop_standby, stopped) = tokio::sync::oneshot::channel::<()>();
    let config =
        toka_kernel::Config { nats: stack.nats.config(Role::Kernel), kernel: standby_config, ..Default::default() };
    let standby = tokio::spawn(toka_kernel::run_reporting(
        config,
        standby_bus,
        async move {
            let _ = stopped.await;
        },
        report,
    ));

    let op = Arc::new(stack.operator().await);
    let root = spawned(&submit(&stack.client, &op, op_id(), spawn("root", None)).await.unwrap());
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (bus, op) = (stack.client.clone(), op.clone());
        load.spawn(async move {
            for i in 0..25 {
                submit(&bus, &op, op_id(), spawn(&format!("w{worker}-{i}"), Some(root))).await.unwrap();
            }
        });
    }
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    assert_eventually!(Duration::from_secs(5), active_hash.borrow().0 == 201, "quiescent at 201");
    let at_stop = *active_hash.borrow();
    assert_eq!(*standby_hash.borrow(), (0, Hash::ZERO), "the standby waits without a state");
    // The active stored snapshots (every 50 records): the standby starts from one.
    let kernel_bus = stack.nats.connect(Role::Kernel).await;
    let snapshot =
        toka_contract::api::storage::SnapshotGetRequest { log: LogName::Kernel, at_or_before: None, chunk: 0 };
    assert_eventually!(
        Duration::from_secs(5),
        kernel_bus
            .request::<_, toka_contract::api::storage::SnapshotGetReply>(
                subject::STORAGE_SNAPSHOT_GET.subject,
                &snapshot
            )
            .await
            .is_ok_and(|s| s.seq >= 50),
        "a snapshot was stored"
    );
    let stored: toka_contract::api::storage::SnapshotGetReply =
        kernel_bus.request(subject::STORAGE_SNAPSHOT_GET.subject, &snapshot).await.unwrap();
    let stored = base64::engine::general_purpose::STANDARD.decode(&stored.data).unwrap();
    assert_eq!(stored[..4], [0x28, 0xb5, 0x2f, 0xfd], "stored as a zstd frame");
    // The status names the sequencer, the lease holder, the durable head with its state hash,
    // and the standby; only to tokens that may read every agent.
    let operator = toka_client::Client::new(stack.client.clone(), (*op).clone());
    let status = operator.status().await.unwrap();
    assert_eq!(
        (status.instance.as_str(), status.lease_holder.as_deref(), status.head_seq, status.state_hash, status.standbys),
        ("active", Some("active"), at_stop.0, at_stop.1, 1)
    );
    let narrow = stack.token("narrow", vec![Capability::new(Pattern::Agent(root), &[Action::Read])]).await;
    let refused = operator.with_token(narrow).status().await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Forbidden);

    active.stop().await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), standby_hash.wait_for(|h| h.0 == at_stop.0)).await.unwrap().unwrap();
    assert_eq!(*standby_hash.borrow(), at_stop, "the standby rebuilt the same state from the log");
    let more = submit(&stack.client, &op, op_id(), spawn("after", Some(root))).await.unwrap();
    assert_eq!(more.seq, at_stop.0 + 1, "the new sequencer continues the log");
    let status = operator.status().await.unwrap();
    assert_eq!(
        (status.instance.as_str(), status.lease_holder.as_deref(), status.head_seq, status.standbys),
        ("standby", Some("standby"), more.seq, 0)
    );
    let _ = stop_standby.send(());
    standby.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_stopped_mid_load_refuses_callers_loses_nothing_acknowledged_and_resumes() {
    let Some(mut stack) = Stack::start("kernel-storage-down").await else { return };
    let (_kernel, hashes) = start_kernel(&stack.nats, "k").await;
    let op = Arc::new(stack.operator().await);
    let root = spawned(&submit(&stack.client, &op, op_id(), spawn("root", None)).await.unwrap());
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let refused = Arc::new(AtomicU64::new(0));
    let stop_load = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..4 {
        let (bus, op, acknowledged, refused, stop) =
            (stack.client.clone(), op.clone(), acknowledged.clone(), refused.clone(), stop_load.clone());
        load.spawn(async move {
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = op_id();
                match submit(&bus, &op, id, spawn(&format!("w{worker}-{i}"), Some(root))).await {
                    Ok(reply) => acknowledged.lock().unwrap().push((id, reply.seq)),
                    Err(e) => {
                        assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
    }
    assert_eventually!(Duration::from_secs(10), acknowledged.lock().unwrap().len() >= 100, "load running");
    stack.storage.take().unwrap().stop().await.unwrap();
    assert_eventually!(
        Duration::from_secs(10),
        refused.load(Ordering::Relaxed) >= 5,
        "callers refused while storage is down"
    );
    let before = acknowledged.lock().unwrap().len();
    stack.storage = Some(start_storage(&stack.nats, &stack.dir.path().join("storage")).await);
    assert_eventually!(Duration::from_secs(15), acknowledged.lock().unwrap().len() >= before + 100, "service resumed");
    stop_load.store(true, Ordering::Relaxed);
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }
    let log = stack.kernel_log().await;
    toka_contract::record::verify_chain(&log, 0, Hash::ZERO).unwrap();
    for (id, seq) in acknowledged.lock().unwrap().iter() {
        let record = &log[(*seq - 1) as usize];
        assert_eq!(record.op_id, *id, "acknowledged op at {seq} is durable");
    }
    let replayed = replay(&log);
    assert_eventually!(Duration::from_secs(5), hashes.borrow().0 == log.len() as u64, "quiescent");
    assert_eq!(*hashes.borrow(), (log.len() as u64, replayed.hash().unwrap()), "the kernel's state is the log's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_library_claims_heartbeats_completes_and_fails_tasks() {
    use toka_client::worker::{Claimed, Failure, Worker};
    let Some(stack) = Stack::start("kernel-worker").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let op = stack.operator().await;
    let root = spawned(&submit(&stack.client, &op, op_id(), spawn("root", None)).await.unwrap());
    let jobs: toka_contract::spec::QueueName = "jobs".parse().unwrap();
    for payload in ["one two", "three", "bad", "four five six"] {
        let spec = TaskSpec {
            agent: root,
            queue: jobs.clone(),
            payload: payload.into(),
            priority: 0,
            timeouts: toka_contract::spec::Timeouts { heartbeat_us: Some(2_000_000), ..Default::default() },
            retry: toka_contract::spec::RetryPolicy { max_attempts: 1, ..Default::default() },
        };
        submit(&stack.client, &op, op_id(), Operation::ScheduleTask(spec)).await.unwrap();
    }
    let caps = vec![Capability::new(
        Pattern::Queue(jobs.clone()),
        &[Action::Claim, Action::Heartbeat, Action::Complete, Action::Fail, Action::Read],
    )];
    let worker_token = stack.token("worker-7", caps).await;
    let worker = Worker::new(
        toka_client::Client::new(stack.client.clone(), worker_token.clone()),
        jobs.clone(),
        "test-worker".into(),
    );
    let handler = |task: Claimed| async move {
        // Long enough for a few heartbeats at 50 ms.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if task.payload == "bad" {
            Err(Failure { error: "cannot do bad".into(), retryable: false })
        } else {
            Ok(format!("{} words", task.payload.split_whitespace().count()))
        }
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        worker
            .run(Duration::from_millis(50), handler, async move {
                let _ = stopped.await;
            })
            .await
    });
    let list = |state| TaskListRequest {
        token: worker_token.clone(),
        agent: None,
        queue: Some(jobs.clone()),
        state: Some(state),
        after: None,
        limit: 10,
    };
    assert_eventually!(
        Duration::from_secs(10),
        {
            let done: TaskListReply =
                stack.client.request(subject::KERNEL_TASK_LIST.subject, &list(TaskState::Completed)).await.unwrap();
            done.tasks.len() == 3
        },
        "three tasks completed"
    );
    let failed: TaskListReply =
        stack.client.request(subject::KERNEL_TASK_LIST.subject, &list(TaskState::Parked)).await.unwrap();
    let failed_too: TaskListReply =
        stack.client.request(subject::KERNEL_TASK_LIST.subject, &list(TaskState::Failed)).await.unwrap();
    assert_eq!(failed.tasks.len() + failed_too.tasks.len(), 1, "the bad one failed for good");
    let _ = stop.send(());
    assert_eq!(running.await.unwrap(), 4, "four tasks finished");
    let log = stack.kernel_log().await;
    let beats = log.iter().filter(|r| matches!(r.op, Operation::HeartbeatTask { .. })).count();
    assert!(beats >= 4, "heartbeats while working: {beats}");
    let claims: Vec<_> = log.iter().filter(|r| matches!(r.op, Operation::ClaimTask { .. })).collect();
    assert!(claims.iter().all(|r| r.principal.as_str() == "worker-7"));
}

fn start_kernel_process(nats: &Nats, stdout: &std::path::Path) -> std::process::Child {
    let config = nats.config(Role::Kernel);
    std::process::Command::new(crate::binaries::binary("toka-kernel"))
        .env("TOKA_NATS__URL", &config.url)
        .env("TOKA_NATS__NKEY_SEED_FILE", config.nkey_seed_file.unwrap())
        .env("TOKA_NATS__STATE_NKEY_SEED_FILE", config.state_nkey_seed_file.unwrap())
        .env("TOKA_ADMIN__LISTEN", "127.0.0.1:0")
        .env("TOKA_KERNEL__LEASE_TTL_MS", "900")
        .env("TOKA_TELEMETRY__LOG_FORMAT", "json")
        .env("TOKA_TELEMETRY__LOG_FILTER", "info")
        .stdout(std::fs::File::create(stdout).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn kernel_ready(bus: &Bus) -> bool {
    use toka_contract::api::service::{HealthReply, HealthRequest};
    bus.request::<HealthRequest, HealthReply>(subject::KERNEL_HEALTH.subject, &HealthRequest {})
        .await
        .is_ok_and(|h| h.ready)
}

/// The (seq, state hash) a kernel process logged when it recovered.
fn recovered_from(stdout: &std::path::Path) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(stdout).ok()?;
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find_map(|v| {
        let fields = &v["fields"];
        (fields["message"] == "state recovered from the log")
            .then(|| Some((fields["seq"].as_u64()?, fields["state_hash"].as_str()?.to_owned())))
            .flatten()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_killed_under_load_restarts_with_the_state_hash_of_the_durable_log() {
    let Some(stack) = Stack::start("kernel-sigkill").await else { return };
    let first_out = stack.dir.path().join("kernel-1.log");
    let mut first = start_kernel_process(&stack.nats, &first_out);
    assert_eventually!(Duration::from_secs(20), kernel_ready(&stack.client).await, "kernel process ready");
    let op = Arc::new(stack.operator().await);
    let root = spawned(&submit(&stack.client, &op, op_id(), spawn("root", None)).await.unwrap());
    let acknowledged = Arc::new(std::sync::Mutex::new(vec![]));
    let stop_load = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..8 {
        let (bus, op, acknowledged, stop) = (stack.client.clone(), op.clone(), acknowledged.clone(), stop_load.clone());
        load.spawn(async move {
            for i in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let id = op_id();
                match submit(&bus, &op, id, spawn(&format!("w{worker}-{i}"), Some(root))).await {
                    Ok(reply) => acknowledged.lock().unwrap().push((id, reply.seq)),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
    }
    assert_eventually!(Duration::from_secs(20), acknowledged.lock().unwrap().len() >= 300, "load running");
    first.kill().unwrap();
    first.wait().unwrap();
    let at_kill = acknowledged.lock().unwrap().len();

    let second_out = stack.dir.path().join("kernel-2.log");
    let mut second = start_kernel_process(&stack.nats, &second_out);
    assert_eventually!(Duration::from_secs(20), kernel_ready(&stack.client).await, "restarted kernel ready");
    assert_eventually!(Duration::from_secs(20), acknowledged.lock().unwrap().len() >= at_kill + 100, "load resumed");
    stop_load.store(true, Ordering::Relaxed);
    while let Some(done) = load.join_next().await {
        done.unwrap();
    }

    let log = stack.kernel_log().await;
    toka_contract::record::verify_chain(&log, 0, Hash::ZERO).unwrap();
    for (id, seq) in acknowledged.lock().unwrap().iter() {
        assert_eq!(log[(*seq - 1) as usize].op_id, *id, "acknowledged op at {seq} is durable");
    }
    let (seq, logged_hash) = recovered_from(&second_out).expect("the restarted kernel logged its recovery");
    let replayed = replay(&log[..seq as usize]);
    assert_eq!(logged_hash, replayed.hash().unwrap().to_string(), "recovered state = the durable log up to {seq}");
    let next = submit(&stack.client, &op, op_id(), spawn("after", Some(root))).await.unwrap();
    assert_eq!(next.seq, log.len() as u64 + 1, "continues the log");
    second.kill().unwrap();
    second.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_durable_operations_by_kind_as_json() {
    let Some(stack) = Stack::start("kernel-load").await else { return };
    let (_kernel, hashes) = start_kernel(&stack.nats, "k").await;
    let seed = stack.nats.config(Role::Operator).nkey_seed_file.unwrap();
    let output = tokio::process::Command::new(crate::binaries::binary("toka"))
        .args(["load", "kernel", "--nats-url", &stack.nats.url, "--creds"])
        .arg(&seed)
        .arg("--admin-key-file")
        .arg(stack.dir.path().join("admin.key"))
        .args(["--concurrency", "4", "--duration", "2", "--warmup", "0", "--json"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("config: 4 clients, 0 s warm-up + 2 s measured"), "{stderr}");
    assert!(stderr.contains("operations acknowledged"), "progress while it runs: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let requests = report["requests"].as_u64().unwrap();
    assert!(requests > 0 && report["errors"] == 0, "{report}");
    for p in ["p50", "p95", "p99", "p99.9", "max"] {
        assert!(report["latency_us"][p].as_u64().unwrap() > 0, "{p} in {report}");
    }
    let kinds = report["by_kind"].as_object().unwrap();
    assert_eq!(kinds.keys().collect::<Vec<_>>(), ["observe", "report", "schedule", "spawn"]);
    let counted: u64 = kinds.values().map(|k| k["requests"].as_u64().unwrap()).sum();
    assert_eq!(counted, requests, "every measured operation in one kind");
    // Each acknowledged operation is in the durable log: the root, then the measured ones
    // and those sent while the run was stopping.
    assert_eventually!(Duration::from_secs(5), hashes.borrow().0 > requests, "every measured operation durable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_names_its_children_under_its_own_name_and_they_share_its_budget() {
    use toka_contract::api::auth::DelegateRequest;
    let Some(stack) = Stack::start("kernel-names").await else { return };
    // Ten submits at once per root, then five a second.
    let (_kernel, _) = start_kernel_with(&stack.nats, "k", |k| {
        k.rate_limits.insert("submit".into(), toka_runtime::limit::Rate::new(5, 10));
    })
    .await;
    let owner = toka_client::Client::new(stack.client.clone(), stack.operator().await);
    let agent = spawned(&owner.submit(spawn("owner", None)).await.unwrap());
    let task = TaskSpec {
        agent,
        queue: "q".parse().unwrap(),
        payload: "worker-2's".into(),
        priority: 0,
        timeouts: Default::default(),
        retry: Default::default(),
    };
    owner.submit(Operation::ScheduleTask(task)).await.unwrap();
    let worker_caps = vec![Capability::new(Pattern::Queue("q".parse().unwrap()), TASK_ACTIONS)];
    let worker_2 = stack.nats.client(&stack.token("worker-2", worker_caps.clone()).await).await;
    let claimed = toka_client::worker::Worker::new(worker_2, "q".parse().unwrap(), "w2".into())
        .claim()
        .await
        .unwrap()
        .expect("worker-2 claimed the task");

    let worker_1_token = stack.token("worker-1", worker_caps.clone()).await;
    let worker_1 = stack.nats.client(&worker_1_token).await;
    let delegate = |sub: &str| {
        let request = DelegateRequest {
            token: worker_1_token.clone(),
            sub: Some(sub.parse().unwrap()),
            capabilities: worker_caps.clone(),
            ttl_ms: 600_000,
            one_time: false,
        };
        let bus = worker_1.bus();
        async move { bus.request::<_, TokenReply>(subject::AUTH_DELEGATE.subject, &request).await.map_err(|e| e.to_wire()) }
    };
    // Another's name, or a made-up one, is refused; a name under its own is given.
    for foreign in ["worker-2", "admin", "worker-10", "agent:01h00000000000000000000000"] {
        let refused = delegate(foreign).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden, "{foreign}: {refused:?}");
        assert!(refused.message.contains("worker-1/<suffix>"), "{refused:?}");
    }
    let child = delegate("worker-1/a").await.expect("a name under its own");
    // With neither its own token nor its child's does worker-1 complete worker-2's claim.
    for token in [&worker_1_token, &child.token] {
        let complete = Operation::CompleteTask { task: claimed.task, attempt: claimed.attempt, result: "x".into() };
        let refused = submit(&worker_1.bus(), token, op_id(), complete).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Forbidden, "{refused:?}");
    }

    // 50 children under distinct names spend one budget, worker-1's: at most the burst of ten
    // and what refills meanwhile get through.
    let mut children = Vec::new();
    for i in 0..50 {
        children.push(delegate(&format!("worker-1/c{i}")).await.unwrap().token);
    }
    let claims = children.iter().map(|token| {
        let op = Operation::ClaimTask { queue: "q".parse().unwrap(), worker: "w1".into() };
        submit(&stack.client, token, op_id(), op)
    });
    let outcomes = futures::future::join_all(claims).await;
    let limited = outcomes.iter().filter(|o| o.as_ref().is_err_and(|e| e.code == ErrorCode::RateLimited)).count();
    assert!(limited >= 35, "{limited} of 50 rate-limited: {outcomes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_the_keys_starves_no_verifier_and_no_other_client() {
    use toka_contract::api::auth::{JwksReply, JwksRequest};
    // Each root reads the keys 5 times a second; requests without a token share the endpoint's
    // unverified budget; the services' verifiers have a budget of their own.
    let Some(stack) = Stack::start_with("kernel-jwks-flood", |c| {
        c.rate_limits.insert("read".into(), toka_runtime::limit::Rate::new(5, 5));
    })
    .await
    else {
        return;
    };
    let flooder_token = stack.token("flooder", everything()).await;
    let flooder = stack.nats.client(&flooder_token).await.bus();
    // Reads of the keys from one client at about 1 000 a second (10 loops, 10 ms apart), every
    // other one without its token: at least 2 000 in 2 s, and on until `stop` (at most 10 s).
    // How many were sent and refused, and whether `stop` ended it.
    let flood = |stop: Arc<std::sync::atomic::AtomicBool>| {
        let (bus, token) = (flooder.clone(), flooder_token.clone());
        async move {
            let loops = (0..10).map(|_| {
                let (bus, token, stop) = (bus.clone(), token.clone(), stop.clone());
                async move {
                    let (mut sent, mut limited) = (0, 0);
                    for i in 0..1_000 {
                        if i >= 200 && stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let request = JwksRequest { token: (i % 2 == 0).then(|| token.clone()) };
                        let reply = bus.request::<_, JwksReply>(subject::AUTH_JWKS.subject, &request).await;
                        limited += usize::from(reply.is_err_and(|e| e.to_wire().code == ErrorCode::RateLimited));
                        sent += 1;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    (sent, limited)
                }
            });
            let (sent, limited) =
                futures::future::join_all(loops).await.into_iter().fold((0, 0), |(s, l), (s1, l1)| (s + s1, l + l1));
            (sent, limited, stop.load(Ordering::Relaxed))
        }
    };
    // Another client reads the keys with its token four times a second throughout.
    let bystander_token = stack.token("bystander", everything()).await;
    let bystander = stack.nats.client(&bystander_token).await.bus();
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reads = tokio::spawn({
        let reading = reading.clone();
        async move {
            let mut outcomes = Vec::new();
            while reading.load(Ordering::Relaxed) {
                let request = JwksRequest { token: Some(bystander_token.clone()) };
                outcomes.push(bystander.request::<_, JwksReply>(subject::AUTH_JWKS.subject, &request).await.is_ok());
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            outcomes
        }
    });
    // A kernel starting meanwhile reads the keys and revocations and is ready while the flood
    // goes on.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let starting = async {
        let kernel = start_kernel(&stack.nats, "k").await;
        stop.store(true, Ordering::Relaxed);
        kernel
    };
    let ((sent, limited, stopped), kernel) = tokio::join!(flood(stop.clone()), starting);
    assert!(stopped, "the kernel became ready only after 10 s of flood");
    assert!(sent >= 2_000 && limited * 4 >= sent * 3, "the flooder was limited {limited} times of {sent}");

    // A rotation under a second flood: a token signed with the new key verifies at the kernel
    // within 5 s while the flood goes on (the kernel refetches the keys when it hears of the
    // rotation).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let again = tokio::spawn(flood(stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.rotate().await;
    let fresh = stack.operator().await;
    let client = toka_client::Client::new(stack.client.clone(), fresh)
        .with_retry(toka_client::Retry { attempts: 1, ..toka_client::Retry::default() });
    assert_eventually!(Duration::from_secs(5), client.status().await.is_ok(), "a token of the new key verifies");
    stop.store(true, Ordering::Relaxed);
    let (sent, limited, stopped) = again.await.unwrap();
    assert!(stopped, "the new key verified only after 10 s of flood");
    assert!(sent >= 2_000 && limited * 4 >= sent * 3, "the second flood was limited {limited} times of {sent}");
    reading.store(false, Ordering::Relaxed);
    let outcomes = reads.await.unwrap();
    assert!(outcomes.len() >= 8 && outcomes.iter().all(|ok| *ok), "the bystander's reads: {outcomes:?}");
    drop(kernel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_are_read_page_by_page_and_a_restarted_kernel_loads_every_page() {
    use toka_contract::api::auth::{RevocationsReply, RevocationsRequest};
    let Some(stack) = Stack::start_with("kernel-revocation-pages", |c| c.revocations_page = 5).await else { return };
    let mut revoked = Vec::new();
    for i in 0..23 {
        let token = stack.token(&format!("revoked-{i}"), everything()).await;
        let jti: toka_contract::TokenId = toka_runtime::token::unverified_jti(&token).unwrap().parse().unwrap();
        stack.revoke(jti).await;
        revoked.push((jti, token));
    }
    // Page by page, in jti order, five at most each.
    let mut seen = Vec::new();
    let mut request = RevocationsRequest::default();
    loop {
        let page: RevocationsReply =
            stack.operators.request(subject::AUTH_REVOCATIONS.subject, &request).await.unwrap();
        assert!(page.revoked.len() <= 5, "a page of {}", page.revoked.len());
        assert_eq!(page.epoch, 23);
        seen.extend(page.revoked.iter().map(|r| r.jti));
        match page.next {
            Some(next) => request = RevocationsRequest { after: Some(next), limit: Some(50), token: None },
            None => break,
        }
    }
    let mut expected: Vec<_> = revoked.iter().map(|(jti, _)| *jti).collect();
    expected.sort();
    assert_eq!(seen, expected, "every revocation once, in order");

    // A kernel starting now loads every page: the token on the last page is refused.
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let last = revoked.iter().max_by_key(|(jti, _)| *jti).unwrap();
    let refused = toka_client::Client::new(stack.client.clone(), last.1.clone()).status().await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unauthorized, "{refused:?}");
    let control = toka_client::Client::new(stack.client.clone(), stack.operator().await);
    control.status().await.expect("a token not revoked works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_kept_until_its_token_expires_not_for_the_longest_lifetime() {
    use toka_contract::api::auth::{RevocationsReply, RevocationsRequest};
    let Some(stack) = Stack::start_with("kernel-revocation-expiry", |c| c.leeway_s = 1).await else { return };
    let short = stack.short_token("short", everything(), Duration::from_secs(2)).await;
    let (_, exp) = toka_runtime::token::unverified_lifetime(&short).unwrap();
    let jti: toka_contract::TokenId = toka_runtime::token::unverified_jti(&short).unwrap().parse().unwrap();
    stack.revoke(jti).await;
    let listed = || async {
        let reply: RevocationsReply =
            stack.operators.request(subject::AUTH_REVOCATIONS.subject, &RevocationsRequest::default()).await.unwrap();
        reply.revoked.into_iter().find(|r| r.jti == jti)
    };
    let entry = listed().await.expect("in force while the token lives");
    assert_eq!(entry.expires_at_us, (exp + 1) * 1_000_000, "until the token's expiry and the leeway");
    // Gone once the token can no longer verify, a day before the longest lifetime would end.
    assert_eventually!(Duration::from_secs(6), listed().await.is_none(), "dropped after the token's expiry");
}

/// Submits `ops` in batches of `batch`, four batches at a time; every one must be accepted.
async fn submit_all(bus: &Bus, token: &str, ops: Vec<Operation>, batch: usize) -> Vec<SubmitReply> {
    let mut running = tokio::task::JoinSet::new();
    let mut done: Vec<(usize, Vec<SubmitReply>)> = Vec::new();
    for (i, chunk) in ops.chunks(batch).enumerate() {
        let (bus, token) = (bus.clone(), token.to_owned());
        let ops = chunk.iter().map(|op| BatchItem { op_id: op_id(), op: op.clone() }).collect();
        running.spawn(async move {
            let request = SubmitBatchRequest { token, ops };
            let reply: SubmitBatchReply = bus.request(subject::KERNEL_SUBMIT_BATCH.subject, &request).await.unwrap();
            (i, reply.results.into_iter().map(|r| r.into_result().unwrap()).collect())
        });
        if running.len() >= 4 {
            done.push(running.join_next().await.unwrap().unwrap());
        }
    }
    done.extend(running.join_all().await);
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().flat_map(|(_, replies)| replies).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_restarted_on_a_backlog_of_passed_deadlines_fires_them_in_bounded_ticks_and_answers_meanwhile() {
    let Some(stack) = Stack::start("kernel-deadline-backlog").await else { return };
    let first_out = stack.dir.path().join("kernel-1.log");
    let mut first = start_kernel_process(&stack.nats, &first_out);
    assert_eventually!(Duration::from_secs(20), kernel_ready(&stack.client).await, "kernel process ready");
    let op = stack.operator().await;
    let owner = spawned(&submit(&stack.client, &op, op_id(), spawn("owner", None)).await.unwrap());
    // 12 000 tasks nobody claims, each timing out 3 s after it is scheduled.
    let schedules = (0..12_000)
        .map(|i| {
            Operation::ScheduleTask(TaskSpec {
                agent: owner,
                queue: "nobody".parse().unwrap(),
                payload: format!("task {i}"),
                priority: 0,
                timeouts: toka_contract::spec::Timeouts { schedule_to_start_us: Some(3_000_000), ..Default::default() },
                retry: Default::default(),
            })
        })
        .collect();
    let scheduled_at = std::time::Instant::now();
    assert_eq!(submit_all(&stack.client, &op, schedules, 1_000).await.len(), 12_000);
    first.kill().unwrap();
    first.wait().unwrap();
    // Down until every deadline has passed: the restarted kernel finds all 12 000 due.
    tokio::time::sleep(Duration::from_secs(6).saturating_sub(scheduled_at.elapsed())).await;
    let second_out = stack.dir.path().join("kernel-2.log");
    let mut second = start_kernel_process(&stack.nats, &second_out);
    assert_eventually!(Duration::from_secs(20), kernel_ready(&stack.client).await, "restarted kernel ready");
    let restarted = std::time::Instant::now();
    // Another principal is answered within a second each while the backlog fires.
    let other = stack.token("other", everything()).await;
    for i in 0..5 {
        let started = std::time::Instant::now();
        if let Err(e) = submit(&stack.client, &other, op_id(), spawn(&format!("meanwhile-{i}"), None)).await {
            let out = std::fs::read_to_string(&second_out).unwrap();
            eprintln!("the restarted kernel's log ends:\n{}", &out[out.len().saturating_sub(6000)..]);
            panic!("{e:?}");
        }
        assert!(started.elapsed() < Duration::from_secs(1), "spawn {i} took {:?}", started.elapsed());
    }
    let timed_out = |log: &[toka_contract::KernelRecord]| {
        log.iter().flat_map(|r| &r.events).filter(|e| matches!(e, Event::TaskTimedOut { .. })).count()
    };
    let mut log = stack.kernel_log().await;
    while timed_out(&log) < 12_000 {
        assert!(restarted.elapsed() < Duration::from_secs(10), "{} of 12000 timeouts logged", timed_out(&log));
        tokio::time::sleep(Duration::from_millis(250)).await;
        log = stack.kernel_log().await;
    }
    // In ticks that each fit the bound, and the log replays to the live state.
    let bound = toka_kernel::KernelConfig::default().max_record_bytes;
    let ticks: Vec<_> = log.iter().filter(|r| matches!(r.op, Operation::Tick { .. })).collect();
    assert!(ticks.len() >= 12_000 / toka_kernel::machine::max_fired_within(bound) as usize, "{} ticks", ticks.len());
    for tick in &ticks {
        assert!(serde_json::to_vec(tick).unwrap().len() <= bound, "tick {} over the bound", tick.seq);
    }
    let status = toka_client::Client::new(stack.client.clone(), op.clone()).status().await.unwrap();
    let log = stack.kernel_log().await;
    toka_contract::record::verify_chain(&log, 0, Hash::ZERO).unwrap();
    let replayed = replay(&log[..status.head_seq as usize]);
    assert_eq!(
        replayed.hash().unwrap(),
        status.state_hash,
        "replay of the log = the live state at {}",
        status.head_seq
    );
    second.kill().unwrap();
    second.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminate_of_twelve_thousand_descendants_is_refused_too_large_and_nobody_else_notices() {
    let Some(stack) = Stack::start("kernel-terminate-too-large").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let op = stack.operator().await;
    let root = spawned(&submit(&stack.client, &op, op_id(), spawn("root", None)).await.unwrap());
    let children = (0..12_000).map(|i| spawn(&format!("c{i}"), Some(root))).collect();
    assert_eq!(submit_all(&stack.client, &op, children, 200).await.len(), 12_000);
    let client = toka_client::Client::new(stack.client.clone(), op.clone());
    let before = client.status().await.unwrap();
    // Someone else works throughout.
    let other = stack.token("other", everything()).await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let meanwhile = tokio::spawn({
        let (bus, stop) = (stack.client.clone(), stop.clone());
        async move {
            let mut outcomes = Vec::new();
            for i in 0..2_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                outcomes.push(submit(&bus, &other, op_id(), spawn(&format!("o{i}"), None)).await.map(|_| ()));
            }
            outcomes
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let terminate = Operation::TerminateAgent { agent: root, reason: "everything".into() };
    let refused = submit(&stack.client, &op, op_id(), terminate).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::TooLarge, "{refused:?}");
    let bound = toka_kernel::KernelConfig::default().max_record_bytes as u64;
    assert_eq!(
        (refused.details["limit"].as_str(), refused.details["max"].as_u64()),
        (Some("kernel.max_record_bytes"), Some(bound))
    );
    assert!(refused.details["size"].as_u64().unwrap() > bound);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let outcomes = meanwhile.await.unwrap();
    assert!(outcomes.len() >= 10, "{} spawns meanwhile", outcomes.len());
    assert!(outcomes.iter().all(Result::is_ok), "{:?}", outcomes.iter().find(|o| o.is_err()));
    // Nothing of the terminate happened: the other principal's spawns are all the log gained.
    let log = stack.kernel_log().await;
    assert_eq!(log.len() as u64, before.head_seq + outcomes.len() as u64);
    assert!(log.iter().all(|r| !matches!(r.op, Operation::TerminateAgent { .. })));
    let view = client.agent(root).await.unwrap();
    assert_eq!(view.state, AgentState::Running);
}

/// The most requests the default `unverified` budget (20 a second, bursts of 50) lets through
/// in `elapsed`, with half a second's slack.
pub(crate) fn unverified_budget(elapsed: Duration) -> usize {
    50 + (20.0 * (elapsed.as_secs_f64() + 0.5)).ceil() as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_whose_token_fails_to_verify_share_a_small_budget_per_endpoint() {
    let Some(stack) = Stack::start("kernel-unverified-budget").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let good = stack.operator().await;
    // A token signed by a key auth never had.
    let forged = {
        let (claims, _) = good.split_once('.').and_then(|(_, rest)| rest.split_once('.')).unwrap();
        let claims = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(claims).unwrap();
        let claims: toka_contract::api::auth::Claims = serde_json::from_slice(&claims).unwrap();
        toka_auth::signing::SigningKey::generate("k-elsewhere").unwrap().sign(&claims).unwrap()
    };
    let bad_submits = (0..200).map(|i| {
        // Forged, or shaped as a token but not one.
        let token = if i % 2 == 0 { forged.clone() } else { "bm90.YS10b2tlbg.c2ln".to_owned() };
        let bus = stack.client.clone();
        async move { submit(&bus, &token, op_id(), spawn("x", None)).await.unwrap_err().code }
    });
    let good_submits = (0..50).map(|i| {
        let (bus, token) = (stack.client.clone(), good.clone());
        async move { submit(&bus, &token, op_id(), spawn(&format!("g{i}"), None)).await.map(|_| ()) }
    });
    let started = std::time::Instant::now();
    let (bad, good_outcomes) =
        tokio::join!(futures::future::join_all(bad_submits), futures::future::join_all(good_submits));
    let limited = bad.iter().filter(|c| **c == ErrorCode::RateLimited).count();
    let refused = bad.iter().filter(|c| **c == ErrorCode::Unauthorized).count();
    assert_eq!(limited + refused, 200, "{bad:?}");
    let budget = unverified_budget(started.elapsed());
    assert!((40..=budget).contains(&refused), "{refused} refused unauthorized (budget {budget}), {limited} limited");
    assert!(good_outcomes.iter().all(Result::is_ok), "a verified caller is not limited by them: {good_outcomes:?}");
    // Another endpoint has its own budget: a query with the forged token is still refused as
    // unauthorized, not limited.
    let query = AgentListRequest { token: forged.clone(), parent: None, state: None, after: None, limit: 10 };
    let refused = stack.client.request::<_, AgentListReply>(subject::KERNEL_AGENT_LIST.subject, &query).await;
    assert_eq!(refused.unwrap_err().to_wire().code, ErrorCode::Unauthorized);
    // Auth's endpoints alike: forged delegations are limited together, a verified one is not.
    let delegate = |token: &str| toka_contract::api::auth::DelegateRequest {
        token: token.to_owned(),
        sub: None,
        capabilities: vec![Capability::new(Pattern::AnyQueue, &[Action::Claim])],
        ttl_ms: 60_000,
        one_time: false,
    };
    let forged_delegations = (0..150).map(|_| {
        let (bus, request) = (stack.client.clone(), delegate(&forged));
        async move {
            bus.request::<_, TokenReply>(subject::AUTH_DELEGATE.subject, &request).await.unwrap_err().to_wire().code
        }
    });
    let started = std::time::Instant::now();
    let codes = futures::future::join_all(forged_delegations).await;
    let limited = codes.iter().filter(|c| **c == ErrorCode::RateLimited).count();
    assert!(codes.iter().all(|c| matches!(c, ErrorCode::RateLimited | ErrorCode::Unauthorized)), "{codes:?}");
    assert!(150 - limited <= unverified_budget(started.elapsed()), "{limited} of 150 limited");
    let delegated: Result<TokenReply, _> = stack.client.request(subject::AUTH_DELEGATE.subject, &delegate(&good)).await;
    assert!(delegated.is_ok(), "{delegated:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_delegate_and_revoke_cycles_leave_a_restarting_kernel_ready_and_every_page_readable() {
    use toka_contract::api::auth::{DelegateRequest, RevocationsReply, RevocationsRequest, RevokeReply, RevokeRequest};
    // Pages of 100; clients read 20 pages a second.
    let Some(stack) = Stack::start_with("kernel-revocation-scale", |c| {
        c.revocations_page = 100;
        c.rate_limits.insert("read".into(), toka_runtime::limit::Rate::new(20, 20));
        c.rate_limits.insert("revoke".into(), toka_runtime::limit::Rate::new(2_000, 2_000));
    })
    .await
    else {
        return;
    };
    let parent = stack.token("cycler", everything()).await;
    // Each cycle: delegate a child, which revokes itself; four at a time.
    let cycles = (0..4).map(|_| {
        let (bus, parent) = (stack.client.clone(), parent.clone());
        async move {
            let mut revoked = Vec::new();
            for _ in 0..750 {
                let delegate = DelegateRequest {
                    token: parent.clone(),
                    sub: None,
                    capabilities: vec![Capability::new(Pattern::AnyQueue, &[Action::Claim])],
                    ttl_ms: 600_000,
                    one_time: false,
                };
                let child: TokenReply = bus.request(subject::AUTH_DELEGATE.subject, &delegate).await.unwrap();
                let revoke = RevokeRequest {
                    credential: Credential::Token(child.token.clone()),
                    jti: child.jti,
                    reason: "cycle".into(),
                };
                let _: RevokeReply = bus.request(subject::AUTH_REVOKE.subject, &revoke).await.unwrap();
                revoked.push((child.jti, child.token));
            }
            revoked
        }
    });
    let revoked: Vec<_> = futures::future::join_all(cycles).await.into_iter().flatten().collect();
    assert_eq!(revoked.len(), 3_000);

    // A kernel starting now loads every page and is ready within 30 s.
    let started = std::time::Instant::now();
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    assert!(started.elapsed() < Duration::from_secs(30), "ready after {:?}", started.elapsed());
    let last = revoked.iter().max_by_key(|(jti, _)| *jti).unwrap();
    let refused = toka_client::Client::new(stack.client.clone(), last.1.clone()).status().await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unauthorized, "the last page's token: {refused:?}");

    // Every page answers ok to a client, in order, 100 at most each.
    let mut seen = Vec::new();
    let mut request = RevocationsRequest { token: Some(parent.clone()), ..RevocationsRequest::default() };
    loop {
        let page: RevocationsReply = loop {
            match stack.client.request(subject::AUTH_REVOCATIONS.subject, &request).await {
                Ok(page) => break page,
                Err(e) if e.to_wire().code == ErrorCode::RateLimited => {
                    tokio::time::sleep(Duration::from_millis(e.to_wire().retry_after_ms.unwrap_or(50))).await;
                }
                Err(e) => panic!("page after {:?}: {e}", request.after),
            }
        };
        assert!(page.revoked.len() <= 100);
        seen.extend(page.revoked.iter().map(|r| r.jti));
        match page.next {
            Some(next) => request.after = Some(next),
            None => break,
        }
    }
    let mut expected: Vec<_> = revoked.iter().map(|(jti, _)| *jti).collect();
    expected.sort();
    assert_eq!(seen, expected, "every revocation once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kernel_whose_start_outlasts_its_lease_ttl_keeps_the_lease_and_serves() {
    let Some(stack) = Stack::start("kernel-slow-start").await else { return };
    // Auth is down: a kernel that took the lease waits for the keys far longer than the
    // lease's 900 ms.
    let Stack { nats, dir, auth, client, .. } = stack;
    auth.stop().await.unwrap();
    let key_file = dir.path().join("admin.key");
    let auth_again = async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        start_auth(&nats, &dir.path().join("keys"), |c| c.admin_key_file = Some(key_file)).await
    };
    let ((_kernel, _), _auth) = tokio::join!(start_kernel(&nats, "slow"), auth_again);
    // Ready, and still the sequencer well after its first renewals.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let operators = nats.connect(Role::Operator).await;
    let admin_key = std::fs::read_to_string(dir.path().join("admin.key")).unwrap();
    let token = issue(&operators, &admin_key, "operator", everything(), Duration::from_secs(600)).await;
    let status = toka_client::Client::new(client.clone(), token.clone()).status().await.unwrap();
    assert_eq!((status.instance.as_str(), status.lease_holder.as_deref()), ("slow", Some("slow")));
    submit(&client, &token, op_id(), spawn("after-a-slow-start", None)).await.unwrap();
}
