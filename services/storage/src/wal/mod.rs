//! The write-ahead log: named logs of hash-chained records, one trait, several backends.
//!
//! - `memory`: in-process, for tests.
//! - `sqlite`: the embedded default; WAL journal with `synchronous=FULL`, so an acknowledged
//!   append has been fsynced; many batches per transaction (group commit); one process per data
//!   directory.
//! - `fdb_layout`: FoundationDB's keys, value chunking and transaction splitting, as pure
//!   functions tested everywhere.
//!
//! The service checks records (schema, hash, links) before they reach a backend; a backend
//! checks only what needs its state: that a batch continues the log's head. Every backend passes
//! the same conformance suite (`wal::conformance`).

use toka_contract::record::{Hash, LogName};

#[cfg(feature = "fdb")]
pub mod fdb;
pub mod fdb_layout;
pub mod memory;
pub mod sqlite;

#[cfg(test)]
pub(crate) mod conformance;

/// A record as the WAL keeps it: its position and links, and its JSON as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Position in the log.
    pub seq: u64,
    /// The record's hash.
    pub hash: Hash,
    /// The previous record's hash.
    pub prev_hash: Hash,
    /// The sequencer's time.
    pub time_us: u64,
    /// The record's JSON.
    pub body: Vec<u8>,
    /// Index entries of its events, in order.
    pub events: Vec<EventKey>,
}

/// What queries find an event by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventKey {
    /// `<category>.<name>`.
    pub event_type: String,
    /// The entity id, if any.
    pub entity: Option<String>,
}

/// A log's head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    /// The last sequence (0 for an empty log).
    pub seq: u64,
    /// The last record's hash ([`Hash::ZERO`] for an empty log).
    pub hash: Hash,
    /// The oldest sequence still kept (1 unless compacted).
    pub first_seq: u64,
}

impl Head {
    /// The head of an empty log.
    pub const EMPTY: Head = Head { seq: 0, hash: Hash::ZERO, first_seq: 1 };
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The batch's first sequence.
    pub first_seq: u64,
    /// Its last sequence.
    pub last_seq: u64,
    /// Its last hash.
    pub last_hash: Hash,
    /// Whether every record was already committed (an identical retry).
    pub duplicate: bool,
}

/// An event found by a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    /// The record.
    pub seq: u64,
    /// The event's index in it.
    pub idx: u16,
    /// The record's time.
    pub time_us: u64,
}

/// What a query asks for; every set field must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// Events about this entity.
    pub entity: Option<String>,
    /// Events of this type.
    pub event_type: Option<String>,
    /// At or after this time.
    pub from_time_us: Option<u64>,
    /// Before this time.
    pub to_time_us: Option<u64>,
    /// After this address.
    pub after: Option<(u64, u16)>,
    /// At most this many.
    pub limit: usize,
}

/// One chunk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The last sequence the snapshot covers.
    pub seq: u64,
    /// The hash of the whole state.
    pub state_hash: Hash,
    /// This chunk's index.
    pub chunk: u32,
    /// How many chunks in all.
    pub chunks: u32,
    /// The bytes.
    pub data: Vec<u8>,
}

/// Why a WAL operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The batch does not continue the log (a taken sequence with other content, a gap, a
    /// broken link to the head).
    #[error("conflict: {reason} (the log's next sequence is {next_seq})")]
    Conflict {
        /// The sequence an append must start at now.
        next_seq: u64,
        /// What is wrong.
        reason: String,
    },
    /// Asked for something that is not there.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed for this operation (chunk out of range, and so on).
    #[error("{0}")]
    Invalid(String),
    /// The storage device refused the write (read-only, full) or failed.
    #[error("storage failed: {0}")]
    Io(String),
    /// What is stored does not read back as written.
    #[error("corrupt log: {0}")]
    Corrupt(String),
}

