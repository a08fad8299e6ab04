//! The FoundationDB data layout, as pure functions: keys through the tuple layer in a
//! configurable subspace, values chunked under FoundationDB's 100 kB limit, batches split
//! inside its 10 MB / 5 s transaction limits. No FoundationDB client is needed here, so these
//! are tested everywhere; the `fdb` backend (feature `fdb`) only moves these bytes.
//!
//! ```text
//! (<prefix>, "h", log)                      → head: seq u64 ‖ hash 32 ‖ first_seq u64
//! (<prefix>, "m", log, seq)                 → record meta: hash 32 ‖ prev_hash 32 ‖ time_us u64 ‖ chunks u32
//! (<prefix>, "r", log, seq, chunk)          → record body, chunk by chunk
//! (<prefix>, "v", log, seq, idx)            → event: time_us u64 (scans by time)
//! (<prefix>, "e", log, entity, seq, idx)    → event by entity: time_us u64
//! (<prefix>, "t", log, type, seq, idx)      → event by type: time_us u64
//! (<prefix>, "p", log)                      → published_seq u64
//! (<prefix>, "s", log, seq)                 → snapshot meta: state_hash 32 ‖ chunks u32
//! (<prefix>, "c", log, seq, chunk)          → snapshot chunk
//! ```
//!
//! Integers in keys use the tuple layer's order-preserving encoding, so a range read returns
//! records in sequence order.

use std::ops::Range;

use foundationdb_tuple::Subspace;
use toka_contract::record::{Hash, LogName};

/// FoundationDB's largest value, in bytes.
pub const VALUE_LIMIT: usize = 100_000;
/// FoundationDB's largest transaction, in bytes.
pub const TRANSACTION_LIMIT: usize = 10_000_000;
/// What one Toka transaction may write, with headroom under [`TRANSACTION_LIMIT`].
pub const TRANSACTION_BUDGET: usize = 8_000_000;
/// The most records one transaction writes, to stay well inside FoundationDB's 5 s.
pub const TRANSACTION_RECORDS: usize = 2_000;

/// Why a layout operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A single record is larger than a transaction may be.
    #[error("record {index} needs {bytes} bytes, over FoundationDB's {TRANSACTION_LIMIT}-byte transaction limit")]
    TooLarge {
        /// Its index in the batch.
        index: usize,
        /// Its estimated size.
        bytes: usize,
    },
    /// A stored value does not have the expected shape.
    #[error("malformed {what} value ({len} bytes)")]
    Malformed {
        /// Which value.
        what: &'static str,
        /// Its length.
        len: usize,
    },
}

/// Keys of one Toka deployment, under a prefix.
#[derive(Debug, Clone)]
pub struct Layout {
    root: Subspace,
}

impl Layout {
    /// The layout under the tuple `(prefix,)`.
    pub fn new(prefix: &str) -> Layout {
        Layout { root: Subspace::all().subspace(&(prefix,)) }
    }

    /// Every key of the deployment, as a range.
    pub fn range(&self) -> (Vec<u8>, Vec<u8>) {
        self.root.range()
    }

    /// The head of `log`.
    pub fn head(&self, log: LogName) -> Vec<u8> {
        self.root.pack(&("h", log.as_str()))
    }

    /// A record's metadata.
    pub fn meta(&self, log: LogName, seq: u64) -> Vec<u8> {
        self.root.pack(&("m", log.as_str(), seq))
    }

    /// Record metadata from `from_seq` on, as a range.
    pub fn meta_range(&self, log: LogName, from_seq: u64) -> (Vec<u8>, Vec<u8>) {
        (self.meta(log, from_seq), self.root.subspace(&("m", log.as_str())).range().1)
    }

    /// The sequence a metadata key names.
    pub fn meta_seq(&self, key: &[u8]) -> Option<u64> {
        self.root.unpack::<(String, String, u64)>(key).ok().map(|(_, _, seq)| seq)
    }

