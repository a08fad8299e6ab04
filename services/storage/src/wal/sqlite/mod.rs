//! The SQLite backend, the embedded default.
//!
//! One database file per data directory (`wal.sqlite3`), in WAL journal mode with
//! `synchronous=FULL`: a commit returns only after its frames are fsynced, so an acknowledged
//! append survives a crash or power loss. Many batches share one transaction (group commit);
//! each batch has a savepoint of its own, so a conflicting batch does not fail the others.
//! Checkpoints run beside the writer, on their own thread and connection. A lock
//! file (`LOCK`, held for the process's life) keeps a second process off the same directory.
//!
//! Events are indexed behind the log, not in every commit: a record keeps its events' index
//! keys in its own row, and the `events` table (with its indexes by entity and by type) is
//! brought up to date for [`INDEX_EVERY`] records at once, inside the commit that reaches that
//! many. Queries add the few records not yet indexed from memory, so they see every committed
//! event. Writing events and their indexes costs up to a fifth of storage's CPU under load;
//! doing it 256 records at a time instead of in every commit saves about 8 % of storage's CPU
//! and a third of the bytes it writes (README, "Measured").
//!
//! A data directory on a read-only mount is opened read-only: reads, queries and verification
//! still work, and every write is refused with an error that says why.
//!
//! - `schema`: the tables, and bringing an older layout up to date.
//! - `checkpoint`: the checkpoint thread.
//! - `index`: events indexed behind the log, and queries over them.
//! - `snapshot`: snapshot chunks stored and served.

mod checkpoint;
mod index;
mod schema;
mod snapshot;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension as _, params};
use toka_contract::record::{Hash, LogName};

use self::checkpoint::Checkpointer;
pub use self::index::INDEX_EVERY;
use self::index::{Unindexed, encode_keys};
use super::{Appended, Error, Head, Hit, Query, SnapshotChunk, StoredRecord, Wal, compaction_limit, plan_append};

