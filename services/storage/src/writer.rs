//! The WAL's own thread. A backend is synchronous and not shared; every request reaches it
//! through one bounded queue. Appends waiting in the queue are committed together, in one
//! durable transaction (group commit): the more callers append at once, the fewer fsyncs per
//! record. When the queue is full, callers are told to retry instead of piling up.

use std::future::Future;
use std::sync::Arc;

use toka_contract::record::LogName;
use tokio::sync::{mpsc, oneshot};

use crate::publish::Outbox;
use crate::wal::{Appended, Error, StoredRecord, Wal};

/// How many requests may wait for the WAL thread.
pub const QUEUE_DEPTH: usize = 4096;

/// The most appends committed in one transaction.
const MAX_GROUP: usize = 512;

type Call = Box<dyn FnOnce(&mut dyn Wal) + Send>;

/// An append waiting for the next commit: its records, its events ready to publish, and
/// where to send its result.
type PendingAppend = (LogName, Vec<StoredRecord>, Outbox, oneshot::Sender<Result<Appended, Error>>);

/// How many committed appends may wait for the publisher; beyond, it reads them back from the
/// WAL instead.
const OUTBOX_DEPTH: usize = 1024;

enum Command {
    Append(PendingAppend),
    Call(Call),
}

/// Why the WAL thread could not take a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Busy {
    /// The queue is full: retry shortly.
    #[error("the WAL queue is full")]
    Full,
    /// The WAL thread is gone (shutting down, or it failed).
    #[error("the WAL is closed")]
    Closed,
}

/// A handle to the WAL thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct WalHandle {
    tx: mpsc::Sender<Command>,
    committed: Arc<std::sync::Mutex<Option<mpsc::Receiver<Outbox>>>>,
    backend: &'static str,
}

impl WalHandle {
    /// Starts the WAL thread around `wal`.
    pub fn spawn(mut wal: Box<dyn Wal>) -> Result<(WalHandle, std::thread::JoinHandle<()>), std::io::Error> {
        let (tx, mut rx) = mpsc::channel::<Command>(QUEUE_DEPTH);
        let (outboxes, committed) = mpsc::channel::<Outbox>(OUTBOX_DEPTH);
        let backend = wal.backend();
        let thread = std::thread::Builder::new().name("toka-wal".into()).spawn(move || {
            let mut appends: Vec<PendingAppend> = Vec::new();
            let mut calls: Vec<Call> = Vec::new();
            while let Some(first) = rx.blocking_recv() {
                let mut next = Some(first);
                while let Some(command) = next.take() {
                    match command {
                        Command::Append(append) => appends.push(append),
                        Command::Call(call) => calls.push(call),
                    }
                    if appends.len() < MAX_GROUP {
                        next = rx.try_recv().ok();
                    }
                }
                if !appends.is_empty() {
                    let batches: Vec<(LogName, &[StoredRecord])> =
                        appends.iter().map(|(log, records, _, _)| (*log, records.as_slice())).collect();
                    let results = wal.append(&batches);
                    for ((_, _, outbox, reply), result) in appends.drain(..).zip(results) {
                        // Committed: its events go to the publisher from memory. If it is behind
                        // (the channel is full), it reads them back from the WAL.
                        if result.as_ref().is_ok_and(|a| !a.duplicate) {
                            let _ = outboxes.try_send(outbox);
                        }
                        let _ = reply.send(result);
                    }
                }
                for call in calls.drain(..) {
                    call(wal.as_mut());
                }
            }
        })?;
        let committed = Arc::new(std::sync::Mutex::new(Some(committed)));
        Ok((WalHandle { tx, committed, backend }, thread))
    }

    /// `memory`, `sqlite` or `fdb`.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The events of each commit, in commit order, for the one publisher (`None` once taken).
    pub fn take_committed(&self) -> Option<mpsc::Receiver<Outbox>> {
        self.committed.lock().ok()?.take()
    }

