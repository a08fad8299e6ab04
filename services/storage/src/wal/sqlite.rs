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

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension as _, params};
use toka_contract::record::{Hash, LogName};

use super::{
    Appended, Error, EventKey, Head, Hit, KEEP_SNAPSHOTS, Query, SnapshotChunk, StoredRecord, Wal, check_chunk,
    compaction_limit, plan_append,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    log TEXT NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL, prev_hash BLOB NOT NULL,
    time_us INTEGER NOT NULL, body BLOB NOT NULL, event_keys BLOB,
    PRIMARY KEY (log, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    log TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, type TEXT NOT NULL,
    entity TEXT, time_us INTEGER NOT NULL,
    PRIMARY KEY (log, seq, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_entity ON events (log, entity, seq, idx) WHERE entity IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_type ON events (log, type, seq, idx);
CREATE TABLE IF NOT EXISTS logs (
    log TEXT PRIMARY KEY, compacted_seq INTEGER NOT NULL DEFAULT 0,
    compacted_hash BLOB, published_seq INTEGER NOT NULL DEFAULT 0,
    indexed_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS snapshots (
    log TEXT NOT NULL, seq INTEGER NOT NULL, state_hash BLOB NOT NULL, chunks INTEGER NOT NULL,
    PRIMARY KEY (log, seq));
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    log TEXT NOT NULL, seq INTEGER NOT NULL, chunk INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (log, seq, chunk)) WITHOUT ROWID;
";

fn io(e: impl std::fmt::Display) -> Error {
    Error::Io(e.to_string())
}

fn hash_of(bytes: Vec<u8>) -> Result<Hash, Error> {
    <[u8; 32]>::try_from(bytes).map(Hash).map_err(|_| Error::Corrupt("a stored hash is not 32 bytes".into()))
}

fn seq_i64(seq: u64) -> Result<i64, Error> {
    i64::try_from(seq).map_err(|_| Error::Invalid(format!("sequence {seq} is out of range")))
}

/// How many committed records may wait to be indexed; the commit that reaches this many
/// indexes them all.
pub const INDEX_EVERY: usize = 256;

/// A committed record whose events are not in the `events` table yet.
#[derive(Debug, Clone)]
struct Unindexed {
    log: LogName,
    seq: u64,
    time_us: u64,
    events: Vec<EventKey>,
}

/// A record's index keys as kept in its row: `[[type, entity or null], ...]`.
fn encode_keys(events: &[EventKey]) -> Result<Vec<u8>, Error> {
    let pairs: Vec<(&str, Option<&str>)> =
        events.iter().map(|k| (k.event_type.as_str(), k.entity.as_deref())).collect();
    serde_json::to_vec(&pairs).map_err(io)
}

fn decode_keys(seq: i64, bytes: &[u8]) -> Result<Vec<EventKey>, Error> {
    let pairs: Vec<(String, Option<String>)> = serde_json::from_slice(bytes)
        .map_err(|e| Error::Corrupt(format!("record {seq}: index keys do not decode: {e}")))?;
    Ok(pairs.into_iter().map(|(event_type, entity)| EventKey { event_type, entity }).collect())
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

/// Copies committed WAL frames into the database file from a thread and connection of its own
/// (a passive checkpoint never blocks the writer), so appends do not pay for checkpoints.
/// Durability does not depend on it: a commit is durable once its WAL frames are fsynced.
#[derive(Debug)]
struct Checkpointer {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// Often enough that a pass usually finds the whole WAL copied between two commits: the
    /// next commit then starts the WAL file over instead of growing it without end under
    /// steady load (which also made every fsync update the file's size).
    const INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

    fn start(path: &Path) -> Result<Checkpointer, Error> {
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
        if read_only {
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
            let unindexed = Self::unindexed_in(&conn)?;
            return Ok(SqliteWal {
                conn,
                unsaved_marks: BTreeMap::new(),
                heads: BTreeMap::new(),
                unindexed,
                dir: dir.to_owned(),
                read_only,
                _checkpointer: None,
                _lock: lock,
            });
        }
        let conn = Connection::open(&path).map_err(io)?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)).map_err(io)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::Io(format!("journal_mode is {mode}, not wal")));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=OFF; PRAGMA cache_size=-65536; PRAGMA wal_autocheckpoint=0; PRAGMA temp_store=MEMORY; PRAGMA journal_size_limit=67108864;").map_err(io)?;
        conn.execute_batch(SCHEMA).map_err(io)?;
        Self::migrate(&conn)?;
        let unindexed = Self::unindexed_in(&conn)?;
        let checkpointer = Some(Checkpointer::start(&path)?);
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

    /// Brings a database written before events were indexed behind the log up to this
    /// layout: every record it holds is indexed already.
    fn migrate(conn: &Connection) -> Result<(), Error> {
        let has = |table: &str, column: &str| -> Result<bool, Error> {
            let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})")).map_err(io)?;
            let names = stmt.query_map([], |r| r.get::<_, String>(1)).map_err(io)?;
            for name in names {
                if name.map_err(io)? == column {
                    return Ok(true);
                }
            }
            Ok(false)
        };
        if !has("records", "event_keys")? {
            conn.execute_batch("ALTER TABLE records ADD COLUMN event_keys BLOB").map_err(io)?;
        }
        if !has("logs", "indexed_seq")? {
            conn.execute_batch(
                "BEGIN;
                 ALTER TABLE logs ADD COLUMN indexed_seq INTEGER NOT NULL DEFAULT 0;
                 INSERT OR IGNORE INTO logs (log) SELECT DISTINCT log FROM records;
                 UPDATE logs SET indexed_seq = coalesce((SELECT max(seq) FROM records r WHERE r.log = logs.log), 0);
                 COMMIT;",
            )
            .map_err(io)?;
        }
        Ok(())
    }

    /// The records committed after each log's indexed sequence, with their index keys.
    fn unindexed_in(conn: &Connection) -> Result<Vec<Unindexed>, Error> {
        let mut out = Vec::new();
        for log in LogName::ALL {
            // A database from before this layout has no `indexed_seq`: all of it is indexed.
            let indexed: i64 = match conn
                .query_row("SELECT indexed_seq FROM logs WHERE log = ?1", [log.as_str()], |r| r.get(0))
                .optional()
            {
                Ok(seq) => seq.unwrap_or(0),
                Err(_) => continue,
            };
            let mut stmt = conn
                .prepare("SELECT seq, time_us, event_keys FROM records WHERE log = ?1 AND seq > ?2 ORDER BY seq")
                .map_err(io)?;
            let mut rows = stmt.query(params![log.as_str(), indexed]).map_err(io)?;
            while let Some(row) = rows.next().map_err(io)? {
                let seq: i64 = row.get(0).map_err(io)?;
                let keys: Option<Vec<u8>> = row.get(2).map_err(io)?;
                out.push(Unindexed {
                    log,
                    seq: seq as u64,
                    time_us: row.get::<_, i64>(1).map_err(io)? as u64,
                    events: keys.map(|k| decode_keys(seq, &k)).transpose()?.unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    /// Writes the events of `records` into the `events` table and moves each log's indexed
    /// sequence past them, in the caller's transaction.
    fn index(conn: &Connection, records: &[Unindexed]) -> Result<(), Error> {
        let mut insert = conn
            .prepare_cached(
                "INSERT OR IGNORE INTO events (log, seq, idx, type, entity, time_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .map_err(io)?;
        let mut last = BTreeMap::new();
        for r in records {
            let (seq, time) = (seq_i64(r.seq)?, seq_i64(r.time_us)?);
            for (idx, key) in r.events.iter().enumerate() {
                insert
                    .execute(params![r.log.as_str(), seq, idx as i64, key.event_type, key.entity, time])
                    .map_err(io)?;
            }
            last.insert(r.log, seq);
        }
        let mut mark = conn
            .prepare_cached(
                "INSERT INTO logs (log, indexed_seq) VALUES (?1, ?2) ON CONFLICT (log) DO UPDATE SET indexed_seq = ?2",
            )
            .map_err(io)?;
        for (log, seq) in last {
            mark.execute(params![log.as_str(), seq]).map_err(io)?;
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
                .and_then(|()| Self::index(&tx, &self.unindexed))
                .and_then(|()| Self::index(&tx, &unindexed))
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
        let (after_seq, after_idx) = q.after.map_or((0, -1), |(s, i)| (seq_i64(s).unwrap_or(i64::MAX), i64::from(i)));
        // Only the filters given go into the statement, so the planner can seek on the entity
        // or type index (a `?2 IS NULL OR entity = ?2` form makes it scan). One cached
        // statement per shape; unused parameter numbers bind nothing.
        let mut sql = String::from("SELECT seq, idx, time_us FROM events WHERE log = ?1");
        for (given, term) in [
            (q.entity.is_some(), " AND entity = ?2"),
            (q.event_type.is_some(), " AND type = ?3"),
            (q.from_time_us.is_some(), " AND time_us >= ?4"),
            (q.to_time_us.is_some(), " AND time_us < ?5"),
        ] {
            if given {
                sql.push_str(term);
            }
        }
        sql.push_str(" AND (seq > ?6 OR (seq = ?6 AND idx > ?7)) ORDER BY seq, idx LIMIT ?8");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(io)?;
        let from = q.from_time_us.map(seq_i64).transpose()?;
        let to = q.to_time_us.map(seq_i64).transpose()?;
        let rows = stmt
            .query_map(
                params![log.as_str(), q.entity, q.event_type, from, to, after_seq, after_idx, q.limit as i64],
                |r| {
                    Ok(Hit {
                        seq: r.get::<_, i64>(0)? as u64,
                        idx: r.get::<_, i64>(1)? as u16,
                        time_us: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .map_err(io)?;
        let mut hits = rows.collect::<Result<Vec<_>, _>>().map_err(io)?;
        // Records not indexed yet all follow the indexed ones: their hits come after.
        let after = q.after.map(|(s, i)| (s, i64::from(i))).unwrap_or((0, -1));
        for r in self.unindexed.iter().filter(|r| r.log == log) {
            if hits.len() >= q.limit {
                break;
            }
            let in_time = q.from_time_us.is_none_or(|t| r.time_us >= t) && q.to_time_us.is_none_or(|t| r.time_us < t);
            for (idx, key) in r.events.iter().enumerate() {
                let matches = in_time
                    && (r.seq, idx as i64) > after
                    && q.entity.as_ref().is_none_or(|e| key.entity.as_ref() == Some(e))
                    && q.event_type.as_ref().is_none_or(|t| &key.event_type == t);
                if matches && hits.len() < q.limit {
                    hits.push(Hit { seq: r.seq, idx: idx as u16, time_us: r.time_us });
                }
            }
        }
        Ok(hits)
    }

    fn put_snapshot_chunk(&mut self, log: LogName, c: SnapshotChunk) -> Result<bool, Error> {
        self.writable()?;
        check_chunk(&c, self.head(log)?)?;
        let tx = self.conn.transaction().map_err(io)?;
        let seq = seq_i64(c.seq)?;
        let existing: Option<(Vec<u8>, i64)> = tx
            .query_row(
                "SELECT state_hash, chunks FROM snapshots WHERE log = ?1 AND seq = ?2",
                params![log.as_str(), seq],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(io)?;
        match existing {
            Some((hash, chunks)) if hash != c.state_hash.0 || chunks != i64::from(c.chunks) => {
                return Err(Error::Invalid(format!(
                    "snapshot at {} was started with another hash or chunk count",
                    c.seq
                )));
            }
            Some(_) => {}
            None => {
                tx.execute(
                    "INSERT INTO snapshots (log, seq, state_hash, chunks) VALUES (?1, ?2, ?3, ?4)",
                    params![log.as_str(), seq, &c.state_hash.0[..], c.chunks],
                )
                .map_err(io)?;
            }
        }
        tx.execute(
            "INSERT OR REPLACE INTO snapshot_chunks (log, seq, chunk, data) VALUES (?1, ?2, ?3, ?4)",
            params![log.as_str(), seq, c.chunk, c.data],
        )
        .map_err(io)?;
        let have: i64 = tx
            .query_row(
                "SELECT count(*) FROM snapshot_chunks WHERE log = ?1 AND seq = ?2",
                params![log.as_str(), seq],
                |r| r.get(0),
            )
            .map_err(io)?;
        let complete = have == i64::from(c.chunks);
        if complete {
            let oldest_kept: Option<i64> = tx
                .query_row(
                    "SELECT s.seq FROM snapshots s WHERE s.log = ?1
                       AND (SELECT count(*) FROM snapshot_chunks c WHERE c.log = s.log AND c.seq = s.seq) = s.chunks
                     ORDER BY s.seq DESC LIMIT 1 OFFSET ?2",
                    params![log.as_str(), KEEP_SNAPSHOTS as i64 - 1],
                    |r| r.get(0),
                )
                .optional()
                .map_err(io)?;
            if let Some(oldest_kept) = oldest_kept {
                for table in ["snapshot_chunks", "snapshots"] {
                    tx.execute(
                        &format!("DELETE FROM {table} WHERE log = ?1 AND seq < ?2"),
                        params![log.as_str(), oldest_kept],
                    )
                    .map_err(io)?;
                }
            }
        }
        tx.commit().map_err(io)?;
        Ok(complete)
    }

    fn snapshot_chunk(
        &self,
        log: LogName,
        at_or_before: Option<u64>,
        chunk: u32,
    ) -> Result<Option<SnapshotChunk>, Error> {
        let limit = seq_i64(at_or_before.unwrap_or(i64::MAX as u64))?;
        let newest: Option<(i64, Vec<u8>, u32)> = self
            .conn
            .query_row(
                "SELECT s.seq, s.state_hash, s.chunks FROM snapshots s WHERE s.log = ?1 AND s.seq <= ?2
                   AND (SELECT count(*) FROM snapshot_chunks c WHERE c.log = s.log AND c.seq = s.seq) = s.chunks
                 ORDER BY s.seq DESC LIMIT 1",
                params![log.as_str(), limit],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(io)?;
        let Some((seq, state_hash, chunks)) = newest else { return Ok(None) };
        let data: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT data FROM snapshot_chunks WHERE log = ?1 AND seq = ?2 AND chunk = ?3",
                params![log.as_str(), seq, chunk],
                |r| r.get(0),
            )
            .optional()
            .map_err(io)?;
        Ok(match data {
            Some(data) => {
                Some(SnapshotChunk { seq: seq as u64, state_hash: hash_of(state_hash)?, chunk, chunks, data })
            }
            None => None,
        })
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
