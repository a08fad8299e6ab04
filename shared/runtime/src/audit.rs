//! A writer of the `audit` log, shared by auth and the kernel: the decisions a service records,
//! and what it folds out of the log it shares with other writers.
//!
//! The log in storage is the record of truth. Auth appends each issue, delegation, revocation
//! and rotation as an audit record and answers its caller only once storage has made it
//! durable; the kernel records its denials; denials are counted per principal and action and
//! written once per interval, so a flood of bad requests adds a handful of records, not a flood.
//! Several writers share the log (every auth replica, and the kernel): a writer tracks the
//! head, and on a sequence conflict (or an append whose outcome it does not know) reads what
//! others appended, folds it in, finishes those of its own records it finds there, and seals
//! the rest again on the new head.
//!
//! What a writer folds out of the log is its own: a [`Fold`] (auth folds the revocations and
//! their epoch; the kernel folds nothing). Every writer that has read the same log holds the
//! same fold. An entry whose events depend on the fold (a revocation's epoch) is given as
//! [`Events::Sealed`], made when the record is sealed, from the fold as it stands after every
//! record before it.
//!
//! Storage is reached through [`AuditLog`]: [`Bus`] talks to the storage service; with the
//! feature `test-util`, [`memory::MemoryAuditLog`] keeps the log in memory for unit tests.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use toka_contract::api::storage::{
    AppendReply, AppendRequest, HeadReply, HeadRequest, QueryReply, QueryRequest, ReadReply, ReadRequest,
};
use toka_contract::record::{AuditEntry, AuditRecord, Chain, Decision, LogName};
use toka_contract::spec::Principal;
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Event, OpId, subject};
use tokio::sync::{mpsc, oneshot};

use crate::bus::{Bus, RequestError};
use crate::now_us;

/// What a writer needs of storage's `audit` log.
pub trait AuditLog: Clone + Send + Sync + 'static {
    /// The log's head.
    fn head(&self) -> impl Future<Output = Result<HeadReply, RequestError>> + Send;
    /// A page of events by type or entity.
    fn query(&self, request: QueryRequest) -> impl Future<Output = Result<QueryReply, RequestError>> + Send;
    /// A page of records.
    fn read(&self, request: ReadRequest) -> impl Future<Output = Result<ReadReply<AuditEntry>, RequestError>> + Send;
    /// Appends records durably.
    fn append(
        &self,
        request: AppendRequest<AuditEntry>,
    ) -> impl Future<Output = Result<AppendReply, RequestError>> + Send;
}

impl AuditLog for Bus {
    async fn head(&self) -> Result<HeadReply, RequestError> {
        self.request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Audit }).await
    }

    async fn query(&self, request: QueryRequest) -> Result<QueryReply, RequestError> {
        self.request(subject::STORAGE_QUERY.subject, &request).await
    }

    async fn read(&self, request: ReadRequest) -> Result<ReadReply<AuditEntry>, RequestError> {
        self.request(subject::STORAGE_READ.subject, &request).await
    }

    async fn append(&self, request: AppendRequest<AuditEntry>) -> Result<AppendReply, RequestError> {
        self.request(subject::STORAGE_APPEND_AUDIT.subject, &request).await
    }
}

/// What a writer folds out of the log, event by event, in log order.
pub trait Fold: Clone + Send + 'static {
    /// Events of this type are read back from the log at start, up to its head; `None` reads
    /// none (the writer then only follows the log from its head).
    const REPLAY: Option<&'static str> = None;

    /// Takes in one event of a committed record sealed at `time_us`.
    fn apply(&mut self, event: &Event, time_us: u64);
}

/// Folds nothing: a writer that only records (the kernel's denials).
impl Fold for () {
    fn apply(&mut self, _: &Event, _: u64) {}
}

/// Called with each event of each committed record, in log order, once it is folded in.
pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// Makes an entry's events from the fold.
pub type MakeEvents<F> = Arc<dyn Fn(&F) -> Vec<Event> + Send + Sync>;

/// An entry's events.
pub enum Events<F> {
    /// Known when the entry is recorded.
    Fixed(Vec<Event>),
    /// Made when the record is sealed, from the fold after every record before it; made again
    /// if the record has to be sealed again on another head.
    Sealed(MakeEvents<F>),
}

impl<F> Clone for Events<F> {
    fn clone(&self) -> Self {
        match self {
            Events::Fixed(events) => Events::Fixed(events.clone()),
            Events::Sealed(make) => Events::Sealed(make.clone()),
        }
    }
}

impl<F> std::fmt::Debug for Events<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Events::Fixed(events) => f.debug_tuple("Fixed").field(events).finish(),
            Events::Sealed(_) => f.write_str("Sealed(..)"),
        }
    }
}