    /// Queues `records` for `log` now (so appends keep the order they were queued in) and
    /// returns a future that resolves once they are durable; `outbox`, their events ready to
    /// publish, goes to the publisher once they are.
    pub fn append(
        &self,
        log: LogName,
        records: Vec<StoredRecord>,
        outbox: Outbox,
    ) -> Result<impl Future<Output = Result<Result<Appended, Error>, Busy>> + use<>, Busy> {
        let (reply, result) = oneshot::channel();
        self.tx.try_send(Command::Append((log, records, outbox, reply))).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Busy::Full,
            mpsc::error::TrySendError::Closed(_) => Busy::Closed,
        })?;
        Ok(async move { result.await.map_err(|_| Busy::Closed) })
    }

    /// Runs `f` on the WAL thread, after the appends queued before it are committed.
    pub async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut dyn Wal) -> T + Send + 'static) -> Result<T, Busy> {
        let (reply, result) = oneshot::channel();
        let call: Call = Box::new(move |wal| {
            let _ = reply.send(f(wal));
        });
        self.tx.try_send(Command::Call(call)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Busy::Full,
            mpsc::error::TrySendError::Closed(_) => Busy::Closed,
        })?;
        result.await.map_err(|_| Busy::Closed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::sync::{Arc, Mutex};

    use toka_contract::record::Hash;

    use super::*;
    use crate::wal::conformance::chain;
    use crate::wal::memory::MemoryWal;
    use crate::wal::{Head, Hit, Query, SnapshotChunk};

    /// A WAL that reports each append's batches and holds the first append until released.
    struct Gated {
        inner: MemoryWal,
        appends: Arc<Mutex<Vec<usize>>>,
        entered: std_mpsc::Sender<()>,
        gate: Option<std_mpsc::Receiver<()>>,
    }

    impl Wal for Gated {
        fn backend(&self) -> &'static str {
            "gated"
        }
        fn append(&mut self, batches: &[(LogName, &[StoredRecord])]) -> Vec<Result<Appended, Error>> {
            let _ = self.entered.send(());
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            self.appends.lock().unwrap().push(batches.len());
            self.inner.append(batches)
        }
        fn read(&self, log: LogName, from: u64, n: usize, bytes: usize) -> Result<Vec<StoredRecord>, Error> {
            self.inner.read(log, from, n, bytes)
        }
        fn head(&self, log: LogName) -> Result<Head, Error> {
            self.inner.head(log)
        }
        fn query(&self, log: LogName, query: &Query) -> Result<Vec<Hit>, Error> {
            self.inner.query(log, query)
        }
        fn put_snapshot_chunk(&mut self, log: LogName, chunk: SnapshotChunk) -> Result<bool, Error> {
            self.inner.put_snapshot_chunk(log, chunk)
        }
        fn snapshot_chunk(&self, log: LogName, at: Option<u64>, chunk: u32) -> Result<Option<SnapshotChunk>, Error> {
            self.inner.snapshot_chunk(log, at, chunk)
        }
        fn compact(&mut self, log: LogName, through_seq: u64) -> Result<u64, Error> {
            self.inner.compact(log, through_seq)
        }
        fn published(&self, log: LogName) -> Result<u64, Error> {
            self.inner.published(log)
        }
        fn set_published(&mut self, log: LogName, seq: u64) -> Result<(), Error> {
            self.inner.set_published(log, seq)
        }
    }

    struct Started {
        handle: WalHandle,
        appends: Arc<Mutex<Vec<usize>>>,
        entered: std_mpsc::Receiver<()>,
        release: std_mpsc::Sender<()>,
    }

    fn start() -> Started {
        let (entered_tx, entered) = std_mpsc::channel();
        let (release, gate) = std_mpsc::channel();
        let appends = Arc::new(Mutex::new(Vec::new()));
        let wal = Gated { inner: MemoryWal::new(), appends: appends.clone(), entered: entered_tx, gate: Some(gate) };
        let (handle, _thread) = WalHandle::spawn(Box::new(wal)).unwrap();
        Started { handle, appends, entered, release }
    }

    fn outbox(records: &[StoredRecord]) -> Outbox {
        Outbox { log: LogName::Kernel, records: records.iter().map(|r| (r.seq, r.time_us, Vec::new())).collect() }
    }

    #[tokio::test]
    async fn appends_waiting_for_the_wal_commit_together_in_the_order_they_were_queued() {
        let wal = start();
        let records = chain((0, Hash::ZERO), 6, "a");
        let first = wal.handle.append(LogName::Kernel, records[..1].to_vec(), outbox(&records[..1])).unwrap();
        wal.entered.recv().unwrap();
        // While the first append commits, five more queue up behind it.
        let rest: Vec<_> = (1..6)
            .map(|i| wal.handle.append(LogName::Kernel, records[i..=i].to_vec(), outbox(&records[i..=i])).unwrap())
            .collect();
        wal.release.send(()).unwrap();
        assert_eq!(first.await.unwrap().unwrap().last_seq, 1);
        for (i, pending) in rest.into_iter().enumerate() {
            assert_eq!(pending.await.unwrap().unwrap().last_seq, i as u64 + 2);
        }
        assert_eq!(*wal.appends.lock().unwrap(), [1, 5], "one commit for the first, one for the five");
        // The publisher gets each committed append's events, in commit order.
        let mut committed = wal.handle.take_committed().unwrap();
        let order: Vec<u64> = (0..6).map(|_| committed.try_recv().unwrap().records[0].0).collect();
        assert_eq!(order, [1, 2, 3, 4, 5, 6]);
        assert!(wal.handle.take_committed().is_none(), "one publisher only");
    }

    #[tokio::test]
    async fn a_full_queue_says_so_instead_of_growing() {
        let wal = start();
        let records = chain((0, Hash::ZERO), 1, "a");
        let first = wal.handle.append(LogName::Kernel, records.clone(), outbox(&records)).unwrap();
        wal.entered.recv().unwrap();
        let queued: Vec<_> =
            (0..QUEUE_DEPTH).map(|_| wal.handle.append(LogName::Kernel, records.clone(), outbox(&records))).collect();
        assert!(queued.iter().all(Result::is_ok), "the queue holds {QUEUE_DEPTH}");
        let refused = wal.handle.append(LogName::Kernel, records.clone(), outbox(&records));
        assert_eq!(refused.err(), Some(Busy::Full));
        assert_eq!(wal.handle.call(|w| w.backend()).await.err(), Some(Busy::Full), "calls too");
        wal.release.send(()).unwrap();
        assert!(first.await.unwrap().is_ok());
        // The same batch again is an identical retry: acknowledged as a duplicate.
        for pending in queued.into_iter().flatten() {
            assert!(pending.await.unwrap().unwrap().duplicate);
        }
    }
}