fn io(e: impl std::fmt::Display) -> Error {
    Error::Io(e.to_string())
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, Error> {
    <[u8; 32]>::try_from(bytes).map(Hash).map_err(|_| Error::Corrupt("a stored hash is not 32 bytes".into()))
}

fn seq_i64(seq: u64) -> Result<i64, Error> {
    i64::try_from(seq).map_err(|_| Error::Invalid(format!("sequence {seq} is out of range")))
}

/// The SQLite WAL of one data directory.
#[derive(Debug)]
pub struct SqliteWal {
    conn: Connection,
    /// Publish markers not yet written: they ride along with the next append's commit (see
    /// [`Wal::set_published`]), or are written on drop.
    unsaved_marks: BTreeMap<LogName, u64>,
    /// Each log's head as of the last commit, so an append does not query it (this process is
    /// the only writer); dropped whenever a transaction fails or compaction moves it.
    heads: BTreeMap<LogName, Head>,
    /// Committed records not yet in the `events` table, in commit order.
    unindexed: Vec<Unindexed>,
    dir: PathBuf,
    read_only: bool,
    _checkpointer: Option<Checkpointer>,
    _lock: File,
}

impl Drop for SqliteWal {
    fn drop(&mut self) {
        if self.unsaved_marks.is_empty() || self.read_only {
            return;
        }
        if let Err(e) = Self::save_marks(&self.conn, &self.unsaved_marks) {
            tracing::warn!(error = %e, "publish markers not saved; events will be published again on start");
        }
    }
}

impl SqliteWal {
    /// Opens (creating if needed) the WAL in `dir`. Fails fast if another process holds it.
    pub fn open(dir: &Path) -> Result<SqliteWal, Error> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Io(format!("{}: {e}", dir.display())))?;
        let lock_path = dir.join("LOCK");
        let (lock, read_only) = match File::options().create(true).truncate(false).write(true).open(&lock_path) {
            Ok(lock) => (lock, false),
            Err(e) if e.kind() == std::io::ErrorKind::ReadOnlyFilesystem => {
                let lock = File::open(&lock_path)
                    .map_err(|e| Error::Io(format!("{} (read-only): {e}", lock_path.display())))?;
                (lock, true)
            }
            Err(e) => return Err(Error::Io(format!("{}: {e}", lock_path.display()))),
        };
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Io(format!(
                    "{} is in use by another toka-storage process (one process per data directory)",
                    dir.display()
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::Io(format!("{}: {e}", lock_path.display()))),
        }
        let path = dir.join("wal.sqlite3");
        let (conn, checkpointer) = if read_only {
            // SQLite cannot take its WAL locks on a read-only file system; with no WAL frames
            // left to replay, the database file alone is the whole log and opens immutable. A
            // non-empty WAL file holds committed data only a writable mount can recover.
            let frames = std::fs::metadata(dir.join("wal.sqlite3-wal")).map(|m| m.len()).unwrap_or(0);
            if frames > 0 {
                return Err(Error::Io(format!(
                    "{} is read-only and its WAL holds {frames} bytes not yet checkpointed; mount it read-write to recover them",
                    dir.display()
                )));
            }
            let uri = format!("file:{}?immutable=1", path.display());
            let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                | rusqlite::OpenFlags::SQLITE_OPEN_URI
                | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
            let conn = Connection::open_with_flags(uri, flags).map_err(io)?;
            tracing::warn!(dir = %dir.display(), "data directory is read-only: serving reads, refusing writes");
            (conn, None)
        } else {
            let conn = Connection::open(&path).map_err(io)?;
            let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(io)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(Error::Io(format!("journal_mode is {mode}, not wal")));
            }
            conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=0; PRAGMA temp_store=MEMORY; PRAGMA journal_size_limit=67108864;").map_err(io)?;
            conn.execute_batch(schema::SCHEMA).map_err(io)?;
            schema::migrate(&conn)?;
            let checkpointer = Checkpointer::start(&path)?;
            (conn, Some(checkpointer))
        };
        let unindexed = index::unindexed_in(&conn)?;
        let wal = SqliteWal {
            conn,
            unsaved_marks: BTreeMap::new(),
            heads: BTreeMap::new(),
            unindexed,
            dir: dir.to_owned(),
            read_only,
            _checkpointer: checkpointer,
            _lock: lock,
        };
        if read_only {
            return Ok(wal);
        }
        if wal.synchronous()? != 2 {
            return Err(Error::Io("synchronous is not FULL".into()));
        }
        Ok(wal)
    }

    /// The `synchronous` pragma in force (2 = FULL: every commit is fsynced).
    pub fn synchronous(&self) -> Result<i64, Error> {
        self.conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).map_err(io)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the directory is read-only (writes are refused).
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self) -> Result<(), Error> {
        if self.read_only {
            return Err(Error::Io(format!("{} is on a read-only file system; writes are refused", self.dir.display())));
        }
        Ok(())
    }

    fn save_marks(conn: &Connection, marks: &BTreeMap<LogName, u64>) -> Result<(), Error> {
        let mut upsert = conn
            .prepare_cached(
                "INSERT INTO logs (log, published_seq) VALUES (?1, ?2) ON CONFLICT (log) DO UPDATE SET published_seq = ?2",
            )
            .map_err(io)?;
        for (log, seq) in marks {
            upsert.execute(params![log.as_str(), seq_i64(*seq)?]).map_err(io)?;
        }
        Ok(())
    }

    fn head_in(conn: &Connection, log: LogName) -> Result<Head, Error> {
        let last: Option<(i64, Vec<u8>)> = conn
            .prepare_cached("SELECT seq, hash FROM records WHERE log = ?1 ORDER BY seq DESC LIMIT 1")
            .and_then(|mut s| s.query_row([log.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(io)?;
        let compacted: Option<(i64, Option<Vec<u8>>)> = conn
            .prepare_cached("SELECT compacted_seq, compacted_hash FROM logs WHERE log = ?1")
            .and_then(|mut s| s.query_row([log.as_str()], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(io)?;
        let (compacted_seq, compacted_hash) = match compacted {
            Some((seq, Some(hash))) if seq > 0 => (seq as u64, Some(hash_of(hash)?)),
            _ => (0, None),
        };
        Ok(match (last, compacted_hash) {
            (Some((seq, hash)), _) => Head { seq: seq as u64, hash: hash_of(hash)?, first_seq: compacted_seq + 1 },
            (None, Some(hash)) => Head { seq: compacted_seq, hash, first_seq: compacted_seq + 1 },
            (None, None) => Head::EMPTY,
        })
    }

    /// Appends `batch` after `head` (the log's head, or `None` to read it); returns the
    /// outcome and the new head.
    fn append_one(
        tx: &Connection,
        log: LogName,
        batch: &[StoredRecord],
        head: Option<Head>,
        unindexed: &mut Vec<Unindexed>,
    ) -> Result<(Appended, Head), Error> {
        let head = match head {
            Some(head) => head,
            None => Self::head_in(tx, log)?,
        };
        let committed = plan_append(head, batch, |seq| {
            let hash: Option<Vec<u8>> = tx
                .prepare_cached("SELECT hash FROM records WHERE log = ?1 AND seq = ?2")
                .and_then(|mut s| {
                    s.query_row(params![log.as_str(), seq_i64(seq).unwrap_or(i64::MAX)], |r| r.get(0)).optional()
                })
                .map_err(io)?;
            hash.map(hash_of).transpose()
        })?;
        let mut insert = tx
            .prepare_cached(
                "INSERT INTO records (log, seq, hash, prev_hash, time_us, body, event_keys) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .map_err(io)?;
        for r in &batch[committed..] {
            let seq = seq_i64(r.seq)?;
            let time = seq_i64(r.time_us)?;
            let keys = encode_keys(&r.events)?;
            insert
                .execute(params![log.as_str(), seq, &r.hash.0[..], &r.prev_hash.0[..], time, &r.body, keys])
                .map_err(io)?;
            unindexed.push(Unindexed { log, seq: r.seq, time_us: r.time_us, events: r.events.clone() });
        }
        let (first, last) = (&batch[0], &batch[batch.len() - 1]);
        let appended = Appended {
            first_seq: first.seq,
            last_seq: last.seq,
            last_hash: last.hash,
            duplicate: committed == batch.len(),
        };
        let head = if last.seq > head.seq { Head { seq: last.seq, hash: last.hash, ..head } } else { head };
        Ok((appended, head))
    }
}

impl Wal for SqliteWal {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    fn append(&mut self, batches: &[(LogName, &[StoredRecord])]) -> Vec<Result<Appended, Error>> {
        if let Err(e) = self.writable() {
            return batches.iter().map(|_| Err(e.clone())).collect();
        }
        let tx = match self.conn.transaction() {
            Ok(tx) => tx,
            Err(e) => return batches.iter().map(|_| Err(io(&e))).collect(),
        };
        let mut results = Vec::with_capacity(batches.len());
        let mut heads = self.heads.clone();
        let mut unindexed = Vec::new();
        for (log, batch) in batches {
            let result = (|| {
                let run = |sql: &str| tx.prepare_cached(sql).and_then(|mut s| s.execute([])).map_err(io);
                run("SAVEPOINT batch")?;
                let mut added = Vec::new();
                match Self::append_one(&tx, *log, batch, heads.get(log).copied(), &mut added) {
                    Ok((a, head)) => {
                        run("RELEASE batch")?;
                        heads.insert(*log, head);
                        unindexed.append(&mut added);
                        Ok(a)
                    }
                    Err(e) => {
                        run("ROLLBACK TO batch")?;
                        run("RELEASE batch")?;
                        Err(e)
                    }
                }
            })();
            results.push(result);
        }
        // Markers are only a hint: one that does not save waits for the next commit.
        let marks_saved = Self::save_marks(&tx, &self.unsaved_marks).is_ok();
        // The index catches up in the commit that brings INDEX_EVERY records to wait for it:
        // if it fails, the records still commit and wait for the next one.
        let indexed = self.unindexed.len() + unindexed.len() >= INDEX_EVERY
            && tx
                .execute_batch("SAVEPOINT idx")
                .map_err(io)
                .and_then(|()| index::index(&tx, &self.unindexed))
                .and_then(|()| index::index(&tx, &unindexed))
                .and_then(|()| tx.execute_batch("RELEASE idx").map_err(io))
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "indexing events failed; will retry with the next commit");
                    let _ = tx.execute_batch("ROLLBACK TO idx; RELEASE idx");
                })
                .is_ok();
        // The commit is the durability point: with synchronous=FULL it returns after fsync.
        if let Err(e) = tx.commit() {
            self.heads.clear();
            let e = io(e);
            return results.into_iter().map(|r| r.and(Err(e.clone()))).collect();
        }
        // A refused batch leaves the cache to be read again: only an all-good commit is
        // certain to have moved the heads exactly as planned.
        if results.iter().all(Result::is_ok) {
            self.heads = heads;
        } else {
            self.heads.clear();
        }
        if marks_saved {
            self.unsaved_marks.clear();
        }
        if indexed {
            self.unindexed.clear();
        } else {
            self.unindexed.append(&mut unindexed);
        }
        results
    }

    fn read(
        &self,
        log: LogName,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, hash, prev_hash, time_us, body FROM records WHERE log = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3")
            .map_err(io)?;
        let mut rows = stmt.query(params![log.as_str(), seq_i64(from_seq)?, max_records as i64]).map_err(io)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(row) = rows.next().map_err(io)? {
            let body: Vec<u8> = row.get(4).map_err(io)?;
            if !out.is_empty() && bytes + body.len() > max_bytes {
                break;
            }
            bytes += body.len();
            out.push(StoredRecord {
                seq: row.get::<_, i64>(0).map_err(io)? as u64,
                hash: hash_of(row.get(1).map_err(io)?)?,
                prev_hash: hash_of(row.get(2).map_err(io)?)?,
                time_us: row.get::<_, i64>(3).map_err(io)? as u64,
                body,
                events: Vec::new(),
            });
        }
        Ok(out)
    }

    fn head(&self, log: LogName) -> Result<Head, Error> {
        match self.heads.get(&log) {
            Some(head) => Ok(*head),
            None => Self::head_in(&self.conn, log),
        }
    }

    fn query(&self, log: LogName, q: &Query) -> Result<Vec<Hit>, Error> {
        index::query(&self.conn, &self.unindexed, log, q)
    }

    fn put_snapshot_chunk(&mut self, log: LogName, c: SnapshotChunk) -> Result<bool, Error> {
        self.writable()?;
        let head = self.head(log)?;
        snapshot::put(&mut self.conn, log, head, c)
    }

    fn snapshot_chunk(
        &self,
        log: LogName,
        at_or_before: Option<u64>,
        chunk: u32,
    ) -> Result<Option<SnapshotChunk>, Error> {
        snapshot::get(&self.conn, log, at_or_before, chunk)
    }

    fn compact(&mut self, log: LogName, through_seq: u64) -> Result<u64, Error> {
        self.writable()?;
        // The head's oldest kept sequence moves (or, on failure, is unknown): read it again.
        self.heads.remove(&log);
        let head = self.head(log)?;
        let newest: Option<i64> = self
            .conn
            .query_row(
                "SELECT max(s.seq) FROM snapshots s WHERE s.log = ?1
                   AND (SELECT count(*) FROM snapshot_chunks c WHERE c.log = s.log AND c.seq = s.seq) = s.chunks",
                [log.as_str()],
                |r| r.get(0),
            )
            .map_err(io)?;
        compaction_limit(newest.map(|s| s as u64), head, through_seq)?;
        let tx = self.conn.transaction().map_err(io)?;
        let through = seq_i64(through_seq)?;
        let last: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT seq, hash FROM records WHERE log = ?1 AND seq <= ?2 ORDER BY seq DESC LIMIT 1",
                params![log.as_str(), through],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(io)?;
        let removed = tx
            .execute("DELETE FROM records WHERE log = ?1 AND seq <= ?2", params![log.as_str(), through])
            .map_err(io)?;
        tx.execute("DELETE FROM events WHERE log = ?1 AND seq <= ?2", params![log.as_str(), through]).map_err(io)?;
        if let Some((seq, hash)) = last {
            tx.execute(
                "INSERT INTO logs (log, compacted_seq, compacted_hash) VALUES (?1, ?2, ?3)
                 ON CONFLICT (log) DO UPDATE SET compacted_seq = ?2, compacted_hash = ?3",
                params![log.as_str(), seq, hash],
            )
            .map_err(io)?;
            // What is compacted is never indexed: the index resumes after it.
            tx.execute("UPDATE logs SET indexed_seq = max(indexed_seq, ?2) WHERE log = ?1", params![log.as_str(), seq])
                .map_err(io)?;
        }
        tx.commit().map_err(io)?;
        self.unindexed.retain(|r| r.log != log || r.seq > through_seq);
        Ok(removed as u64)
    }

    fn published(&self, log: LogName) -> Result<u64, Error> {
        if let Some(seq) = self.unsaved_marks.get(&log) {
            return Ok(*seq);
        }
        let seq: Option<i64> = self
            .conn
            .query_row("SELECT published_seq FROM logs WHERE log = ?1", [log.as_str()], |r| r.get(0))
            .optional()
            .map_err(io)?;
        Ok(seq.unwrap_or(0) as u64)
    }

    /// Kept in memory and written with the next append's commit (or on drop), not with an
    /// fsync of its own: the marker only spares work after a restart (events published again
    /// are dropped by their message id), so appends pay one fsync per commit, not two.
    fn set_published(&mut self, log: LogName, seq: u64) -> Result<(), Error> {
        self.writable()?;
        self.unsaved_marks.insert(log, seq);
        Ok(())
    }
}
