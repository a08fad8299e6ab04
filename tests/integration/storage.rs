//! Storage over NATS: appends validated and made durable, idempotent retries, conflicts,
//! reads, queries, verification, snapshots, status, and committed events on JetStream, also
//! after a restart.

use std::path::Path;
use std::time::Duration;

use toka_contract::access::Role;
use toka_contract::api::storage::{
    AppendReply, AppendRequest, HeadReply, HeadRequest, QueryReply, QueryRequest, ReadReply, ReadRequest,
    SnapshotGetReply, SnapshotGetRequest, SnapshotPutReply, SnapshotPutRequest, StatusReply, StatusRequest,
    VerifyReply, VerifyRequest,
};
use toka_contract::record::{Hash, LogName};
use toka_contract::subject::{self, service};
use toka_contract::wire::ErrorCode;
use toka_contract::{Event, KernelRecord, Operation};
use toka_runtime::bus::{Bus, RequestError};

use crate::harness::{Nats, Running, expect_event, records_after, spawn_service, temp_dir};
use toka_contract::testing::Sample;

/// The kernel log's `published_seq`, as storage's status gives it to `bus`.
async fn published(bus: &Bus) -> u64 {
    let status: StatusReply = bus.request(subject::STORAGE_STATUS.subject, &StatusRequest {}).await.unwrap();
    status.logs[0].published_seq
}

/// Each message's `Nats-Msg-Id` in the events stream, in stream order, read as an operator
/// reads it (by direct gets).
async fn stream_ids(nats: &Nats) -> Vec<String> {
    stream_headers(nats).await.iter().map(|h| header(h, "Nats-Msg-Id").unwrap_or_default()).collect()
}

fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|v| v.to_string())
}

/// Each message's headers in the events stream, in stream order, read by direct gets as an
/// operator.
async fn stream_headers(nats: &Nats) -> Vec<async_nats::HeaderMap> {
    let js = async_nats::jetstream::new(nats.connect(Role::Operator).await.client().clone());
    let mut stream = js.get_stream(subject::EVENTS_STREAM).await.unwrap();
    let state = stream.info().await.unwrap().state.clone();
    let mut headers = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        headers.push(stream.direct_get(seq).await.unwrap().headers);
    }
    headers
}

pub(crate) async fn start_storage(nats: &Nats, dir: &Path) -> Running {
    let data_dir = dir.to_owned();
    spawn_service(service::STORAGE, nats, Role::Storage, move |nats, admin, bus, stop| {
        let storage =
            toka_storage::StorageConfig { backend: toka_storage::Backend::Sqlite, data_dir, ..Default::default() };
        toka_storage::run(toka_storage::Config { nats, admin, storage, ..Default::default() }, bus, stop)
    })
    .await
}

