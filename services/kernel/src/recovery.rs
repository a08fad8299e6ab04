//! Rebuilding the kernel's state from storage: the newest snapshot (its hash checked), then
//! every record after it replayed through the state machine, each one's hash and link checked
//! and its events compared with what replay produces. Used at start-up and whenever an append
//! fails, so the state never drifts from what is durable. Also the periodic snapshot upload.

use base64::Engine as _;
use toka_shared::api::storage::{
    HeadReply, HeadRequest, ReadReply, ReadRequest, SnapshotGetReply, SnapshotGetRequest, SnapshotPutReply,
    SnapshotPutRequest,
};
use toka_shared::record::{Hash, LogName, verify_chain};
use toka_shared::runtime::bus::{Bus, RequestError};
use toka_shared::wire::{ErrorCode, WireError};
use toka_shared::{Operation, subject};

use crate::machine::{self, State};

/// The largest snapshot chunk, base64, kept well under NATS's payload limit.
const CHUNK_BYTES: usize = 600_000;

/// Why the state could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Storage did not answer as it should.
    #[error("storage: {0}")]
    Storage(String),
    /// The log or the snapshot is not what it claims to be.
    #[error("the kernel log does not replay: {0}")]
    Corrupt(String),
}

impl From<RequestError> for Error {
    fn from(e: RequestError) -> Self {
        Error::Storage(e.to_string())
    }
}

/// The rebuilt state with the log's head.
#[derive(Debug)]
pub struct Recovered {
    /// The state after the head.
    pub state: State,
    /// The head's hash (what the next record links to).
    pub head_hash: Hash,
    /// The sequence of the snapshot started from (0 for none).
    pub snapshot_seq: u64,
    /// Records replayed after it.
    pub replayed: u64,
}

async fn load_snapshot(bus: &Bus) -> Result<Option<State>, Error> {
    let mut chunks = Vec::new();
    let mut expected: Option<(u64, Hash, u32)> = None;
    loop {
        let chunk = chunks.len() as u32;
        let at_or_before = expected.map(|(seq, _, _)| seq);
        let request = SnapshotGetRequest { log: LogName::Kernel, at_or_before, chunk };
        let reply: SnapshotGetReply = match bus.request(subject::STORAGE_SNAPSHOT_GET.subject, &request).await {
            Ok(reply) => reply,
            Err(RequestError::Remote(e)) if e.code == ErrorCode::NotFound && expected.is_none() => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let data = base64::engine::general_purpose::STANDARD
            .decode(&reply.data)
            .map_err(|e| Error::Corrupt(format!("snapshot chunk {chunk}: {e}")))?;
        chunks.push(data);
        let (_, hash, total) = *expected.get_or_insert((reply.seq, reply.state_hash, reply.chunks));
        if chunks.len() as u32 >= total {
            let encoded = chunks.concat();
            if machine::hash_encoded(&encoded) != hash {
                return Err(Error::Corrupt(format!("snapshot at {} does not match its hash", reply.seq)));
            }
            let state = State::decode(&encoded).map_err(|e| Error::Corrupt(e.to_string()))?;
            return Ok(Some(state));
        }
    }
}

/// Loads the newest snapshot and replays the log after it up to the head.
pub async fn recover(bus: &Bus, idempotency_window: u64) -> Result<Recovered, Error> {
    let snapshot = load_snapshot(bus).await?;
    let snapshot_seq = snapshot.as_ref().map_or(0, State::last_seq);
    let mut state = snapshot.unwrap_or_else(|| State::new(idempotency_window));
    let mut prev: Option<(u64, Hash)> = None;
    let mut replayed = 0;
    loop {
        let request = ReadRequest {
            log: LogName::Kernel,
            from_seq: state.last_seq() + 1,
            max_records: toka_shared::api::MAX_PAGE,
            max_bytes: toka_shared::api::storage::MAX_READ_BYTES,
        };
        let page: ReadReply<Operation> = bus.request(subject::STORAGE_READ.subject, &request).await?;
        if page.records.is_empty() {
            break;
        }
        // Links are checked from the first record read on; the first one's own hash too.
        let (from_seq, from_hash) = match prev {
            Some(p) => p,
            None => (page.records[0].seq - 1, page.records[0].prev_hash),
        };
        prev = Some(verify_chain(&page.records, from_seq, from_hash).map_err(|b| Error::Corrupt(b.to_string()))?);
        for record in &page.records {
            state.replay(record).map_err(|e| Error::Corrupt(e.to_string()))?;
            replayed += 1;
        }
        if state.last_seq() >= page.head_seq {
            break;
        }
    }
    let head: HeadReply = bus.request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Kernel }).await?;
    if head.seq != state.last_seq() {
        return Err(Error::Corrupt(format!("replayed to {} but the head is {}", state.last_seq(), head.seq)));
    }
    if let Some((_, hash)) = prev
        && hash != head.hash
    {
        return Err(Error::Corrupt("the head's hash differs from the last record read".into()));
    }
    Ok(Recovered { state, head_hash: head.hash, snapshot_seq, replayed })
}

/// Uploads `encoded` (the state after `seq`) in chunks.
pub async fn put_snapshot(bus: &Bus, seq: u64, encoded: &[u8]) -> Result<(), WireError> {
    let state_hash = machine::hash_encoded(encoded);
    let text = base64::engine::general_purpose::STANDARD.encode(encoded);
    let pieces: Vec<&str> =
        text.as_bytes().chunks(CHUNK_BYTES).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    let chunks = pieces.len().max(1) as u32;
    for (i, data) in pieces.iter().enumerate() {
        let request = SnapshotPutRequest {
            log: LogName::Kernel,
            seq,
            state_hash,
            chunk: i as u32,
            chunks,
            data: (*data).to_owned(),
        };
        let _: SnapshotPutReply =
            bus.request(subject::STORAGE_SNAPSHOT_PUT.subject, &request).await.map_err(|e| e.to_wire())?;
    }
    Ok(())
}