    /// One chunk of a record's body.
    pub fn chunk(&self, log: LogName, seq: u64, chunk: u32) -> Vec<u8> {
        self.root.pack(&("r", log.as_str(), seq, chunk))
    }

    /// Every chunk of a record's body, as a range.
    pub fn chunks(&self, log: LogName, seq: u64) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("r", log.as_str(), seq)).range()
    }

    /// An event, for scans by time.
    pub fn event(&self, log: LogName, seq: u64, idx: u16) -> Vec<u8> {
        self.root.pack(&("v", log.as_str(), seq, idx))
    }

    /// Events of `log` after (`seq`, `idx`), as a range.
    pub fn events_after(&self, log: LogName, after: Option<(u64, u16)>) -> (Vec<u8>, Vec<u8>) {
        after_in(&self.root.subspace(&("v", log.as_str())), after)
    }

    /// An event in the entity index.
    pub fn by_entity(&self, log: LogName, entity: &str, seq: u64, idx: u16) -> Vec<u8> {
        self.root.pack(&("e", log.as_str(), entity, seq, idx))
    }

    /// Events about `entity` after (`seq`, `idx`), as a range.
    pub fn entity_after(&self, log: LogName, entity: &str, after: Option<(u64, u16)>) -> (Vec<u8>, Vec<u8>) {
        after_in(&self.root.subspace(&("e", log.as_str(), entity)), after)
    }

    /// An event in the type index.
    pub fn by_type(&self, log: LogName, event_type: &str, seq: u64, idx: u16) -> Vec<u8> {
        self.root.pack(&("t", log.as_str(), event_type, seq, idx))
    }

    /// Events of `event_type` after (`seq`, `idx`), as a range.
    pub fn type_after(&self, log: LogName, event_type: &str, after: Option<(u64, u16)>) -> (Vec<u8>, Vec<u8>) {
        after_in(&self.root.subspace(&("t", log.as_str(), event_type)), after)
    }

    /// The `(seq, idx)` at the end of any event-index key.
    pub fn event_address(&self, key: &[u8]) -> Option<(u64, u16)> {
        let v: Vec<foundationdb_tuple::Element<'_>> = self.root.unpack(key).ok()?;
        match v.as_slice() {
            [.., foundationdb_tuple::Element::Int(seq), foundationdb_tuple::Element::Int(idx)] => {
                Some((u64::try_from(*seq).ok()?, u16::try_from(*idx).ok()?))
            }
            _ => None,
        }
    }

    /// The published marker of `log`.
    pub fn published(&self, log: LogName) -> Vec<u8> {
        self.root.pack(&("p", log.as_str()))
    }

    /// A snapshot's metadata.
    pub fn snapshot(&self, log: LogName, seq: u64) -> Vec<u8> {
        self.root.pack(&("s", log.as_str(), seq))
    }

    /// Snapshot metadata at or before `seq`, as a range.
    pub fn snapshots_through(&self, log: LogName, seq: u64) -> (Vec<u8>, Vec<u8>) {
        let space = self.root.subspace(&("s", log.as_str()));
        let mut end = space.pack(&(seq,));
        end.push(0xff);
        (space.range().0, end)
    }

    /// The sequence a snapshot-metadata key names.
    pub fn snapshot_seq(&self, key: &[u8]) -> Option<u64> {
        self.root.unpack::<(String, String, u64)>(key).ok().map(|(_, _, seq)| seq)
    }

    /// A snapshot chunk.
    pub fn snapshot_chunk(&self, log: LogName, seq: u64, chunk: u32) -> Vec<u8> {
        self.root.pack(&("c", log.as_str(), seq, chunk))
    }

    /// Every snapshot of `log` before `seq`, its metadata and its chunks, as two ranges.
    pub fn snapshots_before(&self, log: LogName, seq: u64) -> [(Vec<u8>, Vec<u8>); 2] {
        let metas = self.root.subspace(&("s", log.as_str()));
        let chunks = self.root.subspace(&("c", log.as_str()));
        [(metas.range().0, metas.pack(&(seq,))), (chunks.range().0, chunks.pack(&(seq,)))]
    }

    /// Every chunk of a snapshot, as a range.
    pub fn snapshot_chunks(&self, log: LogName, seq: u64) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("c", log.as_str(), seq)).range()
    }
}

