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
