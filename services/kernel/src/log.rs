//! What the kernel needs of storage's `kernel` log: appends (the sequencer's group commits),
//! reads and the head (recovery), snapshots. [`Bus`] asks the storage service; unit tests use
//! an in-memory log that can fail appends, before or after they land, and delay them.

use std::future::Future;

use toka_contract::Operation;
use toka_contract::api::storage::{
    AppendReply, AppendRequest, HeadReply, HeadRequest, ReadReply, ReadRequest, SnapshotGetReply, SnapshotGetRequest,
    SnapshotPutReply, SnapshotPutRequest,
};
use toka_contract::record::LogName;
use toka_contract::subject;
use toka_runtime::bus::{Bus, RequestError};

/// Storage's `kernel` log, as the kernel uses it.
pub trait KernelLog: Clone + Send + Sync + 'static {
    /// Appends records durably (the reply comes after the commit).
    fn append(
        &self,
        request: AppendRequest<Operation>,
    ) -> impl Future<Output = Result<AppendReply, RequestError>> + Send;
    /// A page of records.
    fn read(&self, request: ReadRequest) -> impl Future<Output = Result<ReadReply<Operation>, RequestError>> + Send;
    /// The log's head.
    fn head(&self) -> impl Future<Output = Result<HeadReply, RequestError>> + Send;
    /// A chunk of the newest complete snapshot at or before a sequence.
    fn snapshot_get(
        &self,
        request: SnapshotGetRequest,
    ) -> impl Future<Output = Result<SnapshotGetReply, RequestError>> + Send;
    /// Stores a chunk of a snapshot.
    fn snapshot_put(
        &self,
        request: SnapshotPutRequest,
    ) -> impl Future<Output = Result<SnapshotPutReply, RequestError>> + Send;
}

impl KernelLog for Bus {
    async fn append(&self, request: AppendRequest<Operation>) -> Result<AppendReply, RequestError> {
        self.request(subject::STORAGE_APPEND_KERNEL.subject, &request).await
    }

    async fn read(&self, request: ReadRequest) -> Result<ReadReply<Operation>, RequestError> {
        self.request(subject::STORAGE_READ.subject, &request).await
    }

    async fn head(&self) -> Result<HeadReply, RequestError> {
        self.request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Kernel }).await
    }

    async fn snapshot_get(&self, request: SnapshotGetRequest) -> Result<SnapshotGetReply, RequestError> {
        self.request(subject::STORAGE_SNAPSHOT_GET.subject, &request).await
    }

    async fn snapshot_put(&self, request: SnapshotPutRequest) -> Result<SnapshotPutReply, RequestError> {
        self.request(subject::STORAGE_SNAPSHOT_PUT.subject, &request).await
    }
}

#[cfg(test)]
pub(crate) mod memory {
    //! The `kernel` log in memory, answering as storage does.

    use std::collections::{BTreeMap, VecDeque};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use toka_contract::KernelRecord;
    use toka_contract::record::{Chain, Hash};
    use toka_contract::wire::{ErrorCode, WireError};

    use super::*;

