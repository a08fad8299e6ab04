//! A writer of the `audit` log, shared by auth and the kernel: the decisions a service records,
//! and (for auth) the revocations it reads back.
//!
//! The log in storage is the record of truth. Auth appends each issue, delegation, revocation
//! and rotation as an audit record and answers its caller only once storage has made it
//! durable; the kernel records its denials; denials are counted per principal and action and written once per interval, so a
//! flood of bad requests adds a handful of records, not a flood. Several writers share the log
//! (every auth replica, and the kernel): a writer tracks the head, and on a sequence conflict
//! reads what others appended, folds it in, and seals its batch again on the new head.
//!
//! Folding the log gives the revocation set and its epoch (how many revocations ever): every
//! replica that has read the same log holds the same set, and a revocation written by one
//! reaches the others by reading.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::api::auth::{Revocation, RevocationsReply};
use crate::api::storage::{
    AppendReply, AppendRequest, HeadReply, HeadRequest, QueryReply, QueryRequest, ReadReply, ReadRequest,
};
use crate::record::{AuditEntry, AuditRecord, Decision, Hash, LogName, Record};
use crate::runtime::bus::{Bus, RequestError};
use crate::runtime::now_us;
use crate::spec::Principal;
use crate::wire::{ErrorCode, WireError};
use crate::{Event, OpId, TokenId, subject};
use tokio::sync::{mpsc, oneshot};

/// What the ledger folds out of the log.
#[derive(Debug, Default)]
pub struct State {
    /// The last record read or written.
    pub head_seq: u64,
    head_hash: Hash,
    /// Revocations ever.
    pub epoch: u64,
    /// Revocations still in force (not yet past the longest token lifetime).
    pub revoked: BTreeMap<TokenId, Revocation>,
}

/// Called with each event folded from the log, in log order.
pub type Observer = Arc<dyn Fn(&Event) + Send + Sync>;

/// One decision to record.
#[derive(Debug, Clone)]
pub enum Entry {
    /// An allowed action and the events it produced.
    Allowed {
        /// Who acted.
        principal: Principal,
        /// What (`token.issue`, `token.delegate`, `key.rotate`).
        action: &'static str,
        /// On what.
        resource: String,
        /// Its events.
        events: Vec<Event>,
    },
    /// A revocation; its event's epoch is fixed when the record is sealed.
    Revoke {
        /// Who revoked.
        principal: Principal,
        /// The token.
        jti: TokenId,
        /// Why.
        reason: String,
    },
}

/// The outcome of a durable append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// The record's sequence in the audit log.
    pub seq: u64,
    /// The revocation epoch after it.
    pub epoch: u64,
}

struct Pending {
    op_id: OpId,
    principal: Principal,
    entry: AuditEntry,
    events: PendingEvents,
    done: Option<oneshot::Sender<Result<Committed, WireError>>>,
}

enum PendingEvents {
    Fixed(Vec<Event>),
    Revocation { jti: TokenId, reason: String },
}

#[derive(Default)]
struct Denials {
    /// (principal, action) → (count, first resource, first reason), for this interval.
    counts: BTreeMap<(String, String), (u32, String, String)>,
}

/// The most distinct (principal, action) denial buckets per interval; beyond, denials are
/// counted under the principal `overflow`.
const MAX_DENIAL_BUCKETS: usize = 10_000;
/// The most records in one append.
const MAX_BATCH: usize = 256;

/// Settings of the ledger.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a revocation stays in force: the longest token lifetime.
    pub max_token_ttl_us: u64,
    /// How often denials are written and the log re-read.
    pub interval: Duration,
    /// How long an append may keep retrying before the caller gets `unavailable`.
    pub commit_timeout: Duration,
    /// Whether to read the revocations in the log at start (auth does; the kernel, which
    /// only writes denials, does not).
    pub revocations: bool,
}

/// The handle endpoints use.
#[derive(Clone)]
pub struct Ledger {
    tx: mpsc::Sender<Command>,
    state: Arc<Mutex<State>>,
    denials: Arc<Mutex<Denials>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger").finish_non_exhaustive()
    }
}

