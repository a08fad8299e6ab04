//! The client library against a running stack: submit with retries under one operation id,
//! queries, the worker loop, committed events followed from the stream.

use std::time::Duration;

use toka_client::events::{self, Start};
use toka_client::{AgentFilter, Client, Retry, TaskFilter};
use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::record::LogName;
use toka_contract::spec::{AgentSpec, TaskSpec};
use toka_contract::wire::ErrorCode;
use toka_contract::{Event, Operation, subject};
use toka_runtime::limit::Rate;

use crate::kernel::{Stack, start_kernel, start_kernel_with};

fn spawn(name: &str) -> Operation {
    Operation::SpawnAgent(AgentSpec { name: name.parse().unwrap(), parent: None, limits: Default::default() })
}

fn spawned(events: &[Event]) -> toka_contract::AgentId {
    match events {
        [Event::AgentSpawned { agent, .. }] => *agent,
        other => panic!("{other:?}"),
    }
}

/// The next event, within 10 s.
async fn next(events: &mut events::Events) -> events::Event {
    let next = tokio::time::timeout(Duration::from_secs(10), events.next()).await;
    next.expect("an event in time").expect("the stream open").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_submits_queries_and_follows_what_it_did_from_the_stream() {
    let Some(stack) = Stack::start("client").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let client = Client::new(stack.client.clone(), stack.operator().await);

    let reply = client.submit(spawn("planner")).await.unwrap();
    let agent = spawned(&reply.events);
    assert!(reply.agent_token.is_some(), "a spawn hands the new agent a token");
    let task = TaskSpec {
        agent,
        queue: "plans".parse().unwrap(),
        payload: "draft".into(),
        priority: 3,
        timeouts: Default::default(),
        retry: Default::default(),
    };
    let scheduled = client.submit(Operation::ScheduleTask(task)).await.unwrap();
    let Event::TaskScheduled { task, .. } = scheduled.events[0] else { panic!("{:?}", scheduled.events) };

    assert_eq!(client.agent(agent).await.unwrap().state, AgentState::Running);
    let running = AgentFilter { state: Some(AgentState::Running), ..AgentFilter::default() };
    let page = client.agents(&running, None, 10).await.unwrap();
    assert_eq!(page.agents.iter().map(|a| a.agent).collect::<Vec<_>>(), [agent]);
    assert_eq!(client.task(task).await.unwrap().state, TaskState::Scheduled);
    let tasks = client.tasks(&TaskFilter { agent: Some(agent), ..TaskFilter::default() }, None, 10).await.unwrap();
    assert_eq!(tasks.tasks.len(), 1);
    let missing = client.agent(toka_contract::AgentId::mint(1, 1, 0)).await.unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound, "a final error is not retried");

    // What happened to the agent, from the start of the stream, then what happens next.
    let about = subject::events_about(LogName::Kernel, &agent.to_string());
    let mut events = events::follow(&client.bus(), &about, Start::Oldest).await.unwrap();
    let first = next(&mut events).await;
    assert_eq!(
        (first.envelope.tokaseq.as_str(), first.envelope.data.type_name()),
        (format!("{}.0", reply.seq).as_str(), "agent.spawned")
    );
    client.submit(Operation::SuspendAgent { agent, reason: "lunch".into() }).await.unwrap();
    let second = next(&mut events).await;
    assert_eq!(second.envelope.data.type_name(), "agent.suspended");
    assert!(second.stream_seq > first.stream_seq);
    // A task's events are about the task; a category takes them all.
    let mut tasks =
        events::follow(&client.bus(), &subject::events_in(LogName::Kernel, "task"), Start::Oldest).await.unwrap();
    let scheduled = next(&mut tasks).await;
    assert_eq!(
        scheduled.envelope.data,
        Event::TaskScheduled { task, agent, queue: "plans".parse().unwrap(), priority: 3 }
    );
    // Resuming from a stream sequence gives it and what follows; `New` only what comes next.
    let mut again = events::follow(&client.bus(), &about, Start::StreamSeq(second.stream_seq)).await.unwrap();
    assert_eq!(next(&mut again).await.stream_seq, second.stream_seq);
    let mut fresh = events::follow(&client.bus(), &about, Start::New).await.unwrap();
    client.submit(Operation::ResumeAgent { agent }).await.unwrap();
    assert_eq!(next(&mut fresh).await.envelope.data, Event::AgentResumed { agent });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_the_kernel_cannot_take_now_are_retried_under_their_id_and_applied_once() {
    let Some(stack) = Stack::start("client-retry").await else { return };
    // Two operations a second, in bursts of two: most of a quick burst is refused for now.
    let (_kernel, _) = start_kernel_with(&stack.nats, "k", |k| {
        k.rate_limits.insert("submit".into(), Rate::new(2, 2));
    })
    .await;
    let operator = stack.operator().await;
    let impatient =
        Client::new(stack.client.clone(), operator.clone()).with_retry(Retry { attempts: 1, ..Retry::default() });
    let refused = futures::future::join_all((0..4).map(|i| impatient.submit(spawn(&format!("a{i}"))))).await;
    assert!(
        refused.iter().any(|r| r.as_ref().is_err_and(|e| e.code == ErrorCode::RateLimited)),
        "without retries a burst is refused: {refused:?}"
    );

    let patient = Client::new(stack.client.clone(), operator);
    let op_ids: Vec<_> = (0..6).map(|_| toka_client::fresh_op_id().unwrap()).collect();
    let submits = op_ids.iter().enumerate().map(|(i, id)| patient.submit_with_id(*id, spawn(&format!("b{i}"))));
    let replies = futures::future::join_all(submits).await;
    assert!(replies.iter().all(Result::is_ok), "{replies:?}");
    // Each operation is in the log once, however often it was sent.
    let log = stack.kernel_log().await;
    for id in &op_ids {
        assert_eq!(log.iter().filter(|r| r.op_id == *id).count(), 1, "{id} applied once");
    }
    // Sent again later, the same id gets the first result.
    let again = patient.submit_with_id(op_ids[0], spawn("b0")).await.unwrap();
    assert_eq!(again.seq, replies[0].as_ref().unwrap().seq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewing_worker_works_on_across_its_tokens_expiry_and_a_fixed_one_stops() {
    use toka_client::worker::{Claimed, Failure, Worker};
    const LIFE: Duration = Duration::from_secs(4);
    let Some(stack) = Stack::start("client-renew").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let caps = crate::kernel::everything();
    // The worker's token lives 4 s; a fresh one is written to its file every 1.5 s, as a
    // platform's mounted secret would be.
    let dir = crate::harness::temp_dir("client-renew-token");
    let file = dir.path().join("token");
    let write = |token: String| {
        let (file, staged) = (file.clone(), dir.path().join("token.new"));
        std::fs::write(&staged, token).unwrap();
        std::fs::rename(staged, file).unwrap();
    };
    write(stack.short_token("worker", caps.clone(), LIFE).await);
    let renewing = Client::connect_renewing(&stack.nats.client_config(), "renewing", toka_client::token_file(&file))
        .await
        .unwrap();
    let first_jti = toka_runtime::token::unverified_jti(&renewing.token()).unwrap();
    let first_bus = renewing.bus();

    // Beside it, a client whose token lives 3 s and is not renewed.
    let fixed = stack.nats.client(&stack.short_token("fixed", caps.clone(), Duration::from_secs(3)).await).await;
    let fixed = fixed.with_retry(Retry { attempts: 1, ..Retry::default() });
    fixed.status().await.expect("the fixed client works while its token lives");

    // 10 s of work: a task scheduled every 400 ms, the worker completing them, the file kept
    // fresh.
    let owner = Client::new(stack.client.clone(), stack.operator().await);
    let agent = spawned(&owner.submit(spawn("renewed")).await.unwrap().events);
    let worker = Worker::new(renewing.clone(), "renew".parse().unwrap(), "renewing-worker".into());
    let handler = |task: Claimed| async move { Ok::<_, Failure>(format!("done {}", task.payload)) };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let stop = tokio::time::sleep_until(deadline + Duration::from_secs(1));
    let work = worker.run(Duration::from_millis(500), handler, stop);
    let feed = async {
        let mut scheduled = Vec::new();
        let mut refreshed = tokio::time::Instant::now();
        while tokio::time::Instant::now() < deadline {
            let task = TaskSpec {
                agent,
                queue: "renew".parse().unwrap(),
                payload: scheduled.len().to_string(),
                priority: 0,
                timeouts: Default::default(),
                retry: Default::default(),
            };
            let reply = owner.submit(Operation::ScheduleTask(task)).await.unwrap();
            let Event::TaskScheduled { task, .. } = reply.events[0] else { panic!() };
            scheduled.push(task);
            if refreshed.elapsed() >= Duration::from_millis(1_500) {
                write(stack.short_token("worker", caps.clone(), LIFE).await);
                refreshed = tokio::time::Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        scheduled
    };
    let (finished, scheduled) = tokio::join!(work, feed);
    assert!(scheduled.len() >= 20, "{} tasks scheduled", scheduled.len());
    assert_eq!(finished, scheduled.len() as u64, "the worker finished every task");
    for task in &scheduled {
        assert_eq!(owner.task(*task).await.unwrap().state, TaskState::Completed, "{task}");
    }
    // It did so on fresh tokens, each on a connection of its own; the server closed the first
    // when its token expired.
    renewing.status().await.expect("the renewed client works on");
    let jti = toka_runtime::token::unverified_jti(&renewing.token()).unwrap();
    assert_ne!(jti, first_jti, "the worker connected again with a fresh token");
    assert_ne!(first_bus.client().connection_state(), async_nats::connection::State::Connected, "closed at expiry");
    // The client that was not renewed stopped when its token expired.
    let refused = fixed.status().await;
    assert!(refused.is_err(), "a connection past its token's expiry still works: {refused:?}");
}
