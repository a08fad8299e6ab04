//! `toka-storage`: the write-ahead log: named, hash-chained logs on SQLite (default) or
//! FoundationDB, served over NATS, with committed events published to JetStream.
//!
//! - [`wal`]: the WAL trait and its backends (`memory`, `sqlite`), with the conformance suite.
//! - [`ingest`]: checking an append request (schemas, hashes, links) before anything is written.
//! - [`writer`]: the WAL's own thread, with group commit and a bounded queue.
//! - [`publish`]: committed events to JetStream, resumed from the WAL's progress marker.
//! - [`run`]: the service: `toka.storage.v1.{append.kernel, append.audit, read, query, head,
//!   verify, snapshot.put, snapshot.get, status, health}`, admin probes, graceful shutdown.
//!
//! This crate depends on `toka-contract` and `toka-runtime` only, never on another service.

pub mod ingest;
pub mod publish;
pub mod wal;
pub mod writer;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use toka_contract::access::Role;
use toka_contract::api::MAX_PAGE;
use toka_contract::api::storage::{
    AppendReply, EventAddress, HeadReply, HeadRequest, LogStatus, QueryHit, QueryReply, QueryRequest, ReadRequest,
    SnapshotGetReply, SnapshotGetRequest, SnapshotPutReply, SnapshotPutRequest, StatusReply, StatusRequest,
    VerifyReply, VerifyRequest,
};
use toka_contract::record::{ChainBreak, LogName, Record};
use toka_contract::schema::{Contract, ReplyContract};
use toka_contract::subject;
use toka_contract::wire::{ErrorCode, WireError};
use toka_runtime::bus::Bus;
use toka_runtime::host::{self, Host};

use crate::writer::{Busy, WalHandle};

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_contract::subject::service::STORAGE;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str =
    "Toka storage: the write-ahead log: named, hash-chained logs on SQLite (default) or FoundationDB";

/// Which WAL backend to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// SQLite in `data_dir`: durable, one process per directory.
    Sqlite,
    /// In memory: nothing survives a restart; for tests and demos.
    Memory,
    /// FoundationDB: the distributed engine (needs a build with `--features fdb`).
    Fdb,
}

/// The WAL's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// The backend.
    pub backend: Backend,
    /// Where the SQLite backend keeps its files.
    pub data_dir: PathBuf,
    /// The FoundationDB cluster file (the client's default when absent).
    pub fdb_cluster_file: Option<String>,
    /// The tuple prefix of Toka's keys in FoundationDB.
    pub fdb_prefix: String,
    /// Compaction (off when absent): records this far before a log's newest complete snapshot
    /// are kept, older ones removed. Replay then starts from the snapshot.
    pub compact_keep_records: Option<u64>,
    /// How often compaction looks for work, in milliseconds.
    pub compact_interval_ms: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: Backend::Sqlite,
            data_dir: PathBuf::from("data/storage"),
            fdb_cluster_file: None,
            fdb_prefix: "toka".to_owned(),
            compact_keep_records: None,
            compact_interval_ms: 60_000,
        }
    }
}