enum Command {
    Append(Pending),
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
    let id = crate::runtime::fresh_id(time_us).unwrap_or_else(|_| {
        u128::from(time_us / 1000) << 80 | u128::from(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    });
    OpId::from_u128(id)
}

fn fold(state: &mut State, settings: &Settings, record: &AuditRecord, observer: &Observer) {
    state.head_seq = record.seq;
    state.head_hash = record.hash;
    for event in &record.events {
        if let Event::TokenRevoked { jti, epoch, .. } = event {
            fold_revocation(state, settings, *jti, *epoch, record.time_us);
        }
        observer(event);
    }
}

fn fold_revocation(state: &mut State, settings: &Settings, jti: TokenId, epoch: u64, time_us: u64) {
    state.epoch = state.epoch.max(epoch);
    let expires_at_us = time_us.saturating_add(settings.max_token_ttl_us);
    state.revoked.entry(jti).or_insert(Revocation { jti, revoked_at_us: time_us, expires_at_us });
}

fn storage_error(e: &RequestError) -> WireError {
    let mut wire = e.to_wire();
    wire.message = format!("the audit log: {}", wire.message);
    wire
}

impl Ledger {
    /// Reads the log's head and every revocation up to it, then starts the writer.
    pub async fn start(bus: Bus, settings: Settings, observer: Observer) -> Result<Ledger, WireError> {
        let head: HeadReply = bus
            .request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Audit })
            .await
            .map_err(|e| storage_error(&e))?;
        let mut state = State { head_seq: head.seq, head_hash: head.hash, ..State::default() };
        let mut after = None;
        let mut more = settings.revocations;
        while more {
            let query = QueryRequest {
                log: LogName::Audit,
                entity: None,
                event_type: Some("auth.token_revoked".into()),
                from_time_us: None,
                to_time_us: None,
                after,
                limit: crate::api::MAX_PAGE,
            };
            let page: QueryReply =
                bus.request(subject::STORAGE_QUERY.subject, &query).await.map_err(|e| storage_error(&e))?;
            for hit in page.hits.iter().filter(|h| h.at.seq <= head.seq) {
                if let Event::TokenRevoked { jti, epoch, .. } = &hit.event {
                    fold_revocation(&mut state, &settings, *jti, *epoch, hit.time_us);
                    observer(&hit.event);
                }
            }
            match page.next_after {
                Some(next) if next.seq <= head.seq => after = Some(next),
                _ => more = false,
            }
        }
        tracing::info!(head = head.seq, revoked = state.revoked.len(), epoch = state.epoch, "audit log read");
        let state = Arc::new(Mutex::new(state));
        let denials = Arc::new(Mutex::new(Denials::default()));
        let (tx, rx) = mpsc::channel(4_096);
        let writer = Writer { bus, settings, state: state.clone(), denials: denials.clone(), observer };
        tokio::spawn(writer.run(rx));
        Ok(Ledger { tx, state, denials })
    }

    /// Records `entry` and waits until it is durable.
    pub async fn record(&self, entry: Entry) -> Result<Committed, WireError> {
        let time_us = now_us();
        let (principal, audit, events) = match entry {
            Entry::Allowed { principal, action, resource, events } => (
                principal,
                AuditEntry {
                    action: action.into(),
                    resource,
                    decision: Decision::Allow,
                    reason: String::new(),
                    count: 1,
                },
                PendingEvents::Fixed(events),
            ),
            Entry::Revoke { principal, jti, reason } => (
                principal,
                AuditEntry {
                    action: "token.revoke".into(),
                    resource: format!("token:{jti}"),
                    decision: Decision::Allow,
                    reason: String::new(),
                    count: 1,
                },
                PendingEvents::Revocation { jti, reason },
            ),
        };
        let (done, wait) = oneshot::channel();
        let pending = Pending { op_id: fresh_op_id(time_us), principal, entry: audit, events, done: Some(done) };
        let closed = || WireError::new(ErrorCode::Unavailable, "auth is shutting down").with_retry_after_ms(1_000);
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
        let full = denials.counts.len() >= MAX_DENIAL_BUCKETS;
        let key = (principal.to_owned(), action.to_owned());
        let key =
            if full && !denials.counts.contains_key(&key) { ("overflow".to_owned(), action.to_owned()) } else { key };
        let slot = denials.counts.entry(key).or_insert_with(|| (0, resource.to_owned(), reason.to_owned()));
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

    /// The log's head as far as this replica has read it.
    pub fn head_seq(&self) -> u64 {
        lock(&self.state).head_seq
    }

    /// The revocation epoch.
    pub fn epoch(&self) -> u64 {
        lock(&self.state).epoch
    }

    /// Whether `jti` is revoked (directly; callers check every link of a chain).
    pub fn is_revoked(&self, jti: &TokenId) -> bool {
        lock(&self.state).revoked.contains_key(jti)
    }

    /// Every revocation in force at `now_us`, with the epoch; drops the expired ones.
    pub fn revocations(&self, now_us: u64) -> RevocationsReply {
        let mut state = lock(&self.state);
        state.revoked.retain(|_, r| r.expires_at_us > now_us);
        RevocationsReply { epoch: state.epoch, revoked: state.revoked.values().cloned().collect() }
    }
}

