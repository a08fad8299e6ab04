//! The FoundationDB backend (feature `fdb`): the distributed engine.
//!
//! Keys, value chunks and transaction splitting come from [`super::fdb_layout`]. A batch is
//! written in as few transactions as the limits allow; each transaction re-reads the head and
//! plans the append itself, so when FoundationDB retries one whose commit result was unknown
//! (`commit_unknown_result`), the records it already committed are recognised as an identical
//! retry and nothing is written twice. A commit is durable when it returns.
//!
//! The suite in `conformance` runs against a cluster named by `FDB_CLUSTER_FILE` where there is
//! one; this repository's machines have no FoundationDB server or client library, so it has not
//! been run against a live cluster here.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use foundationdb::options::StreamingMode;
use foundationdb::{Database, FdbBindingError, RangeOption, RetryableTransaction};
use toka_contract::record::{Hash, LogName};

use super::fdb_layout::{self as layout, Layout};
use super::{
    Appended, Error, Head, Hit, KEEP_SNAPSHOTS, Query, SnapshotChunk, StoredRecord, Wal, check_chunk, compaction_limit,
    plan_append,
};

/// The most index entries a query scans before answering with what it found.
const QUERY_SCAN: usize = 10_000;

fn custom(e: Error) -> FdbBindingError {
    FdbBindingError::CustomError(Box::new(e))
}

fn back(e: FdbBindingError) -> Error {
    match e {
        FdbBindingError::CustomError(inner) => match inner.downcast::<Error>() {
            Ok(e) => *e,
            Err(other) => Error::Io(other.to_string()),
        },
        other => Error::Io(other.to_string()),
    }
}

fn malformed(e: layout::Error) -> FdbBindingError {
    custom(Error::Corrupt(e.to_string()))
}

/// The WAL in a FoundationDB cluster.
pub struct FdbWal {
    db: Database,
    layout: Layout,
}

impl std::fmt::Debug for FdbWal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbWal").field("layout", &self.layout).finish_non_exhaustive()
    }
}

impl FdbWal {
    /// Connects to the cluster in `cluster_file` (the default cluster file when `None`), keeping
    /// Toka's keys under the tuple `(prefix,)`.
    pub fn open(cluster_file: Option<&str>, prefix: &str) -> Result<FdbWal, Error> {
        static NETWORK: OnceLock<()> = OnceLock::new();
        NETWORK.get_or_init(|| {
            // SAFETY: `boot` starts FoundationDB's network thread, which may happen once per
            // process; the OnceLock guarantees that. The guard is leaked so the network runs
            // for the life of the process.
            #[allow(unsafe_code)]
            let network = unsafe { foundationdb::boot() };
            std::mem::forget(network);
        });
        let db = Database::new(cluster_file).map_err(|e| Error::Io(e.to_string()))?;
        Ok(FdbWal { db, layout: Layout::new(prefix) })
    }

    fn run<T, F, Fut>(&self, f: F) -> Result<T, Error>
    where
        F: Fn(RetryableTransaction) -> Fut,
        Fut: std::future::Future<Output = Result<T, FdbBindingError>>,
    {
        futures::executor::block_on(self.db.run(|trx, _maybe_committed| f(trx))).map_err(back)
    }

    async fn head_in(trx: &RetryableTransaction, layout: &Layout, log: LogName) -> Result<Head, FdbBindingError> {
        match trx.get(&layout.head(log), false).await? {
            Some(v) => {
                let (seq, hash, first_seq) = layout::decode_head(&v).map_err(malformed)?;
                Ok(Head { seq, hash, first_seq })
            }
            None => Ok(Head::EMPTY),
        }
    }