    /// What an append meets.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(crate) enum Fault {
        /// Fails without writing (storage unreachable).
        Lost,
        /// Writes, then fails (the acknowledgement is lost).
        Unacknowledged,
    }

    #[derive(Debug, Default)]
    struct Snapshot {
        state_hash: Hash,
        chunks: u32,
        data: BTreeMap<u32, String>,
    }

    #[derive(Debug, Default)]
    struct Inner {
        records: Vec<KernelRecord>,
        snapshots: BTreeMap<u64, Snapshot>,
        faults: VecDeque<Fault>,
        /// The size of each append that landed, in records.
        batches: Vec<usize>,
        /// How long an append takes.
        latency: Duration,
        /// Appends under way now, and the most there ever were at once.
        in_flight: usize,
        most_in_flight: usize,
    }

    /// The log; clones share it.
    #[derive(Debug, Clone, Default)]
    pub(crate) struct MemoryLog {
        inner: Arc<Mutex<Inner>>,
    }

    fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
        m.lock().unwrap()
    }

    fn not_found(what: &str) -> RequestError {
        RequestError::Remote(WireError::new(ErrorCode::NotFound, what))
    }

    impl MemoryLog {
        pub(crate) fn records(&self) -> Vec<KernelRecord> {
            lock(&self.inner).records.clone()
        }

        /// The size of each append that landed.
        pub(crate) fn batches(&self) -> Vec<usize> {
            lock(&self.inner).batches.clone()
        }

        /// The next appends meet `faults`, in order.
        pub(crate) fn fail_next(&self, faults: &[Fault]) {
            lock(&self.inner).faults = faults.iter().copied().collect();
        }

        /// The most appends that were under way at once.
        pub(crate) fn most_in_flight(&self) -> usize {
            lock(&self.inner).most_in_flight
        }

        /// Every append takes `latency` (on Tokio's clock).
        pub(crate) fn set_latency(&self, latency: Duration) {
            lock(&self.inner).latency = latency;
        }

        /// The sequences of the complete snapshots.
        pub(crate) fn snapshots(&self) -> Vec<u64> {
            lock(&self.inner)
                .snapshots
                .iter()
                .filter(|(_, s)| s.data.len() as u32 == s.chunks)
                .map(|(seq, _)| *seq)
                .collect()
        }

        fn head_chain(inner: &Inner) -> Chain {
            inner.records.last().map_or(Chain::START, |r| Chain { seq: r.seq, hash: r.hash })
        }

        fn write(inner: &mut Inner, request: AppendRequest<Operation>) -> Result<AppendReply, RequestError> {
            let head = Self::head_chain(inner);
            let conflict = |why: &str| {
                RequestError::Remote(WireError::new(ErrorCode::Conflict, why).with_detail("next_seq", head.seq + 1))
            };
            let (Some(first), Some(last)) = (request.records.first(), request.records.last()) else {
                return Err(RequestError::Remote(WireError::new(ErrorCode::BadRequest, "no records")));
            };
            if first.seq != head.seq + 1 || first.prev_hash != head.hash {
                return Err(conflict("the batch does not continue the head"));
            }
            toka_contract::record::verify_chain(&request.records, head.seq, head.hash)
                .map_err(|b| RequestError::Remote(WireError::new(ErrorCode::BadRequest, b.to_string())))?;
            let reply =
                AppendReply { first_seq: first.seq, last_seq: last.seq, last_hash: last.hash, duplicate: false };
            inner.batches.push(request.records.len());
            inner.records.extend(request.records);
            Ok(reply)
        }
    }

    impl KernelLog for MemoryLog {
        async fn append(&self, request: AppendRequest<Operation>) -> Result<AppendReply, RequestError> {
            let latency = {
                let mut inner = lock(&self.inner);
                inner.in_flight += 1;
                inner.most_in_flight = inner.most_in_flight.max(inner.in_flight);
                inner.latency
            };
            tokio::time::sleep(latency).await;
            let mut inner = lock(&self.inner);
            inner.in_flight -= 1;
            let lost = || Err(RequestError::Timeout("toka.storage.v1.append.kernel".into()));
            match inner.faults.pop_front() {
                Some(Fault::Lost) => lost(),
                Some(Fault::Unacknowledged) => {
                    Self::write(&mut inner, request)?;
                    lost()
                }
                None => Self::write(&mut inner, request),
            }
        }

        async fn read(&self, request: ReadRequest) -> Result<ReadReply<Operation>, RequestError> {
            let inner = lock(&self.inner);
            let from = request.from_seq.max(1) as usize - 1;
            let records = inner.records.iter().skip(from).take(request.max_records as usize).cloned().collect();
            Ok(ReadReply { log: LogName::Kernel, records, head_seq: Self::head_chain(&inner).seq })
        }

        async fn head(&self) -> Result<HeadReply, RequestError> {
            let head = Self::head_chain(&lock(&self.inner));
            Ok(HeadReply { log: LogName::Kernel, seq: head.seq, hash: head.hash })
        }

        async fn snapshot_get(&self, request: SnapshotGetRequest) -> Result<SnapshotGetReply, RequestError> {
            let inner = lock(&self.inner);
            let at_or_before = request.at_or_before.unwrap_or(u64::MAX);
            let (seq, snapshot) = inner
                .snapshots
                .range(..=at_or_before)
                .rev()
                .find(|(_, s)| s.data.len() as u32 == s.chunks)
                .ok_or_else(|| not_found("no complete snapshot"))?;
            let data = snapshot.data.get(&request.chunk).ok_or_else(|| not_found("no such chunk"))?;
            Ok(SnapshotGetReply {
                seq: *seq,
                state_hash: snapshot.state_hash,
                chunk: request.chunk,
                chunks: snapshot.chunks,
                data: data.clone(),
            })
        }

        async fn snapshot_put(&self, request: SnapshotPutRequest) -> Result<SnapshotPutReply, RequestError> {
            let mut inner = lock(&self.inner);
            let snapshot = inner.snapshots.entry(request.seq).or_default();
            snapshot.state_hash = request.state_hash;
            snapshot.chunks = request.chunks;
            snapshot.data.insert(request.chunk, request.data);
            Ok(SnapshotPutReply { seq: request.seq, complete: snapshot.data.len() as u32 == snapshot.chunks })
        }
    }
}