/// One allowed decision to record.
#[derive(Debug, Clone)]
pub struct Entry<F> {
    /// Who acted.
    pub principal: Principal,
    /// What (`token.issue`, `token.delegate`, `token.revoke`, `key.rotate`).
    pub action: &'static str,
    /// On what.
    pub resource: String,
    /// Its events.
    pub events: Events<F>,
}

/// A durable record of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The record's sequence in the audit log.
    pub seq: u64,
    /// Its events, as sealed.
    pub events: Vec<Event>,
}

struct Pending<F> {
    op_id: OpId,
    principal: Principal,
    entry: AuditEntry,
    events: Events<F>,
    done: Option<oneshot::Sender<Result<Committed, WireError>>>,
}

/// (principal, action) → (count, first resource, first reason), for this interval.
type Denials = BTreeMap<(String, String), (u32, String, String)>;

/// The most distinct (principal, action) denial buckets per interval; beyond, denials are
/// counted under the principal `overflow`.
const MAX_DENIAL_BUCKETS: usize = 10_000;
/// The most records in one append.
const MAX_BATCH: usize = 256;

/// Settings of the ledger.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How often denials are written and the log re-read.
    pub interval: Duration,
    /// How long an append may keep retrying before the caller gets `unavailable`.
    pub commit_timeout: Duration,
}

/// The log as far as this writer has read or written it.
struct State<F> {
    head: Chain,
    fold: F,
}

/// The handle endpoints use.
pub struct Ledger<F> {
    tx: mpsc::Sender<Command<F>>,
    state: Arc<Mutex<State<F>>>,
    denials: Arc<Mutex<Denials>>,
}

impl<F> Clone for Ledger<F> {
    fn clone(&self) -> Self {
        Ledger { tx: self.tx.clone(), state: self.state.clone(), denials: self.denials.clone() }
    }
}

impl<F> std::fmt::Debug for Ledger<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

enum Command<F> {
    Append(Pending<F>),
    Tail,
    Close(oneshot::Sender<()>),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A fresh operation id: the time, then 80 random bits (ids of different replicas never
/// collide, so a writer can recognise its own records after an uncertain append).
fn fresh_op_id(time_us: u64) -> OpId {
    // With no random source the time and a process-local counter still separate ids.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = crate::fresh_id(time_us).unwrap_or_else(|_| {
        u128::from(time_us / 1000) << 80 | u128::from(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    });
    OpId::from_u128(id)
}

fn storage_error(e: &RequestError) -> WireError {
    let mut wire = e.to_wire();
    wire.message = format!("the audit log: {}", wire.message);
    wire
}

impl<F: Fold> State<F> {
    /// Moves the head past `record` and folds its events in.
    fn fold_in(&mut self, record: &AuditRecord, observer: &Observer) {
        self.head = Chain { seq: record.seq, hash: record.hash };
        for event in &record.events {
            self.fold.apply(event, record.time_us);
            observer(event);
        }
    }
}

impl<F: Fold> Ledger<F> {
    /// Reads the log's head (and, if `F` replays some, the events up to it into `fold`), then
    /// starts the writer.
    pub async fn start(
        log: impl AuditLog,
        settings: Settings,
        mut fold: F,
        observer: Observer,
    ) -> Result<Ledger<F>, WireError> {
        let head = log.head().await.map_err(|e| storage_error(&e))?;
        let mut after = None;
        let mut replayed = 0;
        while let Some(event_type) = F::REPLAY {
            let query = QueryRequest {
                log: LogName::Audit,
                entity: None,
                event_type: Some(event_type.to_owned()),
                from_time_us: None,
                to_time_us: None,
                after,
                limit: toka_contract::api::MAX_PAGE,
            };
            let page = log.query(query).await.map_err(|e| storage_error(&e))?;
            for hit in page.hits.iter().filter(|h| h.at.seq <= head.seq) {
                fold.apply(&hit.event, hit.time_us);
                observer(&hit.event);
                replayed += 1;
            }
            match page.next_after {
                Some(next) if next.seq <= head.seq => after = Some(next),
                _ => break,
            }
        }
        tracing::info!(head = head.seq, replayed, "audit log read");
        let state = Arc::new(Mutex::new(State { head: Chain { seq: head.seq, hash: head.hash }, fold }));
        let denials = Arc::new(Mutex::new(Denials::new()));
        let (tx, rx) = mpsc::channel(4_096);
        let writer = Writer { log, settings, state: state.clone(), denials: denials.clone(), observer };
        tokio::spawn(writer.run(rx));
        Ok(Ledger { tx, state, denials })
    }