toka_runtime::service_config! {
    /// The service's configuration.
    pub struct Config {
        /// The write-ahead log.
        storage: StorageConfig,
    }
}

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The services-API host could not start.
    #[error(transparent)]
    Host(#[from] host::Error),
    /// The WAL could not be opened.
    #[error("storage.data_dir: {0}")]
    Wal(#[from] wal::Error),
    /// The backend asked for is not in this build.
    #[error("storage.backend = {0}: this build has no such backend (FoundationDB needs `--features fdb`)")]
    NotBuilt(&'static str),
    /// The WAL thread could not start.
    #[error("cannot start the WAL thread: {0}")]
    Thread(String),
    /// The state user could not connect.
    #[error(transparent)]
    Bus(#[from] toka_runtime::bus::Error),
    /// The events stream could not be set up.
    #[error(transparent)]
    Publish(#[from] publish::Error),
}

/// An append request kept as received: the records' hashes cover their JSON as sent.
macro_rules! raw_append {
    ($name:ident, $schema:literal) => {
        #[derive(Debug, Serialize, Deserialize)]
        #[serde(transparent)]
        struct $name(Value);
        impl Contract for $name {
            const SCHEMA: &'static str = $schema;

            fn from_document(doc: Value) -> Result<Self, serde_json::Error> {
                Ok($name(doc))
            }
        }
    };
}
raw_append!(KernelAppend, "api/storage.append.kernel.request.v1.json");
raw_append!(AuditAppend, "api/storage.append.audit.request.v1.json");

/// A read reply built from the stored JSON of the records.
#[derive(Debug, Serialize, Deserialize)]
#[serde(transparent)]
struct RawReadReply(Value);
impl ReplyContract for RawReadReply {
    const REPLY_SCHEMA: &'static str = "api/storage.read.reply.v1.json";
}

fn busy(e: Busy) -> WireError {
    match e {
        Busy::Full => WireError::new(ErrorCode::Unavailable, "storage is at its queue limit").with_retry_after_ms(50),
        Busy::Closed => WireError::new(ErrorCode::Unavailable, "storage is shutting down").with_retry_after_ms(1_000),
    }
}

fn wal_error(e: wal::Error) -> WireError {
    match &e {
        wal::Error::Conflict { next_seq, .. } => {
            WireError::new(ErrorCode::Conflict, e.to_string()).with_detail("next_seq", *next_seq)
        }
        wal::Error::NotFound(_) => WireError::new(ErrorCode::NotFound, e.to_string()),
        wal::Error::Invalid(_) => WireError::new(ErrorCode::BadRequest, e.to_string()),
        // A full or read-only disk may recover; the caller retries, nothing was acknowledged.
        wal::Error::Io(_) => WireError::new(ErrorCode::Unavailable, e.to_string()).with_retry_after_ms(1_000),
        wal::Error::Corrupt(_) => WireError::new(ErrorCode::Internal, e.to_string()),
    }
}

/// Runs `f` on the WAL thread and flattens both failure kinds into a wire error.
async fn on_wal<T: Send + 'static>(
    wal: &WalHandle,
    f: impl FnOnce(&mut dyn wal::Wal) -> Result<T, wal::Error> + Send + 'static,
) -> Result<T, WireError> {
    wal.call(f).await.map_err(busy)?.map_err(wal_error)
}

/// Checks and queues an append at once, in arrival order (a pipelining client's batches reach
/// the WAL in the order it sent them), and returns the wait for its commit.
fn append(wal: &WalHandle, log: LogName, body: Value) -> impl Future<Output = Result<AppendReply, WireError>> + use<> {
    let queued = ingest::checked_with_outbox(log, &body)
        .and_then(|(records, outbox)| wal.append(log, records, outbox).map_err(busy));
    async move {
        let appended = queued?.await.map_err(busy)?.map_err(wal_error)?;
        Ok(AppendReply {
            first_seq: appended.first_seq,
            last_seq: appended.last_seq,
            last_hash: appended.last_hash,
            duplicate: appended.duplicate,
        })
    }
}

fn parse(body: &[u8], seq: u64) -> Result<Value, WireError> {
    serde_json::from_slice(body)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("stored record {seq} does not parse: {e}")))
}

async fn read(wal: &WalHandle, req: ReadRequest) -> Result<RawReadReply, WireError> {
    let log = req.log;
    let max_records = req.max_records.min(MAX_PAGE) as usize;
    let max_bytes = req.max_bytes as usize;
    let (records, head) =
        on_wal(wal, move |w| Ok((w.read(log, req.from_seq, max_records, max_bytes)?, w.head(log)?))).await?;
    let records = records.iter().map(|r| parse(&r.body, r.seq)).collect::<Result<Vec<_>, _>>()?;
    Ok(RawReadReply(json!({"log": log, "records": records, "head_seq": head.seq})))
}

async fn query(wal: &WalHandle, req: QueryRequest) -> Result<QueryReply, WireError> {
    let log = req.log;
    let limit = req.limit.min(MAX_PAGE) as usize;
    let q = wal::Query {
        entity: req.entity,
        event_type: req.event_type,
        from_time_us: req.from_time_us,
        to_time_us: req.to_time_us,
        after: req.after.map(|a| (a.seq, a.idx)),
        limit,
    };
    let found = on_wal(wal, move |w| {
        let hits = w.query(log, &q)?;
        let mut out = Vec::with_capacity(hits.len());
        for hit in hits {
            let record = w
                .read(log, hit.seq, 1, usize::MAX)?
                .pop()
                .ok_or_else(|| wal::Error::Corrupt(format!("indexed record {} is missing", hit.seq)))?;
            out.push((hit, record.body));
        }
        Ok(out)
    })
    .await?;
    let mut hits = Vec::with_capacity(found.len());
    for (hit, body) in found {
        let record: Record<Value> = serde_json::from_value(parse(&body, hit.seq)?)
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?;
        let event = record.events.into_iter().nth(hit.idx as usize).ok_or_else(|| {
            WireError::new(ErrorCode::Internal, format!("record {} lacks event {}", hit.seq, hit.idx))
        })?;
        hits.push(QueryHit { at: EventAddress { seq: hit.seq, idx: hit.idx }, time_us: hit.time_us, event });
    }
    let next_after = (hits.len() == limit).then(|| hits.last().map(|h| h.at)).flatten();
    Ok(QueryReply { hits, next_after })
}

async fn verify(wal: &WalHandle, req: VerifyRequest) -> Result<VerifyReply, WireError> {
    let log = req.log;
    let head = on_wal(wal, move |w| w.head(log)).await?;
    let from = req.from_seq.unwrap_or(head.first_seq).max(head.first_seq);
    let to = req.to_seq.unwrap_or(head.seq).min(head.seq);
    // The anchor: the record before `from`, or the first kept record's own link.
    let anchor = on_wal(wal, move |w| Ok(w.read(log, from.saturating_sub(1).max(1), 1, usize::MAX)?.pop())).await?;
    let mut prev = match anchor {
        Some(r) if r.seq + 1 == from => (r.seq, r.hash),
        Some(r) if r.seq == from => (from - 1, r.prev_hash),
        _ => (from.saturating_sub(1), toka_contract::Hash::ZERO),
    };
    let mut verified = 0;
    let mut next = from;
    while next <= to && to > 0 {
        let page = on_wal(wal, move |w| w.read(log, next, 1000, 8 << 20)).await?;
        let page: Vec<&wal::StoredRecord> = page.iter().take_while(|r| r.seq <= to).collect::<Vec<_>>();
        if page.is_empty() {
            break;
        }
        let mut records = Vec::with_capacity(page.len());
        for stored in &page {
            match serde_json::from_slice::<Record<Value>>(&stored.body) {
                Ok(r) => records.push(r),
                Err(e) => {
                    let first_break = Some(ChainBreak { seq: stored.seq, reason: format!("does not parse: {e}") });
                    return Ok(VerifyReply { log, verified, head_seq: head.seq, first_break });
                }
            }
        }
        match toka_contract::record::verify_chain(&records, prev.0, prev.1) {
            Ok(last) => {
                verified += records.len() as u64;
                prev = last;
                next = last.0 + 1;
            }
            Err(first_break) => {
                verified += first_break.seq - next;
                return Ok(VerifyReply { log, verified, head_seq: head.seq, first_break: Some(first_break) });
            }
        }
    }
    Ok(VerifyReply { log, verified, head_seq: head.seq, first_break: None })
}

async fn snapshot_put(wal: &WalHandle, req: SnapshotPutRequest) -> Result<SnapshotPutReply, WireError> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(&req.data)
        .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("data is not base64: {e}")))?;
    let (log, seq) = (req.log, req.seq);
    let chunk = wal::SnapshotChunk { seq, state_hash: req.state_hash, chunk: req.chunk, chunks: req.chunks, data };
    let complete = on_wal(wal, move |w| w.put_snapshot_chunk(log, chunk)).await?;
    Ok(SnapshotPutReply { seq, complete })
}

