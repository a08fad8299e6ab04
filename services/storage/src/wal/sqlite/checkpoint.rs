//! Checkpoints beside the writer: committed WAL frames copied into the database file.

use std::path::Path;

use rusqlite::Connection;

use super::{Error, io};

/// Copies committed WAL frames into the database file from a thread and connection of its own
/// (a passive checkpoint never blocks the writer), so appends do not pay for checkpoints.
/// Durability does not depend on it: a commit is durable once its WAL frames are fsynced.
#[derive(Debug)]
pub(super) struct Checkpointer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Often enough that a pass usually finds the whole WAL copied between two commits: the
    /// next commit then starts the WAL file over instead of growing it without end under
    /// steady load (which also made every fsync update the file's size).
    const INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

    pub(super) fn start(path: &Path) -> Result<Checkpointer, Error> {
        use std::sync::atomic::Ordering;
        let conn = Connection::open(path).map_err(io)?;
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA busy_timeout=1000;").map_err(io)?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("toka-wal-checkpoint".into())
            .spawn(move || {
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(Self::INTERVAL);
                    if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                    }
                }
                // A last full pass, so a clean stop leaves a small WAL behind.
                let _ = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()));
            })
            .map_err(io)?;
        Ok(Checkpointer { stop, thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
