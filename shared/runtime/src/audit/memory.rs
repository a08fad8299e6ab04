//! An `audit` log in memory, for unit tests of its writers (feature `test-util`): it answers
//! as storage does (a batch must start at the head + 1 and link to its hash, an identical
//! retry is acknowledged again, anything else at a taken sequence is a `conflict` naming
//! `next_seq`), and it can be told to fail appends, before or after they land.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use toka_contract::api::storage::{
    AppendReply, AppendRequest, EventAddress, HeadReply, QueryHit, QueryReply, QueryRequest, ReadReply, ReadRequest,
};
use toka_contract::record::{AuditEntry, AuditRecord, Chain, Decision, LogName};
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Event, OpId};

use super::AuditLog;
use crate::bus::RequestError;

/// What the next append does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails without writing (storage unreachable).
    Lost,
    /// Writes, then fails (the acknowledgement is lost).
    Unacknowledged,
}

#[derive(Debug, Default)]
struct Inner {
    records: Vec<AuditRecord>,
    faults: VecDeque<Fault>,
    appends: u64,
}

/// The log; clones share it.
#[derive(Debug, Clone, Default)]
pub struct MemoryAuditLog {
    inner: Arc<Mutex<Inner>>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn transport() -> RequestError {
    RequestError::Timeout("toka.storage.v1.append.audit".into())
}

impl MemoryAuditLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every record, in order.
    pub fn records(&self) -> Vec<AuditRecord> {
        lock(&self.inner).records.clone()
    }

    /// The end of the chain.
    pub fn head_chain(&self) -> Chain {
        lock(&self.inner).records.last().map_or(Chain::START, |r| Chain { seq: r.seq, hash: r.hash })
    }

    /// The next appends meet `faults`, in order (replacing faults still waiting).
    pub fn fail_next(&self, faults: &[Fault]) {
        lock(&self.inner).faults = faults.iter().copied().collect();
    }

    /// Appends a record sealed by someone else on the head, as another replica would; the
    /// record.
    pub fn append_foreign(&self, op_id: OpId, events: Vec<Event>) -> AuditRecord {
        let mut inner = lock(&self.inner);
        let mut chain = inner.records.last().map_or(Chain::START, |r| Chain { seq: r.seq, hash: r.hash });
        let entry = AuditEntry {
            action: "token.issue".into(),
            resource: "token:*".into(),
            decision: Decision::Allow,
            reason: String::new(),
            count: 1,
        };
        let principal = "another-replica".parse().expect("a valid principal");
        let time_us = 1_764_150_000_000_000 + chain.seq;
        let (record, _) = chain.seal(op_id, principal, time_us, entry, events).expect("a test record seals");
        inner.records.push(record.clone());
        record
    }

    /// How many appends were asked for (failed ones included).
    pub fn appends(&self) -> u64 {
        lock(&self.inner).appends
    }

    fn apply(inner: &mut Inner, request: AppendRequest<AuditEntry>) -> Result<AppendReply, WireError> {
        let head = inner.records.last().map_or(Chain::START, |r| Chain { seq: r.seq, hash: r.hash });
        let conflict = |why: String| WireError::new(ErrorCode::Conflict, why).with_detail("next_seq", head.seq + 1);
        let (Some(first), Some(last)) = (request.records.first(), request.records.last()) else {
            return Err(WireError::new(ErrorCode::BadRequest, "no records"));
        };
        let (first, last) = ((first.seq, first.prev_hash), (last.seq, last.hash));
        if first.0 != request.expected_seq {
            return Err(WireError::new(ErrorCode::BadRequest, "expected_seq is not the first record's"));
        }
        // An identical retry of committed records is acknowledged again.
        let committed = |r: &AuditRecord| inner.records.get((r.seq - 1) as usize).is_some_and(|c| c == r);
        if last.0 <= head.seq {
            if request.records.iter().all(committed) {
                return Ok(AppendReply { first_seq: first.0, last_seq: last.0, last_hash: last.1, duplicate: true });
            }
            return Err(conflict(format!("sequence {} is taken", first.0)));
        }
        if first.0 != head.seq + 1 || first.1 != head.hash {
            return Err(conflict(format!("the batch does not continue the head at {}", head.seq)));
        }
        toka_contract::record::verify_chain(&request.records, head.seq, head.hash)
            .map_err(|b| WireError::new(ErrorCode::BadRequest, b.to_string()))?;
        inner.records.extend(request.records);
        Ok(AppendReply { first_seq: first.0, last_seq: last.0, last_hash: last.1, duplicate: false })
    }
}

impl AuditLog for MemoryAuditLog {
    async fn head(&self) -> Result<HeadReply, RequestError> {
        let head = self.head_chain();
        Ok(HeadReply { log: LogName::Audit, seq: head.seq, hash: head.hash })
    }

    async fn query(&self, request: QueryRequest) -> Result<QueryReply, RequestError> {
        let inner = lock(&self.inner);
        let limit = request.limit.max(1) as usize;
        let after = request.after.map_or((0, 0), |a| (a.seq, a.idx));
        let mut hits = Vec::new();
        'records: for record in &inner.records {
            for (idx, event) in record.events.iter().enumerate() {
                let idx = idx as u16;
                let wanted = (record.seq, idx) > after
                    && request.event_type.as_deref().is_none_or(|t| t == event.type_name())
                    && request.entity.as_ref().is_none_or(|e| event.entity().as_ref() == Some(e));
                if wanted {
                    hits.push(QueryHit {
                        at: EventAddress { seq: record.seq, idx },
                        time_us: record.time_us,
                        event: event.clone(),
                    });
                    if hits.len() == limit {
                        break 'records;
                    }
                }
            }
        }
        let next_after = (hits.len() == limit).then(|| hits.last().map(|h| h.at)).flatten();
        Ok(QueryReply { hits, next_after })
    }

    async fn read(&self, request: ReadRequest) -> Result<ReadReply<AuditEntry>, RequestError> {
        let inner = lock(&self.inner);
        let head_seq = inner.records.len() as u64;
        let from = request.from_seq.max(1) as usize - 1;
        let records = inner.records.iter().skip(from).take(request.max_records as usize).cloned().collect();
        Ok(ReadReply { log: LogName::Audit, records, head_seq })
    }

    async fn append(&self, request: AppendRequest<AuditEntry>) -> Result<AppendReply, RequestError> {
        let mut inner = lock(&self.inner);
        inner.appends += 1;
        match inner.faults.pop_front() {
            Some(Fault::Lost) => Err(transport()),
            Some(Fault::Unacknowledged) => {
                Self::apply(&mut inner, request).map_err(RequestError::Remote)?;
                Err(transport())
            }
            None => Self::apply(&mut inner, request).map_err(RequestError::Remote),
        }
    }
}