/// The keys `(seq, idx)` of `space` strictly after `after` (all of them for `None`).
fn after_in(space: &Subspace, after: Option<(u64, u16)>) -> (Vec<u8>, Vec<u8>) {
    let (all_start, end) = space.range();
    let start = match after {
        Some((seq, idx)) => {
            let mut k = space.pack(&(seq, idx));
            k.push(0xff);
            k
        }
        None => all_start,
    };
    (start, end)
}

/// `value` in pieces of at most [`VALUE_LIMIT`] bytes (one empty piece for an empty value).
pub fn split_value(value: &[u8]) -> Vec<&[u8]> {
    if value.is_empty() {
        return vec![value];
    }
    value.chunks(VALUE_LIMIT).collect()
}

/// What writing a record costs a transaction, in bytes: its body, its keys and metadata, and
/// its index entries.
pub fn record_cost(body_len: usize, events: usize) -> usize {
    const KEY: usize = 64;
    const META: usize = 32 + 32 + 8 + 4;
    body_len + body_len.div_ceil(VALUE_LIMIT).max(1) * KEY + KEY + META + events * 3 * (KEY + 8)
}

/// Splits records (given their costs) into consecutive groups, each a transaction within
/// [`TRANSACTION_BUDGET`] bytes and [`TRANSACTION_RECORDS`] records. A record over the budget
/// gets a group of its own while it fits FoundationDB's hard limit.
pub fn split_batch(costs: &[usize]) -> Result<Vec<Range<usize>>, Error> {
    let mut groups = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &cost) in costs.iter().enumerate() {
        if cost > TRANSACTION_LIMIT - 100_000 {
            return Err(Error::TooLarge { index: i, bytes: cost });
        }
        if i > start && (bytes + cost > TRANSACTION_BUDGET || i - start >= TRANSACTION_RECORDS) {
            groups.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes += cost;
    }
    if start < costs.len() {
        groups.push(start..costs.len());
    }
    Ok(groups)
}

/// A record's metadata value.
pub fn encode_meta(hash: Hash, prev_hash: Hash, time_us: u64, chunks: u32) -> Vec<u8> {
    [&hash.0[..], &prev_hash.0[..], &time_us.to_be_bytes(), &chunks.to_be_bytes()].concat()
}

/// Decodes [`encode_meta`].
pub fn decode_meta(v: &[u8]) -> Result<(Hash, Hash, u64, u32), Error> {
    let bad = Error::Malformed { what: "record meta", len: v.len() };
    if v.len() != 76 {
        return Err(bad);
    }
    let hash = Hash(v[..32].try_into().map_err(|_| bad.clone())?);
    let prev = Hash(v[32..64].try_into().map_err(|_| bad.clone())?);
    let time = u64::from_be_bytes(v[64..72].try_into().map_err(|_| bad.clone())?);
    let chunks = u32::from_be_bytes(v[72..76].try_into().map_err(|_| bad)?);
    Ok((hash, prev, time, chunks))
}

/// A head value.
pub fn encode_head(seq: u64, hash: Hash, first_seq: u64) -> Vec<u8> {
    [&seq.to_be_bytes()[..], &hash.0[..], &first_seq.to_be_bytes()].concat()
}

/// Decodes [`encode_head`].
pub fn decode_head(v: &[u8]) -> Result<(u64, Hash, u64), Error> {
    let bad = Error::Malformed { what: "head", len: v.len() };
    if v.len() != 48 {
        return Err(bad);
    }
    let seq = u64::from_be_bytes(v[..8].try_into().map_err(|_| bad.clone())?);
    let hash = Hash(v[8..40].try_into().map_err(|_| bad.clone())?);
    let first = u64::from_be_bytes(v[40..48].try_into().map_err(|_| bad)?);
    Ok((seq, hash, first))
}

