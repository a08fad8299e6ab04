//! The in-memory backend, for tests: the same rules as the durable ones, nothing survives the
//! process.

use std::collections::BTreeMap;

use toka_contract::record::{Hash, LogName};

use super::{
    Appended, Error, Head, Hit, KEEP_SNAPSHOTS, Query, SnapshotChunk, StoredRecord, Wal, check_chunk, compaction_limit,
    plan_append,
};

/// A snapshot being uploaded or complete: state hash, chunk count, chunks received.
#[derive(Debug)]
struct Snapshot {
    state_hash: Hash,
    chunks: u32,
    have: BTreeMap<u32, Vec<u8>>,
}

impl Snapshot {
    fn complete(&self) -> bool {
        self.have.len() == self.chunks as usize
    }
}

#[derive(Debug, Default)]
struct Log {
    records: BTreeMap<u64, StoredRecord>,
    /// The hash and sequence of the last compacted record, if any.
    compacted: Option<(u64, Hash)>,
    published: u64,
    snapshots: BTreeMap<u64, Snapshot>,
}

impl Log {
    fn head(&self) -> Head {
        let first_seq = self.compacted.map_or(1, |(seq, _)| seq + 1);
        match self.records.last_key_value() {
            Some((seq, r)) => Head { seq: *seq, hash: r.hash, first_seq },
            None => match self.compacted {
                Some((seq, hash)) => Head { seq, hash, first_seq },
                None => Head::EMPTY,
            },
        }
    }
}

/// Logs in memory.
#[derive(Debug, Default)]
pub struct MemoryWal {
    logs: BTreeMap<LogName, Log>,
}

impl MemoryWal {
    /// An empty WAL.
    pub fn new() -> Self {
        Self::default()
    }

    fn log(&self, log: LogName) -> Option<&Log> {
        self.logs.get(&log)
    }
}

impl Wal for MemoryWal {
    fn backend(&self) -> &'static str {
        "memory"
    }

    fn append(&mut self, batches: &[(LogName, &[StoredRecord])]) -> Vec<Result<Appended, Error>> {
        batches
            .iter()
            .map(|(name, batch)| {
                let log = self.logs.entry(*name).or_default();
                let committed = plan_append(log.head(), batch, |seq| Ok(log.records.get(&seq).map(|r| r.hash)))?;
                for r in &batch[committed..] {
                    log.records.insert(r.seq, r.clone());
                }
                let (first, last) = (&batch[0], &batch[batch.len() - 1]);
                Ok(Appended {
                    first_seq: first.seq,
                    last_seq: last.seq,
                    last_hash: last.hash,
                    duplicate: committed == batch.len(),
                })
            })
            .collect()
    }

    fn read(
        &self,
        log: LogName,
        from_seq: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<StoredRecord>, Error> {
        let Some(log) = self.log(log) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in log.records.range(from_seq..).map(|(_, r)| r).take(max_records) {
            if !out.is_empty() && bytes + r.body.len() > max_bytes {
                break;
            }
            bytes += r.body.len();
            out.push(r.clone());
        }
        Ok(out)
    }

    fn head(&self, log: LogName) -> Result<Head, Error> {
        Ok(self.log(log).map_or(Head::EMPTY, Log::head))
    }

    fn query(&self, log: LogName, q: &Query) -> Result<Vec<Hit>, Error> {
        let Some(log) = self.log(log) else { return Ok(Vec::new()) };
        let mut hits = Vec::new();
        let start = q.after.map_or(0, |(seq, _)| seq);
        for r in log.records.range(start..).map(|(_, r)| r) {
            if q.from_time_us.is_some_and(|t| r.time_us < t) || q.to_time_us.is_some_and(|t| r.time_us >= t) {
                continue;
            }
            for (idx, key) in r.events.iter().enumerate() {
                let idx =
                    u16::try_from(idx).map_err(|_| Error::Corrupt(format!("record {} has too many events", r.seq)))?;
                if q.after.is_some_and(|after| (r.seq, idx) <= after)
                    || q.entity.as_ref().is_some_and(|e| key.entity.as_ref() != Some(e))
                    || q.event_type.as_ref().is_some_and(|t| &key.event_type != t)
                {
                    continue;
                }
                hits.push(Hit { seq: r.seq, idx, time_us: r.time_us });
                if hits.len() >= q.limit {
                    return Ok(hits);
                }
            }
        }
        Ok(hits)
    }

    fn put_snapshot_chunk(&mut self, log: LogName, c: SnapshotChunk) -> Result<bool, Error> {
        let log = self.logs.entry(log).or_default();
        check_chunk(&c, log.head())?;
        let entry = log.snapshots.entry(c.seq).or_insert_with(|| Snapshot {
            state_hash: c.state_hash,
            chunks: c.chunks,
            have: BTreeMap::new(),
        });
        if entry.state_hash != c.state_hash || entry.chunks != c.chunks {
            return Err(Error::Invalid(format!("snapshot at {} was started with another hash or chunk count", c.seq)));
        }
        entry.have.insert(c.chunk, c.data);
        if !entry.complete() {
            return Ok(false);
        }
        let kept =
            log.snapshots.iter().rev().filter(|(_, s)| s.complete()).nth(KEEP_SNAPSHOTS - 1).map(|(seq, _)| *seq);
        if let Some(oldest_kept) = kept {
            log.snapshots = log.snapshots.split_off(&oldest_kept);
        }
        Ok(true)
    }

    fn snapshot_chunk(
        &self,
        log: LogName,
        at_or_before: Option<u64>,
        chunk: u32,
    ) -> Result<Option<SnapshotChunk>, Error> {
        let Some(log) = self.log(log) else { return Ok(None) };
        let newest = log.snapshots.range(..=at_or_before.unwrap_or(u64::MAX)).rev().find(|(_, s)| s.complete());
        Ok(newest.and_then(|(seq, s)| {
            s.have.get(&chunk).map(|data| SnapshotChunk {
                seq: *seq,
                state_hash: s.state_hash,
                chunk,
                chunks: s.chunks,
                data: data.clone(),
            })
        }))
    }

    fn compact(&mut self, name: LogName, through_seq: u64) -> Result<u64, Error> {
        let Some(log) = self.logs.get_mut(&name) else { return Ok(0) };
        let newest_snapshot = log.snapshots.iter().rev().find(|(_, s)| s.complete()).map(|(seq, _)| *seq);
        compaction_limit(newest_snapshot, log.head(), through_seq)?;
        let doomed: Vec<u64> = log.records.range(..=through_seq).map(|(seq, _)| *seq).collect();
        if let Some(last) = doomed.last() {
            log.compacted = Some((*last, log.records[last].hash));
        }
        for seq in &doomed {
            log.records.remove(seq);
        }
        Ok(doomed.len() as u64)
    }

    fn published(&self, log: LogName) -> Result<u64, Error> {
        Ok(self.log(log).map_or(0, |l| l.published))
    }

    fn set_published(&mut self, log: LogName, seq: u64) -> Result<(), Error> {
        self.logs.entry(log).or_default().published = seq;
        Ok(())
    }
}