    fn append_group(&self, log: LogName, group: &[StoredRecord]) -> Result<Appended, Error> {
        let layout = &self.layout;
        self.run(|trx| async move {
            let head = Self::head_in(&trx, layout, log).await?;
            let mut stored = BTreeMap::new();
            for r in group.iter().filter(|r| r.seq <= head.seq && r.seq >= head.first_seq) {
                if let Some(v) = trx.get(&layout.meta(log, r.seq), false).await? {
                    stored.insert(r.seq, layout::decode_meta(&v).map_err(malformed)?.0);
                }
            }
            let committed = plan_append(head, group, |seq| Ok(stored.get(&seq).copied())).map_err(custom)?;
            for r in &group[committed..] {
                let pieces = layout::split_value(&r.body);
                for (i, piece) in pieces.iter().enumerate() {
                    trx.set(&layout.chunk(log, r.seq, i as u32), piece);
                }
                trx.set(
                    &layout.meta(log, r.seq),
                    &layout::encode_meta(r.hash, r.prev_hash, r.time_us, pieces.len() as u32),
                );
                for (idx, key) in r.events.iter().enumerate() {
                    let idx = u16::try_from(idx)
                        .map_err(|_| custom(Error::Invalid(format!("record {} has too many events", r.seq))))?;
                    let value = layout::encode_event(r.time_us, &key.event_type, key.entity.as_deref());
                    trx.set(&layout.event(log, r.seq, idx), &value);
                    trx.set(&layout.by_type(log, &key.event_type, r.seq, idx), &value);
                    if let Some(entity) = &key.entity {
                        trx.set(&layout.by_entity(log, entity, r.seq, idx), &value);
                    }
                }
            }
            let last = &group[group.len() - 1];
            if committed < group.len() {
                trx.set(&layout.head(log), &layout::encode_head(last.seq, last.hash, head.first_seq));
            }
            Ok(Appended {
                first_seq: group[0].seq,
                last_seq: last.seq,
                last_hash: last.hash,
                duplicate: committed == group.len(),
            })
        })
    }

    async fn get_range(
        trx: &RetryableTransaction,
        (begin, end): (Vec<u8>, Vec<u8>),
        limit: usize,
        reverse: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>, FdbBindingError> {
        let mut option = RangeOption::from((begin.as_slice(), end.as_slice()));
        option.limit = Some(limit);
        option.reverse = reverse;
        option.mode = StreamingMode::WantAll;
        let values = trx.get_range(&option, 1, false).await?;
        Ok(values.iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect())
    }

    async fn body(
        trx: &RetryableTransaction,
        layout: &Layout,
        log: LogName,
        seq: u64,
    ) -> Result<Vec<u8>, FdbBindingError> {
        let chunks = Self::get_range(trx, layout.chunks(log, seq), usize::MAX, false).await?;
        Ok(chunks.into_iter().flat_map(|(_, v)| v).collect())
    }

    /// The newest complete snapshot at or before `seq`: (seq, state hash, chunks).
    async fn newest_snapshot(
        trx: &RetryableTransaction,
        layout: &Layout,
        log: LogName,
        seq: u64,
    ) -> Result<Option<(u64, Hash, u32)>, FdbBindingError> {
        for (key, value) in Self::get_range(trx, layout.snapshots_through(log, seq), 64, true).await? {
            let Some(at) = layout.snapshot_seq(&key) else { continue };
            if value.len() != 36 {
                return Err(custom(Error::Corrupt("snapshot meta".into())));
            }
            let hash = Hash(value[..32].try_into().map_err(|_| custom(Error::Corrupt("snapshot meta".into())))?);
            let chunks = u32::from_be_bytes(
                value[32..36].try_into().map_err(|_| custom(Error::Corrupt("snapshot meta".into())))?,
            );
            let have = Self::get_range(trx, layout.snapshot_chunks(log, at), chunks as usize + 1, false).await?.len();
            if have == chunks as usize {
                return Ok(Some((at, hash, chunks)));
            }
        }
        Ok(None)
    }
}

impl Wal for FdbWal {
    fn backend(&self) -> &'static str {
        "fdb"
    }