/// An event-index value: time ‖ type length ‖ type ‖ entity (so any index can filter on all).
pub fn encode_event(time_us: u64, event_type: &str, entity: Option<&str>) -> Vec<u8> {
    let t = &event_type.as_bytes()[..event_type.len().min(255)];
    [&time_us.to_be_bytes()[..], &[t.len() as u8], t, entity.unwrap_or("").as_bytes()].concat()
}

/// Decodes [`encode_event`]: (time, type, entity).
pub fn decode_event(v: &[u8]) -> Result<(u64, &str, Option<&str>), Error> {
    let bad = || Error::Malformed { what: "event index", len: v.len() };
    let time = u64::from_be_bytes(v.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let n = *v.get(8).ok_or_else(bad)? as usize;
    let t = std::str::from_utf8(v.get(9..9 + n).ok_or_else(bad)?).map_err(|_| bad())?;
    let e = std::str::from_utf8(&v[9 + n..]).map_err(|_| bad())?;
    Ok((time, t, (!e.is_empty()).then_some(e)))
}

/// A big-endian u64 value.
pub fn decode_u64(v: &[u8], what: &'static str) -> Result<u64, Error> {
    v.try_into().map(u64::from_be_bytes).map_err(|_| Error::Malformed { what, len: v.len() })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keys_are_tuples_under_the_prefix() {
        let layout = Layout::new("toka");
        // The tuple layer's published encoding: 0x02 string 0x00, integers 0x14 + length.
        assert_eq!(layout.head(LogName::Kernel), b"\x02toka\x00\x02h\x00\x02kernel\x00");
        assert_eq!(layout.meta(LogName::Audit, 1), b"\x02toka\x00\x02m\x00\x02audit\x00\x15\x01");
        assert_eq!(layout.chunk(LogName::Kernel, 258, 0), b"\x02toka\x00\x02r\x00\x02kernel\x00\x16\x01\x02\x14");
        let (start, end) = layout.range();
        for key in [
            layout.head(LogName::Kernel),
            layout.snapshot_chunk(LogName::Audit, 9, 3),
            layout.by_entity(LogName::Kernel, "x", 1, 0),
        ] {
            assert!(start < key && key < end);
        }
        let other = Layout::new("tokb");
        assert!(other.head(LogName::Kernel) > end || other.head(LogName::Kernel) < start, "prefixes do not overlap");
        assert_eq!(layout.meta_seq(&layout.meta(LogName::Kernel, 77)), Some(77));
        assert_eq!(layout.snapshot_seq(&layout.snapshot(LogName::Kernel, 12)), Some(12));
        assert_eq!(layout.event_address(&layout.by_type(LogName::Kernel, "task.failed", 5, 2)), Some((5, 2)));
        assert_eq!(layout.event_address(&layout.event(LogName::Kernel, 6, 0)), Some((6, 0)));
    }

    #[test]
    fn ranges_start_after_the_address_given() {
        let layout = Layout::new("toka");
        let (start, end) = layout.entity_after(LogName::Kernel, "a", Some((3, 1)));
        assert!(layout.by_entity(LogName::Kernel, "a", 3, 1) < start);
        assert!(start <= layout.by_entity(LogName::Kernel, "a", 3, 2));
        assert!(layout.by_entity(LogName::Kernel, "a", u64::MAX, 9) < end);
        assert!(layout.by_entity(LogName::Kernel, "b", 0, 0) >= end, "another entity is outside");
        let (start, end) = layout.snapshots_through(LogName::Kernel, 10);
        assert!(start <= layout.snapshot(LogName::Kernel, 0) && layout.snapshot(LogName::Kernel, 10) < end);
        assert!(layout.snapshot(LogName::Kernel, 11) >= end);
        let [(metas, metas_end), (chunks, chunks_end)] = layout.snapshots_before(LogName::Kernel, 10);
        let inside = |k: &[u8], (s, e): (&[u8], &[u8])| s <= k && k < e;
        assert!(inside(&layout.snapshot(LogName::Kernel, 0), (&metas, &metas_end)));
        assert!(inside(&layout.snapshot(LogName::Kernel, 9), (&metas, &metas_end)));
        assert!(!inside(&layout.snapshot(LogName::Kernel, 10), (&metas, &metas_end)), "the kept one stays");
        assert!(!inside(&layout.snapshot(LogName::Audit, 1), (&metas, &metas_end)), "another log stays");
        assert!(inside(&layout.snapshot_chunk(LogName::Kernel, 9, u32::MAX), (&chunks, &chunks_end)));
        assert!(!inside(&layout.snapshot_chunk(LogName::Kernel, 10, 0), (&chunks, &chunks_end)));
        assert!(!inside(&layout.snapshot_chunk(LogName::Audit, 1, 0), (&chunks, &chunks_end)));
    }

    proptest! {
        #[test]
        fn key_order_is_sequence_order(a in any::<u64>(), b in any::<u64>(), ca in any::<u32>(), cb in any::<u32>()) {
            let layout = Layout::new("toka");
            prop_assert_eq!(layout.chunk(LogName::Kernel, a, ca).cmp(&layout.chunk(LogName::Kernel, b, cb)), (a, ca).cmp(&(b, cb)));
            prop_assert_eq!(layout.meta(LogName::Kernel, a).cmp(&layout.meta(LogName::Kernel, b)), a.cmp(&b));
            let (start, end) = layout.meta_range(LogName::Kernel, a);
            let key = layout.meta(LogName::Kernel, b);
            prop_assert_eq!(start <= key && key < end, b >= a);
        }

        #[test]
        fn values_split_under_the_limit_and_reassemble(len in 0usize..450_000) {
            let value: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let pieces = split_value(&value);
            prop_assert!(pieces.iter().all(|p| p.len() <= VALUE_LIMIT));
            prop_assert_eq!(pieces.len(), len.div_ceil(VALUE_LIMIT).max(1));
            prop_assert_eq!(pieces.concat(), value);
        }

        #[test]
        fn batches_split_inside_the_transaction_limits(costs in proptest::collection::vec(1usize..3_000_000, 0..60)) {
            let groups = split_batch(&costs).unwrap();
            let mut next = 0;
            for g in &groups {
                prop_assert_eq!(g.start, next, "groups are consecutive and cover every record");
                prop_assert!(!g.is_empty());
                let bytes: usize = costs[g.clone()].iter().sum();
                prop_assert!(g.len() <= TRANSACTION_RECORDS);
                prop_assert!(bytes <= TRANSACTION_BUDGET || g.len() == 1, "{} bytes in {} records", bytes, g.len());
                next = g.end;
            }
            prop_assert_eq!(next, costs.len());
        }
    }

    #[test]
    fn many_small_records_split_by_count_and_a_huge_one_is_refused() {
        let groups = split_batch(&[100; 4_500]).unwrap();
        assert_eq!(groups, [0..2_000, 2_000..4_000, 4_000..4_500]);
        assert_eq!(split_batch(&[10, 9_950_000]), Err(Error::TooLarge { index: 1, bytes: 9_950_000 }));
        assert!(record_cost(250_000, 2) > 250_000);
    }

    #[test]
    fn values_round_trip() {
        let (h, p) = (Hash([1; 32]), Hash([2; 32]));
        assert_eq!(decode_meta(&encode_meta(h, p, 7, 3)).unwrap(), (h, p, 7, 3));
        assert_eq!(decode_head(&encode_head(9, h, 4)).unwrap(), (9, h, 4));
        assert!(decode_meta(b"short").is_err());
        assert!(decode_head(&[0; 47]).is_err());
        assert_eq!(decode_u64(&5u64.to_be_bytes(), "x").unwrap(), 5);
        assert_eq!(
            decode_event(&encode_event(3, "task.failed", Some("01h"))).unwrap(),
            (3, "task.failed", Some("01h"))
        );
        assert_eq!(decode_event(&encode_event(4, "system.error", None)).unwrap(), (4, "system.error", None));
        assert!(decode_event(&[0; 5]).is_err());
    }
}