async fn snapshot_get(wal: &WalHandle, req: SnapshotGetRequest) -> Result<SnapshotGetReply, WireError> {
    let log = req.log;
    let found = on_wal(wal, move |w| w.snapshot_chunk(log, req.at_or_before, req.chunk)).await?;
    let c = found.ok_or_else(|| {
        WireError::new(ErrorCode::NotFound, format!("no complete snapshot of {log} has chunk {}", req.chunk))
    })?;
    Ok(SnapshotGetReply {
        seq: c.seq,
        state_hash: c.state_hash,
        chunk: c.chunk,
        chunks: c.chunks,
        data: base64::engine::general_purpose::STANDARD.encode(c.data),
    })
}

async fn status(wal: &WalHandle) -> Result<StatusReply, WireError> {
    let backend = wal.backend().to_owned();
    let logs = on_wal(wal, |w| {
        LogName::ALL
            .into_iter()
            .map(|log| {
                let head = w.head(log)?;
                let snapshot_seq = w.snapshot_chunk(log, None, 0)?.map(|c| c.seq);
                Ok(LogStatus {
                    log,
                    head_seq: head.seq,
                    first_seq: head.first_seq,
                    published_seq: w.published(log)?,
                    snapshot_seq,
                })
            })
            .collect::<Result<Vec<_>, wal::Error>>()
    })
    .await?;
    Ok(StatusReply { backend, logs })
}