    fn append(&mut self, batches: &[(LogName, &[StoredRecord])]) -> Vec<Result<Appended, Error>> {
        batches
            .iter()
            .map(|(log, batch)| {
                let costs: Vec<usize> =
                    batch.iter().map(|r| layout::record_cost(r.body.len(), r.events.len())).collect();
                let groups = layout::split_batch(&costs).map_err(|e| Error::Invalid(e.to_string()))?;
                let mut total: Option<Appended> = None;
                for group in groups {
                    let done = self.append_group(*log, &batch[group])?;
                    total = Some(match total {
                        Some(t) => Appended {
                            last_seq: done.last_seq,
                            last_hash: done.last_hash,
                            duplicate: t.duplicate && done.duplicate,
                            ..t
                        },
                        None => done,
                    });
                }
                total.ok_or_else(|| Error::Invalid("empty batch".into()))
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
        let layout = &self.layout;
        self.run(|trx| async move {
            let metas = Self::get_range(&trx, layout.meta_range(log, from_seq), max_records, false).await?;
            let mut out = Vec::with_capacity(metas.len());
            let mut bytes = 0;
            for (key, value) in metas {
                let seq = layout.meta_seq(&key).ok_or_else(|| custom(Error::Corrupt("record key".into())))?;
                let (hash, prev_hash, time_us, _) = layout::decode_meta(&value).map_err(malformed)?;
                let body = Self::body(&trx, layout, log, seq).await?;
                if !out.is_empty() && bytes + body.len() > max_bytes {
                    break;
                }
                bytes += body.len();
                out.push(StoredRecord { seq, hash, prev_hash, time_us, body, events: Vec::new() });
            }
            Ok(out)
        })
    }

    fn head(&self, log: LogName) -> Result<Head, Error> {
        let layout = &self.layout;
        self.run(|trx| async move { Self::head_in(&trx, layout, log).await })
    }

    fn query(&self, log: LogName, q: &Query) -> Result<Vec<Hit>, Error> {
        let layout = &self.layout;
        self.run(|trx| async move {
            let range = match (&q.entity, &q.event_type) {
                (Some(entity), _) => layout.entity_after(log, entity, q.after),
                (None, Some(t)) => layout.type_after(log, t, q.after),
                (None, None) => layout.events_after(log, q.after),
            };
            let mut hits = Vec::new();
            for (key, value) in Self::get_range(&trx, range, QUERY_SCAN, false).await? {
                let (seq, idx) =
                    layout.event_address(&key).ok_or_else(|| custom(Error::Corrupt("event key".into())))?;
                let (time_us, event_type, entity) = layout::decode_event(&value).map_err(malformed)?;
                if q.event_type.as_deref().is_some_and(|t| t != event_type)
                    || q.entity.as_deref().is_some_and(|e| Some(e) != entity)
                    || q.from_time_us.is_some_and(|t| time_us < t)
                    || q.to_time_us.is_some_and(|t| time_us >= t)
                {
                    continue;
                }
                hits.push(Hit { seq, idx, time_us });
                if hits.len() >= q.limit {
                    break;
                }
            }
            Ok(hits)
        })
    }

    fn put_snapshot_chunk(&mut self, log: LogName, c: SnapshotChunk) -> Result<bool, Error> {
        if c.data.len() > layout::VALUE_LIMIT {
            return Err(Error::Invalid(format!("a snapshot chunk holds at most {} bytes", layout::VALUE_LIMIT)));
        }
        let layout = &self.layout;
        let c = &c;
        self.run(|trx| async move {
            check_chunk(c, Self::head_in(&trx, layout, log).await?).map_err(custom)?;
            let meta = [&c.state_hash.0[..], &c.chunks.to_be_bytes()].concat();
            match trx.get(&layout.snapshot(log, c.seq), false).await? {
                Some(existing) if existing[..] != meta[..] => {
                    return Err(custom(Error::Invalid(format!(
                        "snapshot at {} was started with another hash or chunk count",
                        c.seq
                    ))));
                }
                Some(_) => {}
                None => trx.set(&layout.snapshot(log, c.seq), &meta),
            }
            trx.set(&layout.snapshot_chunk(log, c.seq, c.chunk), &c.data);
            let have = Self::get_range(&trx, layout.snapshot_chunks(log, c.seq), c.chunks as usize + 1, false).await?;
            let mut present: Vec<u32> =
                have.iter().filter_map(|(k, _)| layout.event_address(k).map(|(_, i)| u32::from(i))).collect();
            present.push(c.chunk);
            present.sort_unstable();
            present.dedup();
            if present.len() != c.chunks as usize {
                return Ok(false);
            }
            // The KEEP_SNAPSHOTS-th newest complete snapshot; everything before it goes.
            let mut oldest_kept = None;
            let mut through = u64::MAX;
            for _ in 0..KEEP_SNAPSHOTS {
                match Self::newest_snapshot(&trx, layout, log, through).await? {
                    Some((seq, _, _)) => {
                        oldest_kept = Some(seq);
                        through = seq.saturating_sub(1);
                    }
                    None => {
                        oldest_kept = None;
                        break;
                    }
                }
            }
            if let Some(seq) = oldest_kept {
                for (begin, end) in layout.snapshots_before(log, seq) {
                    trx.clear_range(&begin, &end);
                }
            }
            Ok(true)
        })
    }

    fn snapshot_chunk(
        &self,
        log: LogName,
        at_or_before: Option<u64>,
        chunk: u32,
    ) -> Result<Option<SnapshotChunk>, Error> {
        let layout = &self.layout;
        self.run(|trx| async move {
            let Some((seq, state_hash, chunks)) =
                Self::newest_snapshot(&trx, layout, log, at_or_before.unwrap_or(u64::MAX)).await?
            else {
                return Ok(None);
            };
            Ok(trx.get(&layout.snapshot_chunk(log, seq, chunk), false).await?.map(|data| SnapshotChunk {
                seq,
                state_hash,
                chunk,
                chunks,
                data: data.to_vec(),
            }))
        })
    }

    fn compact(&mut self, log: LogName, through_seq: u64) -> Result<u64, Error> {
        let layout = &self.layout;
        self.run(|trx| async move {
            let head = Self::head_in(&trx, layout, log).await?;
            let newest = Self::newest_snapshot(&trx, layout, log, u64::MAX).await?.map(|s| s.0);
            compaction_limit(newest, head, through_seq).map_err(custom)?;
            // One transaction removes up to a thousand records; the caller repeats for more.
            let metas = Self::get_range(&trx, layout.meta_range(log, head.first_seq), 1_000, false).await?;
            let mut removed = 0;
            let mut first_kept = head.first_seq;
            for (key, _) in metas {
                let Some(seq) = layout.meta_seq(&key) else { continue };
                if seq > through_seq {
                    break;
                }
                for (ekey, value) in
                    Self::get_range(&trx, layout.events_after(log, Some((seq - 1, u16::MAX))), usize::MAX, false)
                        .await?
                {
                    let Some((s, idx)) = layout.event_address(&ekey) else { continue };
                    if s != seq {
                        break;
                    }
                    let (_, event_type, entity) = layout::decode_event(&value).map_err(malformed)?;
                    trx.clear(&layout.by_type(log, event_type, s, idx));
                    if let Some(entity) = entity {
                        trx.clear(&layout.by_entity(log, entity, s, idx));
                    }
                    trx.clear(&ekey);
                }
                let (begin, end) = layout.chunks(log, seq);
                trx.clear_range(&begin, &end);
                trx.clear(&key);
                removed += 1;
                first_kept = seq + 1;
            }
            trx.set(&layout.head(log), &layout::encode_head(head.seq, head.hash, first_kept));
            Ok(removed)
        })
    }

    fn published(&self, log: LogName) -> Result<u64, Error> {
        let layout = &self.layout;
        self.run(|trx| async move {
            match trx.get(&layout.published(log), false).await? {
                Some(v) => layout::decode_u64(&v, "published").map_err(malformed),
                None => Ok(0),
            }
        })
    }

    fn set_published(&mut self, log: LogName, seq: u64) -> Result<(), Error> {
        let layout = &self.layout;
        self.run(|trx| async move {
            trx.set(&layout.published(log), &seq.to_be_bytes());
            Ok(())
        })
    }
}