    /// Records `entry` as allowed and waits until it is durable.
    pub async fn record(&self, entry: Entry<F>) -> Result<Committed, WireError> {
        let audit = AuditEntry {
            action: entry.action.into(),
            resource: entry.resource,
            decision: Decision::Allow,
            reason: String::new(),
            count: 1,
        };
        let (done, wait) = oneshot::channel();
        let pending = Pending {
            op_id: fresh_op_id(now_us()),
            principal: entry.principal,
            entry: audit,
            events: entry.events,
            done: Some(done),
        };
        let closed =
            || WireError::new(ErrorCode::Unavailable, "the audit writer is stopping").with_retry_after_ms(1_000);
        self.tx.try_send(Command::Append(pending)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                WireError::new(ErrorCode::Unavailable, "the audit writer is at its queue limit")
                    .with_retry_after_ms(100)
            }
            mpsc::error::TrySendError::Closed(_) => closed(),
        })?;
        wait.await.map_err(|_| closed())?
    }

    /// Counts a denial; written, aggregated, at the end of the interval.
    pub fn deny(&self, principal: &str, action: &str, resource: &str, reason: &str) {
        let mut denials = lock(&self.denials);
        let full = denials.len() >= MAX_DENIAL_BUCKETS;
        let key = (principal.to_owned(), action.to_owned());
        let key = if full && !denials.contains_key(&key) { ("overflow".to_owned(), action.to_owned()) } else { key };
        let slot = denials.entry(key).or_insert_with(|| (0, resource.to_owned(), reason.to_owned()));
        slot.0 = slot.0.saturating_add(1);
    }

    /// Writes what is still owed (the current interval's denials) and stops the writer.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Command::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Asks the writer to read what others appended.
    pub fn tail(&self) {
        let _ = self.tx.try_send(Command::Tail);
    }

    /// The log's head as far as this writer has read it.
    pub fn head_seq(&self) -> u64 {
        lock(&self.state).head.seq
    }

    /// Reads the fold.
    pub fn fold<R>(&self, read: impl FnOnce(&F) -> R) -> R {
        read(&lock(&self.state).fold)
    }

    /// Changes the fold outside the log (dropping what has expired, say).
    pub fn fold_mut<R>(&self, change: impl FnOnce(&mut F) -> R) -> R {
        change(&mut lock(&self.state).fold)
    }
}

struct Writer<F, L> {
    log: L,
    settings: Settings,
    state: Arc<Mutex<State<F>>>,
    denials: Arc<Mutex<Denials>>,
    observer: Observer,
}

impl<F: Fold, L: AuditLog> Writer<F, L> {
    async fn run(self, mut rx: mpsc::Receiver<Command<F>>) {
        let mut tick = tokio::time::interval(self.settings.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closed = None;
        while closed.is_none() {
            let mut batch = Vec::new();
            let mut tail = false;
            tokio::select! {
                command = rx.recv() => match command {
                    Some(Command::Append(p)) => batch.push(p),
                    Some(Command::Tail) => tail = true,
                    Some(Command::Close(done)) => closed = Some(done),
                    None => break,
                },
                _ = tick.tick() => {
                    tail = true;
                    batch.extend(self.take_denials());
                }
            }
            while batch.len() < MAX_BATCH && closed.is_none() {
                match rx.try_recv() {
                    Ok(Command::Append(p)) => batch.push(p),
                    Ok(Command::Tail) => tail = true,
                    Ok(Command::Close(done)) => closed = Some(done),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                if tail && let Err(e) = self.tail().await {
                    tracing::debug!(error = %e.message, "reading the audit log failed");
                }
                continue;
            }
            self.commit(batch).await;
        }
        // Written on the way out: the denials of the last interval.
        let last = self.take_denials();
        if !last.is_empty() {
            self.commit(last).await;
        }
        if let Some(done) = closed {
            let _ = done.send(());
        }
    }

    fn take_denials(&self) -> Vec<Pending<F>> {
        let counts = std::mem::take(&mut *lock(&self.denials));
        let time_us = now_us();
        counts
            .into_iter()
            .filter_map(|((principal, action), (count, resource, reason))| {
                let principal: Principal = principal.parse().ok()?;
                let denied = Event::AccessDenied {
                    principal: principal.clone(),
                    action: action.clone(),
                    resource: resource.clone(),
                    reason: reason.clone(),
                    count,
                };
                Some(Pending {
                    op_id: fresh_op_id(time_us),
                    principal,
                    entry: AuditEntry { action, resource, decision: Decision::Deny, reason, count },
                    events: Events::Fixed(vec![denied]),
                    done: None,
                })
            })
            .collect()
    }

    /// Reads the records others appended after our head and folds them in; each record's
    /// outcome by its operation id.
    async fn tail(&self) -> Result<BTreeMap<OpId, Committed>, WireError> {
        let mut seen = BTreeMap::new();
        loop {
            let from_seq = lock(&self.state).head.seq + 1;
            let request = ReadRequest {
                log: LogName::Audit,
                from_seq,
                max_records: toka_contract::api::MAX_PAGE,
                max_bytes: toka_contract::api::storage::MAX_READ_BYTES,
            };
            let page = self.log.read(request).await.map_err(|e| storage_error(&e))?;
            let mut state = lock(&self.state);
            for record in &page.records {
                if record.seq != state.head.seq + 1 || record.prev_hash != state.head.hash {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("the audit log does not continue our head at {}", state.head.seq),
                    ));
                }
                seen.insert(record.op_id, Committed { seq: record.seq, events: record.events.clone() });
                state.fold_in(record, &self.observer);
            }
            if page.records.is_empty() || state.head.seq >= page.head_seq {
                return Ok(seen);
            }
        }
    }

