//! Rebuilding the kernel's state from storage: the newest snapshot (its hash checked), then
//! every record after it replayed through the state machine, each one's hash and link checked
//! and its events compared with what replay produces. Used at start-up and whenever an append
//! fails, so the state never drifts from what is durable. Also the periodic snapshot upload.
//!
//! A snapshot is stored compressed with zstd (level 1): the state's encoding holds the
//! idempotency window's operations and events as JSON, and shrinks about twentyfold. Its
//! `state_hash` stays the hash of the encoding itself, so the hash does not depend on the
//! compressor. A stored snapshot that does not start with zstd's magic (one written before
//! compression) is read as it is.

use std::io::Read as _;

use base64::Engine as _;
use toka_contract::api::storage::{ReadRequest, SnapshotGetRequest, SnapshotPutRequest};
use toka_contract::record::{Hash, LogName, verify_chain};
use toka_contract::wire::{ErrorCode, WireError};
use toka_runtime::bus::RequestError;

use crate::log::KernelLog;
use crate::machine::{self, State};

/// The largest snapshot chunk, base64, kept well under NATS's payload limit.
const CHUNK_BYTES: usize = 600_000;

/// zstd's frame magic, which a compressed snapshot starts with (an encoded state starts with
/// `TOKAKSTATE`).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The most a stored snapshot may expand to: a damaged or hostile frame cannot exhaust memory.
const MAX_STATE_BYTES: u64 = 16 << 30;

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

async fn load_snapshot(log: &impl KernelLog) -> Result<Option<State>, Error> {
    let mut chunks = Vec::new();
    let mut expected: Option<(u64, Hash, u32)> = None;
    loop {
        let chunk = chunks.len() as u32;
        let at_or_before = expected.map(|(seq, _, _)| seq);
        let request = SnapshotGetRequest { log: LogName::Kernel, at_or_before, chunk };
        let reply = match log.snapshot_get(request).await {
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
            let encoded =
                unpack(chunks.concat()).map_err(|e| Error::Corrupt(format!("snapshot at {}: {e}", reply.seq)))?;
            if machine::hash_encoded(&encoded) != hash {
                return Err(Error::Corrupt(format!("snapshot at {} does not match its hash", reply.seq)));
            }
            let state = State::decode(&encoded).map_err(|e| Error::Corrupt(e.to_string()))?;
            return Ok(Some(state));
        }
    }
}

/// Loads the newest snapshot and replays the log after it up to the head.
pub async fn recover(log: &impl KernelLog, idempotency_window: u64) -> Result<Recovered, Error> {
    let snapshot = load_snapshot(log).await?;
    let snapshot_seq = snapshot.as_ref().map_or(0, State::last_seq);
    let mut state = snapshot.unwrap_or_else(|| State::new(idempotency_window));
    let mut prev: Option<(u64, Hash)> = None;
    let mut replayed = 0;
    loop {
        let request = ReadRequest {
            log: LogName::Kernel,
            from_seq: state.last_seq() + 1,
            max_records: toka_contract::api::MAX_PAGE,
            max_bytes: toka_contract::api::storage::MAX_READ_BYTES,
        };
        let page = log.read(request).await?;
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
    let head = log.head().await?;
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

/// What is stored for a state's `encoded` form: the zstd frame of it, at level 1.
pub fn pack(encoded: &[u8]) -> std::io::Result<Vec<u8>> {
    zstd::bulk::compress(encoded, 1)
}

/// The encoded state in a stored snapshot: decompressed if it is a zstd frame, as it is if it
/// is not (a snapshot stored before compression).
pub fn unpack(stored: Vec<u8>) -> Result<Vec<u8>, String> {
    unpack_at_most(stored, MAX_STATE_BYTES)
}

fn unpack_at_most(stored: Vec<u8>, max: u64) -> Result<Vec<u8>, String> {
    if !stored.starts_with(&ZSTD_MAGIC) {
        return Ok(stored);
    }
    let mut encoded = Vec::new();
    zstd::stream::read::Decoder::new(stored.as_slice())
        .and_then(|d| d.take(max + 1).read_to_end(&mut encoded))
        .map_err(|e| format!("does not decompress: {e}"))?;
    if encoded.len() as u64 > max {
        return Err(format!("expands beyond {max} bytes"));
    }
    Ok(encoded)
}

/// Uploads `stored` (what [`pack`] made of the state after `seq`, whose encoding hashes to
/// `state_hash`) in chunks.
pub async fn put_snapshot(log: &impl KernelLog, seq: u64, state_hash: Hash, stored: &[u8]) -> Result<(), WireError> {
    let text = base64::engine::general_purpose::STANDARD.encode(stored);
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
        log.snapshot_put(request).await.map_err(|e| e.to_wire())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use toka_contract::spec::AgentSpec;
    use toka_contract::{AgentId, OpId, Operation};

    use super::*;
    use crate::machine::{Authority, Ctx};

    /// A state after `n` operations: a root agent and observations on it, each remembered
    /// with its operation and events for idempotent retries, as under load.
    fn state_after(n: u64) -> State {
        let operator: toka_contract::spec::Principal = "operator".parse().unwrap();
        let mut state = State::new(1_000);
        let mut root = None;
        for seq in 1..=n {
            let op = match root {
                None => Operation::SpawnAgent(AgentSpec {
                    name: "root".parse().unwrap(),
                    parent: None,
                    limits: Default::default(),
                }),
                Some(agent) => Operation::EmitObservation {
                    agent,
                    kind: "load.tick".parse().unwrap(),
                    body: format!("observation {seq} of the run"),
                },
            };
            let ctx = Ctx {
                seq,
                time_us: 1_000_000 + seq,
                op_id: OpId::mint(1_000_000 + seq, seq, 1),
                principal: &operator,
                authority: Authority::Replay,
            };
            state.apply(&op, &ctx).unwrap();
            root = root.or(Some(AgentId::mint(1_000_001, 1, 0)));
        }
        state
    }

    #[test]
    fn a_packed_snapshot_unpacks_to_its_encoding_and_is_much_smaller() {
        let encoded = state_after(500).encode().unwrap();
        let stored = pack(&encoded).unwrap();
        assert!(stored.starts_with(&ZSTD_MAGIC));
        assert!(stored.len() * 5 < encoded.len(), "{} bytes stored for {} encoded", stored.len(), encoded.len());
        let unpacked = unpack(stored).unwrap();
        assert_eq!(unpacked, encoded);
        assert_eq!(State::decode(&unpacked).unwrap(), state_after(500));
    }

    #[test]
    fn a_snapshot_stored_before_compression_is_read_as_it_is() {
        let encoded = state_after(20).encode().unwrap();
        assert_eq!(unpack(encoded.clone()).unwrap(), encoded);
    }

    #[test]
    fn a_damaged_or_oversized_snapshot_is_refused() {
        let encoded = state_after(200).encode().unwrap();
        let stored = pack(&encoded).unwrap();
        let mut damaged = stored.clone();
        damaged.truncate(stored.len() / 2);
        assert!(unpack(damaged).unwrap_err().contains("does not decompress"));
        let bound = encoded.len() as u64 - 1;
        assert_eq!(unpack_at_most(stored.clone(), bound).unwrap_err(), format!("expands beyond {bound} bytes"));
        assert_eq!(unpack_at_most(stored, encoded.len() as u64).unwrap(), encoded);
    }
}