struct Writer {
    bus: Bus,
    settings: Settings,
    state: Arc<Mutex<State>>,
    denials: Arc<Mutex<Denials>>,
    observer: Observer,
}

impl Writer {
    async fn run(self, mut rx: mpsc::Receiver<Command>) {
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

    fn take_denials(&self) -> Vec<Pending> {
        let counts = std::mem::take(&mut lock(&self.denials).counts);
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
                    events: PendingEvents::Fixed(vec![denied]),
                    done: None,
                })
            })
            .collect()
    }

    /// Reads the records others appended after our head and folds them in; the op ids seen.
    async fn tail(&self) -> Result<BTreeSet<OpId>, WireError> {
        let mut seen = BTreeSet::new();
        loop {
            let from_seq = lock(&self.state).head_seq + 1;
            let request = ReadRequest {
                log: LogName::Audit,
                from_seq,
                max_records: crate::api::MAX_PAGE,
                max_bytes: crate::api::storage::MAX_READ_BYTES,
            };
            let page: ReadReply<AuditEntry> =
                self.bus.request(subject::STORAGE_READ.subject, &request).await.map_err(|e| storage_error(&e))?;
            let mut state = lock(&self.state);
            for record in &page.records {
                if record.seq != state.head_seq + 1 || record.prev_hash != state.head_hash {
                    return Err(WireError::new(
                        ErrorCode::Internal,
                        format!("the audit log does not continue our head at {}", state.head_seq),
                    ));
                }
                seen.insert(record.op_id);
                fold(&mut state, &self.settings, record, &self.observer);
            }
            if page.records.is_empty() || state.head_seq >= page.head_seq {
                return Ok(seen);
            }
        }
    }

    /// Seals the batch on the current head; the records with their pending index.
    fn seal(&self, batch: &[Pending]) -> Result<Vec<AuditRecord>, WireError> {
        let state = lock(&self.state);
        let (mut seq, mut prev, mut epoch) = (state.head_seq, state.head_hash, state.epoch);
        let time_us = now_us();
        let mut records = Vec::with_capacity(batch.len());
        for p in batch {
            seq += 1;
            let events = match &p.events {
                PendingEvents::Fixed(events) => events.clone(),
                PendingEvents::Revocation { jti, reason } => {
                    epoch += 1;
                    vec![Event::TokenRevoked { jti: *jti, epoch, reason: reason.clone() }]
                }
            };
            let record = Record::seal(seq, p.op_id, p.principal.clone(), time_us, p.entry.clone(), events, prev)
                .map_err(|e| WireError::new(ErrorCode::Internal, format!("sealing an audit record: {e}")))?;
            prev = record.hash;
            records.push(record);
        }
        Ok(records)
    }

    async fn commit(&self, mut batch: Vec<Pending>) {
        let deadline = tokio::time::Instant::now() + self.settings.commit_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let records = match self.seal(&batch) {
                Ok(records) => records,
                Err(e) => return finish(batch, Err(e)),
            };
            let request = AppendRequest { expected_seq: records[0].seq, records };
            let sent: Result<AppendReply, RequestError> =
                self.bus.request(subject::STORAGE_APPEND_AUDIT.subject, &request).await;
            let error = match sent {
                Ok(_) => {
                    let mut state = lock(&self.state);
                    // Only if nothing moved the head meanwhile (a tail runs on this task only).
                    for record in &request.records {
                        fold(&mut state, &self.settings, record, &self.observer);
                    }
                    drop(state);
                    let committed: Vec<_> =
                        request.records.iter().map(|r| Committed { seq: r.seq, epoch: epoch_after(r) }).collect();
                    for (p, c) in batch.iter_mut().zip(committed) {
                        if let Some(done) = p.done.take() {
                            let _ = done.send(Ok(c));
                        }
                    }
                    return;
                }
                Err(RequestError::Remote(e)) if e.code == ErrorCode::Conflict => e,
                Err(e) => storage_error(&e),
            };
            // Someone else appended, or we do not know whether our append landed: read the
            // log. Records of ours found there are done; the rest go again on the new head.
            match self.tail().await {
                Ok(seen) => {
                    let state = lock(&self.state);
                    let (epoch, head) = (state.epoch, state.head_seq);
                    drop(state);
                    batch.retain_mut(|p| {
                        if !seen.contains(&p.op_id) {
                            return true;
                        }
                        if let Some(done) = p.done.take() {
                            let _ = done.send(Ok(Committed { seq: head, epoch }));
                        }
                        false
                    });
                    if batch.is_empty() {
                        return;
                    }
                }
                Err(tail_error) => tracing::warn!(error = %tail_error.message, "reading the audit log failed"),
            }
            if error.code != ErrorCode::Conflict {
                if tokio::time::Instant::now() + backoff > deadline {
                    tracing::warn!(error = %error.message, records = batch.len(), "audit append gave up");
                    return finish(batch, Err(error));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            } else if tokio::time::Instant::now() > deadline {
                return finish(batch, Err(error));
            }
        }
    }
}