/// Removes records older than `keep` before each log's newest complete snapshot, every
/// `interval`, until `stop`.
async fn compact(wal: WalHandle, keep: u64, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        for log in LogName::ALL {
            let result = on_wal(&wal, move |w| {
                let Some(snapshot) = w.snapshot_chunk(log, None, 0)? else { return Ok(0) };
                let head = w.head(log)?;
                let through = snapshot.seq.saturating_sub(keep).min(head.seq.saturating_sub(1));
                if through < head.first_seq {
                    return Ok(0);
                }
                w.compact(log, through)
            })
            .await;
            match result {
                Ok(0) => {}
                Ok(n) => tracing::info!(%log, records = n, "compacted"),
                Err(e) => tracing::warn!(%log, error = %e, "compaction failed; will retry"),
            }
        }
    }
}

/// Registers every storage endpoint on `host`.
async fn serve_endpoints(host: &mut Host, wal: &WalHandle) -> Result<(), host::Error> {
    // An append is checked and queued as it arrives, before the handler's first await, so a
    // pipelining client's batches reach the WAL in the order it sent them.
    host.serve(subject::STORAGE_APPEND_KERNEL, wal, |w, req: KernelAppend| append(&w, LogName::Kernel, req.0)).await?;
    host.serve(subject::STORAGE_APPEND_AUDIT, wal, |w, req: AuditAppend| append(&w, LogName::Audit, req.0)).await?;
    host.serve(subject::STORAGE_READ, wal, |w, req| async move { read(&w, req).await }).await?;
    host.serve(subject::STORAGE_QUERY, wal, |w, req| async move { query(&w, req).await }).await?;
    host.serve(subject::STORAGE_HEAD, wal, |w, req: HeadRequest| async move {
        let head = on_wal(&w, move |wal| wal.head(req.log)).await?;
        Ok(HeadReply { log: req.log, seq: head.seq, hash: head.hash })
    })
    .await?;
    host.serve(subject::STORAGE_VERIFY, wal, |w, req| async move { verify(&w, req).await }).await?;
    host.serve(subject::STORAGE_SNAPSHOT_PUT, wal, |w, req| async move { snapshot_put(&w, req).await }).await?;
    host.serve(subject::STORAGE_SNAPSHOT_GET, wal, |w, req| async move { snapshot_get(&w, req).await }).await?;
    host.serve(subject::STORAGE_STATUS, wal, |w, _: StatusRequest| async move { status(&w).await }).await?;
    Ok(())
}

/// Runs the service on `bus` until `shutdown` resolves.
pub async fn run(config: Config, bus: Bus, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let backend: Box<dyn wal::Wal> = match config.storage.backend {
        Backend::Sqlite => Box::new(wal::sqlite::SqliteWal::open(&config.storage.data_dir)?),
        Backend::Memory => Box::new(wal::memory::MemoryWal::new()),
        #[cfg(feature = "fdb")]
        Backend::Fdb => {
            Box::new(wal::fdb::FdbWal::open(config.storage.fdb_cluster_file.as_deref(), &config.storage.fdb_prefix)?)
        }
        #[cfg(not(feature = "fdb"))]
        Backend::Fdb => return Err(Error::NotBuilt("fdb")),
    };
    tracing::info!(backend = backend.backend(), data_dir = %config.storage.data_dir.display(), "WAL open");
    let (wal, thread) = WalHandle::spawn(backend).map_err(|e| Error::Thread(e.to_string()))?;
    // Publishing committed events: a user of its own, which serves no request.
    let state = Bus::connect_state(&config.nats, "toka-storage-state", &Role::StorageState.inbox()).await?;
    let js = async_nats::jetstream::new(state.client().clone());
    for log in publish::ensure_streams(&js).await? {
        // A new stream holds none of its log's events: publish what the WAL keeps of them.
        let republish = wal.call(move |w| w.head(log).and_then(|head| w.set_published(log, head.first_seq - 1))).await;
        republish.map_err(|e| Error::Thread(e.to_string()))??;
    }
    let (stop_publisher, stopped) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish::run(js, wal.clone(), stopped.clone()));
    let compactor = config.storage.compact_keep_records.map(|keep| {
        tokio::spawn(compact(
            wal.clone(),
            keep,
            Duration::from_millis(config.storage.compact_interval_ms.max(10)),
            stopped,
        ))
    });
    let mut host = Host::start(&bus, SERVICE_NAME, DESCRIPTION, &config.admin).await?;
    serve_endpoints(&mut host, &wal).await?;
    host.serve_until(&bus, shutdown, Duration::from_millis(config.shutdown.grace_ms)).await;
    let _ = stop_publisher.send(true);
    let _ = publisher.await;
    if let Some(compactor) = compactor {
        let _ = compactor.await;
    }
    state.drain().await;
    drop(wal);
    // The WAL thread ends once every handle is gone; committed data is already durable.
    let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    Ok(())
}