/// A write-ahead log backend.
pub trait Wal: Send + 'static {
    /// `memory`, `sqlite` or `fdb`.
    fn backend(&self) -> &'static str;

    /// Appends batches atomically each, durably all, in one commit where the backend can.
    /// Each batch starts at its first record's `seq`; the results come back in order.
    fn append(&mut self, batches: &[(LogName, &[StoredRecord])]) -> Vec<Result<Appended, Error>>;

    /// Records from `from_seq` on, at most `max_records`, stopping before `max_bytes` of
    /// bodies are exceeded (but always at least one record when one exists).
    fn read(
        &self,
        log: LogName,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, Error>;

    /// The log's head.
    fn head(&self, log: LogName) -> Result<Head, Error>;

    /// Events matching `query`, in log order.
    fn query(&self, log: LogName, query: &Query) -> Result<Vec<Hit>, Error>;

    /// Stores a snapshot chunk; returns whether the snapshot is now complete. Completing one
    /// keeps the [`KEEP_SNAPSHOTS`] newest complete snapshots of the log and removes every
    /// snapshot older than those, complete or not, in the same transaction.
    fn put_snapshot_chunk(&mut self, log: LogName, chunk: SnapshotChunk) -> Result<bool, Error>;

    /// A chunk of the newest complete snapshot at or before `at_or_before`.
    fn snapshot_chunk(
        &self,
        log: LogName,
        at_or_before: Option<u64>,
        chunk: u32,
    ) -> Result<Option<SnapshotChunk>, Error>;

    /// Removes records up to `through_seq`, which must not pass the newest complete snapshot
    /// nor the head. Returns how many were removed.
    fn compact(&mut self, log: LogName, through_seq: u64) -> Result<u64, Error>;

    /// The last sequence whose events are published.
    fn published(&self, log: LogName) -> Result<u64, Error>;

    /// Records that events through `seq` are published.
    fn set_published(&mut self, log: LogName, seq: u64) -> Result<(), Error>;
}

/// How many complete snapshots each log keeps. Recovery needs only the newest; the one before
/// it stays so that a reader that began with it (a standby loading chunk by chunk while a new
/// snapshot completes) can finish. Without a bound every snapshot stayed on disk for ever: tens
/// of megabytes each, every 100 000 records under load.
pub const KEEP_SNAPSHOTS: usize = 2;

/// Refuses a snapshot chunk that is out of range or past the head.
pub(crate) fn check_chunk(c: &SnapshotChunk, head: Head) -> Result<(), Error> {
    if c.chunk >= c.chunks {
        return Err(Error::Invalid(format!("chunk {} of {}", c.chunk, c.chunks)));
    }
    if c.seq > head.seq {
        return Err(Error::Invalid(format!("snapshot at {} is past the head {}", c.seq, head.seq)));
    }
    Ok(())
}

/// The last sequence compaction may remove: not past the newest complete snapshot, and never
/// the head. Refuses `through_seq` beyond it.
pub(crate) fn compaction_limit(newest_snapshot: Option<u64>, head: Head, through_seq: u64) -> Result<u64, Error> {
    let limit = newest_snapshot.unwrap_or(0).min(head.seq.saturating_sub(1));
    if through_seq > limit {
        return Err(Error::Invalid(format!(
            "can compact through {limit} at most (newest complete snapshot, and the head is kept)"
        )));
    }
    Ok(limit)
}

/// Checks a batch against a head: returns how many leading records are already committed
/// (identical retry) given `stored_hash(seq)`, or the conflict.
pub(crate) fn plan_append(
    head: Head,
    batch: &[StoredRecord],
    stored_hash: impl Fn(u64) -> Result<Option<Hash>, Error>,
) -> Result<usize, Error> {
    let conflict = |reason: String| Error::Conflict { next_seq: head.seq + 1, reason };
    let Some(first) = batch.first() else { return Err(Error::Invalid("empty batch".into())) };
    if first.seq > head.seq + 1 {
        return Err(conflict(format!("batch starts at {}, leaving a gap", first.seq)));
    }
    let mut committed = 0;
    for r in batch {
        if r.seq > head.seq {
            break;
        }
        if r.seq < head.first_seq {
            return Err(conflict(format!("sequence {} was compacted; cannot compare a retry", r.seq)));
        }
        match stored_hash(r.seq)? {
            Some(h) if h == r.hash => committed += 1,
            Some(_) => return Err(conflict(format!("sequence {} is taken by a different record", r.seq))),
            None => return Err(Error::Corrupt(format!("sequence {} below the head is missing", r.seq))),
        }
    }
    if let Some(next) = batch.get(committed) {
        let link = if committed > 0 { batch[committed - 1].hash } else { head.hash };
        if next.prev_hash != link {
            return Err(conflict(format!("record {} does not link to the head {}", next.seq, link)));
        }
    }
    Ok(committed)
}