fn append_request(records: &[KernelRecord]) -> AppendRequest<Operation> {
    AppendRequest { expected_seq: records[0].seq, records: records.to_vec() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_are_durable_idempotent_and_published() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("storage");
    let storage = start_storage(&nats, dir.path()).await;
    let kernel = nats.connect(Role::Kernel).await;
    let observer = nats.connect(Role::Telemetry).await;
    let mut events = observer.client().subscribe(subject::ALL_EVENTS).await.unwrap();
    observer.client().flush().await.unwrap();

    let append = subject::append(LogName::Kernel).subject;
    let batch = records_after((0, Hash::ZERO), 3, Sample::Spawn);
    let reply: AppendReply = kernel.request(append, &append_request(&batch)).await.unwrap();
    assert_eq!((reply.first_seq, reply.last_seq, reply.last_hash, reply.duplicate), (1, 3, batch[2].hash, false));
    for r in &batch {
        let envelope = expect_event(&mut events, Duration::from_secs(5)).await;
        assert_eq!((envelope.id.clone(), &envelope.data), (format!("kernel:{}.0", r.seq), &r.events[0]));
    }

    // An identical retry is acknowledged again and publishes nothing new (checked at the end).
    let again: AppendReply = kernel.request(append, &append_request(&batch)).await.unwrap();
    assert!(again.duplicate);

    // A different record at a taken sequence, and a gap, are conflicts naming the next sequence.
    let other = records_after((0, Hash([1; 32])), 1, Sample::Spawn);
    let err = kernel.request::<_, AppendReply>(append, &append_request(&other)).await.unwrap_err();
    let RequestError::Remote(e) = err else { panic!("{err}") };
    assert_eq!((e.code, e.details["next_seq"].as_u64()), (ErrorCode::Conflict, Some(4)));

    // One bad record refuses the whole batch, naming it; nothing is written.
    let mut bad = records_after((3, batch[2].hash), 2, Sample::Spawn);
    bad[1].time_us += 1;
    let RequestError::Remote(e) = kernel.request::<_, AppendReply>(append, &append_request(&bad)).await.unwrap_err()
    else {
        panic!()
    };
    assert_eq!((e.code, e.details["entry"].as_u64()), (ErrorCode::BadRequest, Some(1)));
    let head: HeadReply =
        kernel.request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Kernel }).await.unwrap();
    assert_eq!((head.seq, head.hash), (3, batch[2].hash));

    // Reads, queries and verification see exactly what was acknowledged.
    let read: ReadReply<Operation> = kernel
        .request(
            subject::STORAGE_READ.subject,
            &ReadRequest { log: LogName::Kernel, from_seq: 2, max_records: 10, max_bytes: 900_000 },
        )
        .await
        .unwrap();
    assert_eq!((read.records.as_slice(), read.head_seq), (&batch[1..], 3));
    let entity = match &batch[1].events[0] {
        Event::AgentSpawned { agent, .. } => agent.to_string(),
        _ => unreachable!(),
    };
    let telemetry = nats.connect(Role::Telemetry).await;
    let query = QueryRequest {
        log: LogName::Kernel,
        entity: Some(entity),
        event_type: None,
        from_time_us: None,
        to_time_us: None,
        after: None,
        limit: 10,
    };
    let found: QueryReply = telemetry.request(subject::STORAGE_QUERY.subject, &query).await.unwrap();
    assert_eq!(found.hits.len(), 1);
    assert_eq!((found.hits[0].at.seq, &found.hits[0].event), (2, &batch[1].events[0]));
    let operators = nats.connect(Role::Operator).await;
    let verified: VerifyReply = operators
        .request(subject::STORAGE_VERIFY.subject, &VerifyRequest { log: LogName::Kernel, from_seq: None, to_seq: None })
        .await
        .unwrap();
    assert_eq!((verified.verified, verified.first_break), (3, None));

    // Snapshots come back chunk by chunk once complete.
    let put = |chunk: u32| SnapshotPutRequest {
        log: LogName::Kernel,
        seq: 3,
        state_hash: Hash([5; 32]),
        chunk,
        chunks: 2,
        data: "c25hcHNob3Q=".into(),
    };
    let first: SnapshotPutReply = kernel.request(subject::STORAGE_SNAPSHOT_PUT.subject, &put(0)).await.unwrap();
    assert!(!first.complete);
    let get = SnapshotGetRequest { log: LogName::Kernel, at_or_before: None, chunk: 1 };
    let RequestError::Remote(e) =
        kernel.request::<_, SnapshotGetReply>(subject::STORAGE_SNAPSHOT_GET.subject, &get).await.unwrap_err()
    else {
        panic!()
    };
    assert_eq!(e.code, ErrorCode::NotFound);
    let second: SnapshotPutReply = kernel.request(subject::STORAGE_SNAPSHOT_PUT.subject, &put(1)).await.unwrap();
    assert!(second.complete);
    let chunk: SnapshotGetReply = kernel.request(subject::STORAGE_SNAPSHOT_GET.subject, &get).await.unwrap();
    assert_eq!((chunk.seq, chunk.chunks, chunk.data.as_str()), (3, 2, "c25hcHNob3Q="));

    // The progress marker follows the acknowledgements of the stream, a moment after them.
    crate::assert_eventually!(Duration::from_secs(10), published(&telemetry).await == 3, "published through 3");
    let status: StatusReply = telemetry.request(subject::STORAGE_STATUS.subject, &StatusRequest {}).await.unwrap();
    assert_eq!(status.backend, "sqlite");
    let kernel_log = status.logs.iter().find(|l| l.log == LogName::Kernel).unwrap();
    assert_eq!((kernel_log.head_seq, kernel_log.published_seq, kernel_log.snapshot_seq), (3, 3, Some(3)));

    // Nothing was published since the first three events (the retry, the refused batches): the
    // next event on the subscription is the next record's.
    let next = records_after((3, batch[2].hash), 1, Sample::Spawn);
    let _: AppendReply = kernel.request(append, &append_request(&next)).await.unwrap();
    assert_eq!(expect_event(&mut events, Duration::from_secs(5)).await.id, "kernel:4.0");
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_committed_but_not_published_are_published_on_start() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("republish");
    let storage = start_storage(&nats, dir.path()).await;
    let kernel = nats.connect(Role::Kernel).await;
    let first = records_after((0, Hash::ZERO), 2, Sample::Spawn);
    let _: AppendReply =
        kernel.request(subject::append(LogName::Kernel).subject, &append_request(&first)).await.unwrap();
    let observer = nats.connect(Role::Telemetry).await;
    crate::assert_eventually!(
        Duration::from_secs(10),
        published(&observer).await == 2,
        "the first two records published"
    );
    storage.stop().await.unwrap();

    // Records committed while storage was down to publish them (as after a crash between the
    // commit and the publish): written straight into the WAL, not marked published.
    {
        use toka_storage::wal::Wal as _;
        let mut wal = toka_storage::wal::sqlite::SqliteWal::open(dir.path()).unwrap();
        let more = records_after((2, first[1].hash), 3, Sample::Spawn);
        let body = serde_json::to_value(append_request(&more)).unwrap();
        let stored = toka_storage::ingest::records(LogName::Kernel, &body).unwrap();
        wal.append(&[(LogName::Kernel, &stored)]).pop().unwrap().unwrap();
        assert_eq!(wal.published(LogName::Kernel).unwrap(), 2);
    }

    let storage = start_storage(&nats, dir.path()).await;
    let js = async_nats::jetstream::new(nats.connect(Role::Telemetry).await.client().clone());
    let mut stream = js.get_stream(subject::EVENTS_STREAM).await.unwrap();
    crate::assert_eventually!(
        Duration::from_secs(10),
        stream.info().await.unwrap().state.messages == 5,
        "five events in the stream"
    );
    // Republishing what was already published is deduplicated by Nats-Msg-Id.
    storage.stop().await.unwrap();
    {
        use toka_storage::wal::Wal as _;
        let mut wal = toka_storage::wal::sqlite::SqliteWal::open(dir.path()).unwrap();
        wal.set_published(LogName::Kernel, 0).unwrap();
    }
    let storage = start_storage(&nats, dir.path()).await;
    let status_bus = nats.connect(Role::Telemetry).await;
    crate::assert_eventually!(Duration::from_secs(10), published(&status_bus).await == 5, "republished through seq 5");
    assert_eq!(stream.info().await.unwrap().state.messages, 5, "duplicates dropped by the stream");
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_whose_publish_failed_are_published_from_the_wal_later() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("publish-gap");
    let storage = start_storage(&nats, dir.path()).await;
    let kernel = nats.connect(Role::Kernel).await;
    let status_bus = nats.connect(Role::Telemetry).await;
    let append = subject::append(LogName::Kernel).subject;
    let first = records_after((0, Hash::ZERO), 2, Sample::Spawn);
    let _: AppendReply = kernel.request(append, &append_request(&first)).await.unwrap();
    crate::assert_eventually!(Duration::from_secs(10), published(&status_bus).await == 2, "the first batch published");

    // The stream goes away: the next commit's events cannot be published from memory.
    let js = async_nats::jetstream::new(nats.connect(Role::StorageState).await.client().clone());
    js.delete_stream(subject::EVENTS_STREAM).await.unwrap();
    // Without a stream a publish still reaches plain subscribers: each attempt shows.
    let mut attempts = status_bus.client().subscribe(subject::ALL_EVENTS).await.unwrap();
    status_bus.client().flush().await.unwrap();
    let second = records_after((2, first[1].hash), 3, Sample::Spawn);
    let _: AppendReply = kernel.request(append, &append_request(&second)).await.unwrap();
    // The attempt from memory, then the retry from the WAL a second later: by then the first
    // failure has been handled.
    let mut tries = 0;
    while tries < 2 {
        let envelope = expect_event(&mut attempts, Duration::from_secs(10)).await;
        tries += usize::from(envelope.id == "kernel:3.0");
    }
    assert_eq!(published(&status_bus).await, 2, "nothing is marked published that was not");

    // Once the stream is back, the missed commit is read from the WAL and published, with the
    // one after it.
    toka_storage::publish::ensure_streams(&js).await.unwrap();
    let third = records_after((5, second[2].hash), 1, Sample::Spawn);
    let _: AppendReply = kernel.request(append, &append_request(&third)).await.unwrap();
    crate::assert_eventually!(Duration::from_secs(10), published(&status_bus).await == 6, "published through seq 6");
    let ids = stream_ids(&nats).await;
    assert_eq!(
        ids,
        ["kernel:3.0", "kernel:4.0", "kernel:5.0", "kernel:6.0"],
        "the events of seq 3 to 6, each once, in order"
    );
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_from_another_publisher_between_commits_loses_no_event() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("publish-chain");
    let storage = start_storage(&nats, dir.path()).await;
    let kernel = nats.connect(Role::Kernel).await;
    let status_bus = nats.connect(Role::Telemetry).await;
    let append = subject::append(LogName::Kernel).subject;
    let mut head = (0, Hash::ZERO);
    let mut commit = |n: u64| {
        let batch = records_after(head, n, Sample::Spawn);
        head = (head.0 + n, batch[batch.len() - 1].hash);
        let (kernel, status_bus, through) = (kernel.clone(), status_bus.clone(), head.0);
        async move {
            let _: AppendReply = kernel.request(append, &append_request(&batch)).await.unwrap();
            crate::assert_eventually!(Duration::from_secs(10), published(&status_bus).await == through, "published");
        }
    };
    // The first commit's events are acknowledged one by one (nothing to chain after yet);
    // the second's are chained after the first's last event.
    commit(3).await;
    commit(3).await;
    // Another message lands in the stream, so the next chain is refused: those events are
    // sent again, each acknowledged, and so are the next commits' for a while.
    let js = async_nats::jetstream::new(nats.connect(Role::StorageState).await.client().clone());
    let foreign = async_nats::jetstream::message::PublishMessage::build().payload("{}".into()).message_id("foreign:1");
    js.send_publish("toka.evt.kernel.agent.spawned.x", foreign).await.unwrap().await.unwrap();
    commit(3).await;
    for _ in 0..64 {
        commit(1).await;
    }
    // Then chaining resumes.
    commit(2).await;

    let ids = stream_ids(&nats).await;
    let mut expected: Vec<String> = (1..=6).map(|seq| format!("kernel:{seq}.0")).collect();
    expected.push("foreign:1".into());
    expected.extend((7..=75).map(|seq| format!("kernel:{seq}.0")));
    assert_eq!(ids, expected, "every event once, in commit order");
    let chained: Vec<(String, String)> = stream_headers(&nats)
        .await
        .iter()
        .zip(&ids)
        .filter_map(|(h, id)| header(h, "Nats-Expected-Last-Msg-Id").map(|previous| (id.clone(), previous)))
        .collect();
    let pairs = |seqs: &[u64]| -> Vec<(String, String)> {
        seqs.iter().map(|s| (format!("kernel:{s}.0"), format!("kernel:{}.0", s - 1))).collect()
    };
    assert_eq!(chained, [pairs(&[4, 5, 6]), pairs(&[74, 75])].concat(), "which events went as a chain");
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_appends_commit_in_the_order_they_were_sent() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("pipeline");
    let storage = start_storage(&nats, dir.path()).await;
    let kernel = nats.connect(Role::Kernel).await;
    let all = records_after((0, Hash::ZERO), 500, Sample::Spawn);
    // Fifty batches in flight at once, each continuing the one before.
    let requests: Vec<_> = all.chunks(10).map(append_request).collect();
    let replies = futures::future::join_all(
        requests.iter().map(|r| kernel.request::<_, AppendReply>(subject::append(LogName::Kernel).subject, r)),
    )
    .await;
    for (i, reply) in replies.into_iter().enumerate() {
        let reply = reply.unwrap_or_else(|e| panic!("batch {i}: {e}"));
        assert_eq!((reply.first_seq, reply.last_seq), (i as u64 * 10 + 1, i as u64 * 10 + 10));
    }
    let head: HeadReply =
        kernel.request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Kernel }).await.unwrap();
    assert_eq!((head.seq, head.hash), (500, all[499].hash));
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_removes_what_a_snapshot_covers_when_enabled() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("compact");
    let data_dir = dir.path().to_path_buf();
    let storage = spawn_service(service::STORAGE, &nats, Role::Storage, move |nats, admin, bus, stop| {
        let storage = toka_storage::StorageConfig {
            data_dir,
            compact_keep_records: Some(1),
            compact_interval_ms: 50,
            ..Default::default()
        };
        toka_storage::run(toka_storage::Config { nats, admin, storage, ..Default::default() }, bus, stop)
    })
    .await;
    let kernel = nats.connect(Role::Kernel).await;
    let records = records_after((0, Hash::ZERO), 6, Sample::Spawn);
    let _: AppendReply =
        kernel.request(subject::append(LogName::Kernel).subject, &append_request(&records)).await.unwrap();
    let put = SnapshotPutRequest {
        log: LogName::Kernel,
        seq: 4,
        state_hash: Hash([3; 32]),
        chunk: 0,
        chunks: 1,
        data: "AA==".into(),
    };
    let _: SnapshotPutReply = kernel.request(subject::STORAGE_SNAPSHOT_PUT.subject, &put).await.unwrap();
    let operator = nats.connect(Role::Operator).await;
    crate::assert_eventually!(
        Duration::from_secs(10),
        operator.request::<_, StatusReply>(subject::STORAGE_STATUS.subject, &StatusRequest {}).await.unwrap().logs[0]
            .first_seq
            == 4,
        "compacted through 3 (snapshot at 4, keeping 1 record before it)"
    );
    let read: ReadReply<Operation> = operator
        .request(
            subject::STORAGE_READ.subject,
            &ReadRequest { log: LogName::Kernel, from_seq: 1, max_records: 10, max_bytes: 900_000 },
        )
        .await
        .unwrap();
    assert_eq!(read.records, records[3..]);
    let verified: VerifyReply = operator
        .request(subject::STORAGE_VERIFY.subject, &VerifyRequest { log: LogName::Kernel, from_seq: None, to_seq: None })
        .await
        .unwrap();
    assert_eq!((verified.verified, verified.first_break), (3, None), "the kept records still chain");
    storage.stop().await.unwrap();
}