/// The epoch carried by a record's revocation, if any (else 0: the caller reads the state).
fn epoch_after(record: &AuditRecord) -> u64 {
    record
        .events
        .iter()
        .find_map(|e| match e {
            Event::TokenRevoked { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .unwrap_or(0)
}

fn finish(batch: Vec<Pending>, result: Result<Committed, WireError>) {
    for mut p in batch {
        if let Some(done) = p.done.take() {
            let _ = done.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn op_ids_are_fresh_and_valid() {
        let a = fresh_op_id(1_764_150_000_000_000);
        let b = fresh_op_id(1_764_150_000_000_000);
        assert_ne!(a, b);
        assert_eq!(a.to_string().parse::<OpId>().unwrap(), a);
    }

    #[test]
    fn folding_revocations_counts_the_epoch_and_expires_entries() {
        let settings = Settings {
            max_token_ttl_us: 100,
            interval: Duration::from_secs(1),
            commit_timeout: Duration::from_secs(1),
            revocations: true,
        };
        let mut state = State::default();
        fold_revocation(&mut state, &settings, TokenId::from_u128(1), 1, 1_000);
        fold_revocation(&mut state, &settings, TokenId::from_u128(2), 2, 1_050);
        fold_revocation(&mut state, &settings, TokenId::from_u128(1), 3, 1_060);
        assert_eq!(state.epoch, 3);
        assert_eq!(state.revoked[&TokenId::from_u128(1)].revoked_at_us, 1_000, "the first revocation counts");
        assert_eq!(state.revoked[&TokenId::from_u128(2)].expires_at_us, 1_150);
    }
}