    /// Seals the batch on the current head.
    fn seal(&self, batch: &[Pending<F>]) -> Result<Vec<AuditRecord>, WireError> {
        let state = lock(&self.state);
        let mut chain = state.head;
        // The fold as it will stand before each record: copied only when an entry needs it.
        let mut scratch: Option<F> = None;
        let time_us = now_us();
        let mut records: Vec<AuditRecord> = Vec::with_capacity(batch.len());
        for p in batch {
            let events = match &p.events {
                Events::Fixed(events) => events.clone(),
                Events::Sealed(make) => {
                    let fold = scratch.get_or_insert_with(|| {
                        let mut fold = state.fold.clone();
                        for r in &records {
                            r.events.iter().for_each(|e| fold.apply(e, r.time_us));
                        }
                        fold
                    });
                    make(fold)
                }
            };
            let (record, _) = chain
                .seal(p.op_id, p.principal.clone(), time_us, p.entry.clone(), events)
                .map_err(|e| WireError::new(ErrorCode::Internal, format!("sealing an audit record: {e}")))?;
            if let Some(fold) = scratch.as_mut() {
                record.events.iter().for_each(|e| fold.apply(e, record.time_us));
            }
            records.push(record);
        }
        Ok(records)
    }

    async fn commit(&self, mut batch: Vec<Pending<F>>) {
        let deadline = tokio::time::Instant::now() + self.settings.commit_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let records = match self.seal(&batch) {
                Ok(records) => records,
                Err(e) => return finish(batch, Err(e)),
            };
            let request = AppendRequest { expected_seq: records[0].seq, records };
            let error = match self.log.append(request.clone()).await {
                Ok(_) => {
                    let mut state = lock(&self.state);
                    // Only this task moves the head, so it is still where the batch was sealed.
                    for record in &request.records {
                        state.fold_in(record, &self.observer);
                    }
                    drop(state);
                    for (p, r) in batch.iter_mut().zip(request.records) {
                        if let Some(done) = p.done.take() {
                            let _ = done.send(Ok(Committed { seq: r.seq, events: r.events }));
                        }
                    }
                    return;
                }
                Err(RequestError::Remote(e)) if e.code == ErrorCode::Conflict => e,
                Err(e) => storage_error(&e),
            };
            // Someone else appended, or we do not know whether our append landed: read the
            // log. Records of ours found there are done; the rest go again on the new head.
            let head_before = lock(&self.state).head.seq;
            match self.tail().await {
                Ok(mut seen) => {
                    batch.retain_mut(|p| {
                        let Some(committed) = seen.remove(&p.op_id) else { return true };
                        if let Some(done) = p.done.take() {
                            let _ = done.send(Ok(committed));
                        }
                        false
                    });
                    if batch.is_empty() {
                        return;
                    }
                }
                Err(tail_error) => tracing::warn!(error = %tail_error.message, "reading the audit log failed"),
            }
            // A conflict that reading resolved goes again at once; anything else (a conflict
            // the log does not explain included) waits, so a fault is not retried in a spin.
            let moved = lock(&self.state).head.seq > head_before;
            if error.code == ErrorCode::Conflict && moved {
                if tokio::time::Instant::now() > deadline {
                    return finish(batch, Err(error));
                }
            } else {
                if tokio::time::Instant::now() + backoff > deadline {
                    tracing::warn!(error = %error.message, records = batch.len(), "audit append gave up");
                    return finish(batch, Err(error));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

fn finish<F>(batch: Vec<Pending<F>>, result: Result<Committed, WireError>) {
    for mut p in batch {
        if let Some(done) = p.done.take() {
            let _ = done.send(result.clone());
        }
    }
}

#[cfg(any(test, feature = "test-util"))]
pub mod memory;

#[cfg(test)]
mod tests;