/// How many messages the stream `name` holds, as `js` sees it.
async fn stream_size(js: &async_nats::jetstream::Context, name: &str) -> u64 {
    js.get_stream(name).await.unwrap().info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_log_has_its_own_stream_and_a_stream_of_every_log_is_split_on_start() {
    use async_nats::jetstream::{message::PublishMessage, stream::Config};
    let Some(mut stack) = crate::kernel::Stack::start("streams").await else { return };
    let audit_events = |log: Vec<toka_contract::AuditRecord>| log.iter().map(|r| r.events.len() as u64).sum::<u64>();
    let js = async_nats::jetstream::new(stack.nats.connect(Role::Operator).await.client().clone());
    // The stack's tokens are audit events: in the audit stream, none in the kernel's.
    let issued = audit_events(stack.audit_log().await);
    assert!(issued > 0);
    crate::assert_eventually!(
        Duration::from_secs(10),
        stream_size(&js, subject::AUDIT_STREAM).await == issued,
        "the audit log's events in {}",
        subject::AUDIT_STREAM
    );
    assert_eq!(stream_size(&js, subject::EVENTS_STREAM).await, 0, "no audit event among the kernel's");

    // The streams as they were when one held every log's events, an audit event among them.
    stack.storage.take().unwrap().stop().await.unwrap();
    let state = async_nats::jetstream::new(stack.nats.connect(Role::StorageState).await.client().clone());
    state.delete_stream(subject::AUDIT_STREAM).await.unwrap();
    state.delete_stream(subject::EVENTS_STREAM).await.unwrap();
    let every_log =
        Config { name: subject::EVENTS_STREAM.into(), subjects: vec![subject::ALL_EVENTS.into()], ..Config::default() };
    state.create_stream(every_log).await.unwrap();
    for (subject, id) in
        [("toka.evt.audit.auth.token.issued.x", "audit:old"), ("toka.evt.kernel.agent.spawned.x", "kernel:old")]
    {
        let message = PublishMessage::build().payload("{}".into()).message_id(id);
        state.send_publish(subject, message).await.unwrap().await.unwrap();
    }

    // Storage splits it: the kernel's stream keeps its own events only and is read by direct
    // gets; the audit stream, new, gets the audit log again from the WAL.
    stack.storage = Some(start_storage(&stack.nats, &stack.dir.path().join("storage")).await);
    let mut kernel_stream = js.get_stream(subject::EVENTS_STREAM).await.unwrap();
    let info = kernel_stream.info().await.unwrap().clone();
    assert_eq!(info.config.subjects, [subject::events_of(LogName::Kernel)]);
    assert!(info.config.allow_direct, "read by direct gets");
    assert_eq!(info.state.messages, 1, "the audit event purged, the kernel event kept");
    let kept = kernel_stream.direct_get(info.state.last_sequence).await.unwrap();
    assert_eq!(header(&kept.headers, "Nats-Msg-Id").as_deref(), Some("kernel:old"));
    let issued = audit_events(stack.audit_log().await);
    crate::assert_eventually!(
        Duration::from_secs(10),
        stream_size(&js, subject::AUDIT_STREAM).await == issued,
        "the audit log republished"
    );
    let audit = js.get_stream(subject::AUDIT_STREAM).await.unwrap();
    let first = audit.direct_get(1).await.unwrap();
    assert_eq!(header(&first.headers, "Nats-Msg-Id").as_deref(), Some("audit:1.0"));
    assert_eq!(audit.cached_info().config.subjects, [subject::events_of(LogName::Audit)]);
}
