//! Storage's endpoints.

use serde::{Deserialize, Serialize};

use super::default_page;
use crate::event::Event;
use crate::record::{ChainBreak, Hash, LogName, Record};

/// Default and largest byte budget of a read reply, under NATS's 1 MiB default payload.
pub const MAX_READ_BYTES: u32 = 900_000;

fn default_read_bytes() -> u32 {
    MAX_READ_BYTES
}

/// `toka.storage.v1.append.<log>`: records with contiguous sequences starting at
/// `expected_seq`, the log's head + 1. An identical retry of a committed batch succeeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendRequest<B> {
    /// The sequence of the first record.
    pub expected_seq: u64,
    /// The records, hash-chained to the head.
    pub records: Vec<Record<B>>,
}

/// Sent once the batch is durable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppendReply {
    /// The first record's sequence.
    pub first_seq: u64,
    /// The last record's sequence (the new head, unless `duplicate`).
    pub last_seq: u64,
    /// The last record's hash.
    pub last_hash: Hash,
    /// Whether the batch had already been committed (an idempotent retry).
    pub duplicate: bool,
}

/// `toka.storage.v1.read`: records from `from_seq` on, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    /// The log.
    pub log: LogName,
    /// The first sequence wanted.
    pub from_seq: u64,
    /// At most this many records, 1 to [`MAX_PAGE`](super::MAX_PAGE).
    #[serde(default = "default_page")]
    pub max_records: u32,
    /// At most about this many bytes of records (at least one record is returned).
    #[serde(default = "default_read_bytes")]
    pub max_bytes: u32,
}

/// A page of records; `B` is the log's body type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadReply<B> {
    /// The log.
    pub log: LogName,
    /// The records, contiguous from the requested sequence.
    pub records: Vec<Record<B>>,
    /// The log's head when read.
    pub head_seq: u64,
}

/// An event's address in a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventAddress {
    /// The record.
    pub seq: u64,
    /// The event's index in the record.
    pub idx: u16,
}

/// `toka.storage.v1.query`: events by entity, type and time, in log order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    /// The log.
    pub log: LogName,
    /// Only events about this entity id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entity: Option<String>,
    /// Only events of this type (`task.failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_type: Option<String>,
    /// Only events at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_time_us: Option<u64>,
    /// Only events before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_time_us: Option<u64>,
    /// Start after this address (the previous page's `next_after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<EventAddress>,
    /// Page size, 1 to [`MAX_PAGE`](super::MAX_PAGE).
    #[serde(default = "default_page")]
    pub limit: u32,
}

/// One event found by a query.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryHit {
    /// Where it is.
    pub at: EventAddress,
    /// When it was recorded.
    pub time_us: u64,
    /// The event.
    pub event: Event,
}

/// A page of events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryReply {
    /// The events.
    pub hits: Vec<QueryHit>,
    /// Where the next page starts; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<EventAddress>,
}

/// `toka.storage.v1.head`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadRequest {
    /// The log.
    pub log: LogName,
}

/// A log's head; `seq` 0 and [`Hash::ZERO`] for an empty log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadReply {
    /// The log.
    pub log: LogName,
    /// The last sequence.
    pub seq: u64,
    /// The last record's hash.
    pub hash: Hash,
}

/// `toka.storage.v1.verify`: recompute the chain over a range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The log.
    pub log: LogName,
    /// The first sequence to check (default: the oldest kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_seq: Option<u64>,
    /// The last sequence to check (default: the head).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_seq: Option<u64>,
}

/// The outcome of a verification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyReply {
    /// The log.
    pub log: LogName,
    /// Records checked.
    pub verified: u64,
    /// The head when checked.
    pub head_seq: u64,
    /// The first break, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_break: Option<ChainBreak>,
}

/// `toka.storage.v1.snapshot.put`: one chunk of a snapshot of the state after `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPutRequest {
    /// The log the snapshot summarises.
    pub log: LogName,
    /// The last sequence the snapshot covers.
    pub seq: u64,
    /// The hash of the whole encoded state.
    pub state_hash: Hash,
    /// This chunk's index, from 0.
    pub chunk: u32,
    /// How many chunks in all.
    pub chunks: u32,
    /// The chunk, base64 (standard alphabet, padded).
    pub data: String,
}

/// Progress of a snapshot upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotPutReply {
    /// The snapshot's sequence.
    pub seq: u64,
    /// Whether every chunk is now stored (and the snapshot usable).
    pub complete: bool,
}

/// `toka.storage.v1.snapshot.get`: a chunk of the newest complete snapshot at or before a
/// sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotGetRequest {
    /// The log.
    pub log: LogName,
    /// The newest snapshot at or before this sequence (default: the newest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_or_before: Option<u64>,
    /// The chunk wanted.
    pub chunk: u32,
}

/// One chunk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotGetReply {
    /// The last sequence the snapshot covers.
    pub seq: u64,
    /// The hash of the whole encoded state.
    pub state_hash: Hash,
    /// This chunk's index.
    pub chunk: u32,
    /// How many chunks in all.
    pub chunks: u32,
    /// The chunk, base64.
    pub data: String,
}

/// `toka.storage.v1.status` (the request body is `{}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {}

/// One log's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogStatus {
    /// The log.
    pub log: LogName,
    /// The last sequence.
    pub head_seq: u64,
    /// The oldest sequence kept (after compaction), 1 if none was compacted.
    pub first_seq: u64,
    /// The last sequence whose events are published on the stream.
    pub published_seq: u64,
    /// The newest complete snapshot, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_seq: Option<u64>,
}

/// Storage's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReply {
    /// `memory`, `sqlite` or `fdb`.
    pub backend: String,
    /// Each log.
    pub logs: Vec<LogStatus>,
}
