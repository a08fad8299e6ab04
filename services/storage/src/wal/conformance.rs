//! The conformance suite: the same tests over every backend. A backend that passes keeps the
//! log contiguous, refuses anything but an identical retry at a taken sequence, reads back what
//! it acknowledged, and keeps snapshots, compaction and publishing progress straight.

use toka_contract::record::{Hash, LogName};

use super::memory::MemoryWal;
use super::sqlite::SqliteWal;
use super::{Error, EventKey, Head, Query, SnapshotChunk, StoredRecord, Wal};

/// A chain of `n` records for `log` after `after` (seq, hash), with distinct bodies.
pub(crate) fn chain(after: (u64, Hash), n: u64, tag: &str) -> Vec<StoredRecord> {
    let mut prev = after.1;
    (after.0 + 1..=after.0 + n)
        .map(|seq| {
            let body = format!("{{\"seq\":{seq},\"tag\":\"{tag}\"}}").into_bytes();
            let hash = Hash(*blake3::hash(&[&body[..], &prev.0[..]].concat()).as_bytes());
            let r = StoredRecord {
                seq,
                hash,
                prev_hash: prev,
                time_us: 1_000 * seq,
                body,
                events: vec![
                    EventKey { event_type: "agent.spawned".into(), entity: Some(format!("a{}", seq % 3)) },
                    EventKey { event_type: "task.failed".into(), entity: None },
                ],
            };
            prev = hash;
            r
        })
        .collect()
}

fn strip(records: &[StoredRecord]) -> Vec<StoredRecord> {
    records.iter().map(|r| StoredRecord { events: Vec::new(), ..r.clone() }).collect()
}

fn append_one(wal: &mut dyn Wal, log: LogName, batch: &[StoredRecord]) -> Result<super::Appended, Error> {
    wal.append(&[(log, batch)]).pop().expect("one result per batch")
}

fn head_of(records: &[StoredRecord]) -> (u64, Hash) {
    records.last().map_or((0, Hash::ZERO), |r| (r.seq, r.hash))
}

fn appends_are_contiguous_and_read_back(wal: &mut dyn Wal) {
    let a = chain((0, Hash::ZERO), 5, "a");
    let done = append_one(wal, LogName::Kernel, &a[..3]).unwrap();
    assert_eq!((done.first_seq, done.last_seq, done.duplicate), (1, 3, false));
    append_one(wal, LogName::Kernel, &a[3..]).unwrap();
    assert_eq!(wal.head(LogName::Kernel).unwrap(), Head { seq: 5, hash: a[4].hash, first_seq: 1 });
    assert_eq!(strip(&wal.read(LogName::Kernel, 1, 100, usize::MAX).unwrap()), strip(&a));
    assert_eq!(strip(&wal.read(LogName::Kernel, 4, 100, usize::MAX).unwrap()), strip(&a[3..]));
    assert_eq!(wal.read(LogName::Kernel, 2, 2, usize::MAX).unwrap().len(), 2, "bounded by count");
    assert_eq!(wal.read(LogName::Kernel, 1, 100, 1).unwrap().len(), 1, "bounded by bytes, at least one");
    assert!(wal.read(LogName::Kernel, 6, 100, usize::MAX).unwrap().is_empty());
    // Logs are independent.
    assert_eq!(wal.head(LogName::Audit).unwrap(), Head::EMPTY);
    let b = chain((0, Hash::ZERO), 2, "b");
    append_one(wal, LogName::Audit, &b).unwrap();
    assert_eq!(wal.head(LogName::Audit).unwrap().seq, 2);
}

fn an_identical_retry_succeeds_anything_else_conflicts(wal: &mut dyn Wal) {
    let a = chain((0, Hash::ZERO), 4, "a");
    append_one(wal, LogName::Kernel, &a[..3]).unwrap();
    let again = append_one(wal, LogName::Kernel, &a[..3]).unwrap();
    assert!(again.duplicate, "an identical retry is acknowledged again");
    let partial = append_one(wal, LogName::Kernel, &a[2..]).unwrap();
    assert_eq!(
        (partial.first_seq, partial.last_seq, partial.duplicate),
        (3, 4, false),
        "a retry that overlaps commits the rest"
    );
    let other = chain((0, Hash::ZERO), 2, "other");
    assert!(
        matches!(append_one(wal, LogName::Kernel, &other), Err(Error::Conflict { next_seq: 5, .. })),
        "different content at a taken sequence"
    );
    let gap = chain((6, a[3].hash), 1, "gap");
    assert!(matches!(append_one(wal, LogName::Kernel, &gap), Err(Error::Conflict { next_seq: 5, .. })), "a gap");
    let unlinked = chain((4, Hash([7; 32])), 1, "unlinked");
    assert!(
        matches!(append_one(wal, LogName::Kernel, &unlinked), Err(Error::Conflict { .. })),
        "not linked to the head"
    );
    assert_eq!(wal.head(LogName::Kernel).unwrap().seq, 4, "refusals change nothing");
}

fn group_commit_keeps_batches_independent(wal: &mut dyn Wal) {
    let a = chain((0, Hash::ZERO), 3, "a");
    let bad = chain((5, Hash::ZERO), 1, "bad");
    let b = chain((0, Hash::ZERO), 2, "b");
    let results = wal.append(&[(LogName::Kernel, &a[..]), (LogName::Kernel, &bad[..]), (LogName::Audit, &b[..])]);
    assert!(results[0].is_ok() && results[1].is_err() && results[2].is_ok(), "{results:?}");
    // Two batches of one log in one commit chain onto each other.
    let c = chain(head_of(&a), 4, "c");
    let results = wal.append(&[(LogName::Kernel, &c[..2]), (LogName::Kernel, &c[2..])]);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(wal.head(LogName::Kernel).unwrap().seq, 7);
}

fn queries_find_events_by_entity_type_and_time(wal: &mut dyn Wal) {
    let a = chain((0, Hash::ZERO), 9, "a");
    append_one(wal, LogName::Kernel, &a).unwrap();
    let all = |q: Query| wal.query(LogName::Kernel, &Query { limit: 100, ..q }).unwrap();
    let by_entity = all(Query { entity: Some("a1".into()), ..Query::default() });
    assert_eq!(by_entity.iter().map(|h| (h.seq, h.idx)).collect::<Vec<_>>(), [(1, 0), (4, 0), (7, 0)]);
    let by_type = all(Query { event_type: Some("task.failed".into()), ..Query::default() });
    assert_eq!(by_type.len(), 9);
    assert!(by_type.iter().all(|h| h.idx == 1));
    let by_time = all(Query { from_time_us: Some(3_000), to_time_us: Some(5_000), ..Query::default() });
    assert_eq!(by_time.iter().map(|h| h.seq).collect::<Vec<_>>(), [3, 3, 4, 4]);
    let page = wal.query(LogName::Kernel, &Query { limit: 3, ..Query::default() }).unwrap();
    assert_eq!(page.iter().map(|h| (h.seq, h.idx)).collect::<Vec<_>>(), [(1, 0), (1, 1), (2, 0)]);
    let next = all(Query { after: Some((2, 0)), event_type: Some("agent.spawned".into()), ..Query::default() });
    assert_eq!(next.first().map(|h| (h.seq, h.idx)), Some((3, 0)), "paging resumes after the address");
    assert_eq!(next[0].time_us, 3_000);
}

fn snapshots_complete_then_allow_compaction(wal: &mut dyn Wal) {
    let a = chain((0, Hash::ZERO), 6, "a");
    append_one(wal, LogName::Kernel, &a).unwrap();
    let state = Hash([9; 32]);
    let chunk = |i: u32| SnapshotChunk { seq: 4, state_hash: state, chunk: i, chunks: 2, data: vec![i as u8; 10] };
    assert!(!wal.put_snapshot_chunk(LogName::Kernel, chunk(1)).unwrap());
    assert_eq!(wal.snapshot_chunk(LogName::Kernel, None, 0).unwrap(), None, "an incomplete snapshot is invisible");
    assert!(
        matches!(wal.compact(LogName::Kernel, 2), Err(Error::Invalid(_))),
        "no compaction without a complete snapshot"
    );
    assert!(wal.put_snapshot_chunk(LogName::Kernel, chunk(0)).unwrap());
    assert_eq!(wal.snapshot_chunk(LogName::Kernel, None, 1).unwrap(), Some(chunk(1)));
    assert_eq!(wal.snapshot_chunk(LogName::Kernel, Some(3), 0).unwrap(), None, "none at or before 3");
    assert!(matches!(
        wal.put_snapshot_chunk(LogName::Kernel, SnapshotChunk { chunk: 2, ..chunk(0) }),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        wal.put_snapshot_chunk(LogName::Kernel, SnapshotChunk { state_hash: Hash::ZERO, ..chunk(0) }),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        wal.put_snapshot_chunk(LogName::Kernel, SnapshotChunk { seq: 9, ..chunk(0) }),
        Err(Error::Invalid(_))
    ));
    assert!(matches!(wal.compact(LogName::Kernel, 5), Err(Error::Invalid(_))), "not past the snapshot");
    assert_eq!(wal.compact(LogName::Kernel, 4).unwrap(), 4);
    assert_eq!(wal.head(LogName::Kernel).unwrap(), Head { seq: 6, hash: a[5].hash, first_seq: 5 });
    assert_eq!(wal.read(LogName::Kernel, 1, 100, usize::MAX).unwrap()[0].seq, 5);
    // The log goes on after compaction; a retry of a compacted record is refused, not guessed.
    let more = chain(head_of(&a), 1, "more");
    append_one(wal, LogName::Kernel, &more).unwrap();
    assert_eq!(wal.head(LogName::Kernel).unwrap(), Head { seq: 7, hash: more[0].hash, first_seq: 5 });
    assert!(matches!(append_one(wal, LogName::Kernel, &a[..1]), Err(Error::Conflict { .. })));
    assert_eq!(wal.head(LogName::Kernel).unwrap(), Head { seq: 7, hash: more[0].hash, first_seq: 5 });
}

fn only_the_newest_snapshots_are_kept(wal: &mut dyn Wal) {
    let a = chain((0, Hash::ZERO), 8, "a");
    append_one(wal, LogName::Kernel, &a).unwrap();
    let chunk = |seq: u64, i: u32| SnapshotChunk {
        seq,
        state_hash: Hash([seq as u8; 32]),
        chunk: i,
        chunks: 2,
        data: vec![seq as u8; 4],
    };
    let newest_at = |wal: &dyn Wal, at: u64| wal.snapshot_chunk(LogName::Kernel, Some(at), 0).unwrap().map(|c| c.seq);
    // Complete snapshots at 2, 4 and 6; one left incomplete at 3; one on the other log.
    for seq in [2, 4] {
        wal.put_snapshot_chunk(LogName::Kernel, chunk(seq, 0)).unwrap();
        assert!(wal.put_snapshot_chunk(LogName::Kernel, chunk(seq, 1)).unwrap());
    }
    wal.put_snapshot_chunk(LogName::Kernel, chunk(3, 0)).unwrap();
    append_one(wal, LogName::Audit, &chain((0, Hash::ZERO), 2, "x")).unwrap();
    wal.put_snapshot_chunk(LogName::Audit, chunk(1, 0)).unwrap();
    assert!(wal.put_snapshot_chunk(LogName::Audit, chunk(1, 1)).unwrap());
    assert_eq!(newest_at(wal, 2), Some(2), "two complete snapshots are both kept");
    wal.put_snapshot_chunk(LogName::Kernel, chunk(6, 1)).unwrap();
    assert_eq!(newest_at(wal, 3), Some(2), "an incomplete snapshot removes nothing");
    assert!(wal.put_snapshot_chunk(LogName::Kernel, chunk(6, 0)).unwrap());
    assert_eq!(newest_at(wal, 8), Some(6));
    assert_eq!(newest_at(wal, 5), Some(4), "the one before the newest is kept");
    assert_eq!(newest_at(wal, 3), None, "older snapshots are gone");
    assert!(
        !wal.put_snapshot_chunk(LogName::Kernel, chunk(3, 1)).unwrap(),
        "the incomplete one before them is gone too: its first chunk must come again"
    );
    assert_eq!(wal.snapshot_chunk(LogName::Audit, None, 1).unwrap(), Some(chunk(1, 1)), "other logs keep theirs");
    // Compaction still reaches the newest snapshot.
    assert_eq!(wal.compact(LogName::Kernel, 6).unwrap(), 6);
}

fn publishing_progress_is_kept(wal: &mut dyn Wal) {
    assert_eq!(wal.published(LogName::Kernel).unwrap(), 0);
    wal.set_published(LogName::Kernel, 12).unwrap();
    assert_eq!(wal.published(LogName::Kernel).unwrap(), 12);
    assert_eq!(wal.published(LogName::Audit).unwrap(), 0);
}

/// A conformance case: a name and a check run on a fresh WAL.
type Case = (&'static str, fn(&mut dyn Wal));

/// Every case, each on a fresh WAL from `new`.
fn suite(mut new: impl FnMut() -> Box<dyn Wal>) {
    let cases: [Case; 7] = [
        ("appends_are_contiguous_and_read_back", appends_are_contiguous_and_read_back),
        ("an_identical_retry_succeeds_anything_else_conflicts", an_identical_retry_succeeds_anything_else_conflicts),
        ("group_commit_keeps_batches_independent", group_commit_keeps_batches_independent),
        ("queries_find_events_by_entity_type_and_time", queries_find_events_by_entity_type_and_time),
        ("snapshots_complete_then_allow_compaction", snapshots_complete_then_allow_compaction),
        ("only_the_newest_snapshots_are_kept", only_the_newest_snapshots_are_kept),
        ("publishing_progress_is_kept", publishing_progress_is_kept),
    ];
    for (name, case) in cases {
        let mut wal = new();
        eprintln!("conformance[{}]: {name}", wal.backend());
        case(wal.as_mut());
    }
}

/// A directory removed on drop.
#[test]
fn memory_conforms() {
    suite(|| Box::new(MemoryWal::new()));
}

#[test]
fn sqlite_conforms() {
    let dirs = std::cell::RefCell::new(Vec::new());
    suite(|| {
        let dir = tempfile::tempdir().unwrap();
        let wal = SqliteWal::open(dir.path()).unwrap();
        dirs.borrow_mut().push(dir);
        Box::new(wal)
    });
}

/// FoundationDB runs the same suite where a cluster is reachable (`FDB_CLUSTER_FILE`), each
/// case under a prefix of its own.
#[cfg(feature = "fdb")]
#[test]
fn fdb_conforms() {
    let Ok(cluster) = std::env::var("FDB_CLUSTER_FILE") else {
        eprintln!("skipped FoundationDB: FDB_CLUSTER_FILE is not set (no cluster reachable)");
        return;
    };
    let run = std::process::id();
    let mut case = 0;
    suite(|| {
        case += 1;
        Box::new(super::fdb::FdbWal::open(Some(&cluster), &format!("toka-conformance-{run}-{case}")).unwrap())
    });
}

#[test]
fn sqlite_keeps_what_it_acknowledged_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let a = chain((0, Hash::ZERO), 3, "a");
    {
        let mut wal = SqliteWal::open(dir.path()).unwrap();
        assert_eq!(wal.synchronous().unwrap(), 2, "synchronous=FULL: every commit is fsynced");
        append_one(&mut wal, LogName::Kernel, &a).unwrap();
        wal.set_published(LogName::Kernel, 2).unwrap();
    }
    let wal = SqliteWal::open(dir.path()).unwrap();
    assert_eq!(wal.head(LogName::Kernel).unwrap(), Head { seq: 3, hash: a[2].hash, first_seq: 1 });
    assert_eq!(strip(&wal.read(LogName::Kernel, 1, 10, usize::MAX).unwrap()), strip(&a));
    assert_eq!(wal.published(LogName::Kernel).unwrap(), 2);
}

#[test]
fn sqlite_writes_the_publish_marker_with_the_next_commit_not_an_fsync_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let stored = |dir: &std::path::Path| -> Option<i64> {
        let conn = rusqlite::Connection::open(dir.join("wal.sqlite3")).unwrap();
        conn.query_row("SELECT published_seq FROM logs WHERE log = 'kernel'", [], |r| r.get(0)).ok()
    };
    let a = chain((0, Hash::ZERO), 2, "a");
    let mut wal = SqliteWal::open(dir.path()).unwrap();
    append_one(&mut wal, LogName::Kernel, &a).unwrap();
    wal.set_published(LogName::Kernel, 2).unwrap();
    assert_eq!(wal.published(LogName::Kernel).unwrap(), 2, "the WAL answers with the marker at once");
    assert_eq!(stored(dir.path()), None, "but has not written it yet");
    let b = chain(head_of(&a), 1, "b");
    append_one(&mut wal, LogName::Kernel, &b).unwrap();
    assert_eq!(stored(dir.path()), Some(2), "the next commit carried it");
    wal.set_published(LogName::Kernel, 3).unwrap();
    drop(wal);
    assert_eq!(stored(dir.path()), Some(3), "a clean close writes what is left");
}

#[test]
fn sqlite_admits_one_process_per_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let _first = SqliteWal::open(dir.path()).unwrap();
    let second = SqliteWal::open(dir.path()).unwrap_err();
    assert!(second.to_string().contains("in use by another toka-storage process"), "{second}");
}

/// Every event of `records` as (seq, idx) that `pick` accepts, in log order.
fn expected_hits(records: &[StoredRecord], pick: impl Fn(&EventKey) -> bool) -> Vec<(u64, u16)> {
    let mut out = Vec::new();
    for r in records {
        for (idx, key) in r.events.iter().enumerate() {
            if pick(key) {
                out.push((r.seq, idx as u16));
            }
        }
    }
    out
}

/// Pages through `query` 5 hits at a time.
fn paged(wal: &dyn Wal, query: &Query) -> Vec<(u64, u16)> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = wal.query(LogName::Kernel, &Query { after, limit: 5, ..query.clone() }).unwrap();
        out.extend(page.iter().map(|h| (h.seq, h.idx)));
        match page.last() {
            Some(h) if page.len() == 5 => after = Some((h.seq, h.idx)),
            _ => return out,
        }
    }
}

fn indexed_rows(dir: &std::path::Path) -> (i64, i64) {
    let conn = rusqlite::Connection::open(dir.join("wal.sqlite3")).unwrap();
    let rows = conn.query_row("SELECT count(*) FROM events WHERE log = 'kernel'", [], |r| r.get(0)).unwrap();
    let seq = conn.query_row("SELECT indexed_seq FROM logs WHERE log = 'kernel'", [], |r| r.get(0)).unwrap_or(0);
    (rows, seq)
}

#[test]
fn sqlite_indexes_events_behind_the_log_and_queries_still_see_every_one() {
    use super::sqlite::INDEX_EVERY;
    let dir = tempfile::tempdir().unwrap();
    let total = INDEX_EVERY as u64 + 40;
    let records = chain((0, Hash::ZERO), total, "a");
    let check = |wal: &dyn Wal, upto: usize| {
        let seen = &records[..upto];
        let entity = Query { entity: Some("a1".into()), ..Query::default() };
        assert_eq!(paged(wal, &entity), expected_hits(seen, |k| k.entity.as_deref() == Some("a1")));
        let failed = Query { event_type: Some("task.failed".into()), ..Query::default() };
        assert_eq!(paged(wal, &failed), expected_hits(seen, |k| k.event_type == "task.failed"));
        // Time bounds that straddle what is indexed and what is not.
        let (from, to) = (1_000 * (INDEX_EVERY as u64 - 3), 1_000 * (INDEX_EVERY as u64 + 3));
        let window = Query { from_time_us: Some(from), to_time_us: Some(to), ..Query::default() };
        let in_window: Vec<_> = seen.iter().filter(|r| r.time_us >= from && r.time_us < to).cloned().collect();
        assert_eq!(paged(wal, &window), expected_hits(&in_window, |_| true));
    };
    let mut wal = SqliteWal::open(dir.path()).unwrap();
    let mut appended = 0;
    for batch in records.chunks(7) {
        append_one(&mut wal, LogName::Kernel, batch).unwrap();
        appended += batch.len();
        let (rows, seq) = indexed_rows(dir.path());
        if appended < INDEX_EVERY {
            assert_eq!((rows, seq), (0, 0), "nothing is indexed in the commits before {INDEX_EVERY} records wait");
        } else {
            assert!(seq as usize >= INDEX_EVERY && seq as usize <= appended, "indexed through {seq} of {appended}");
            assert_eq!(rows, 2 * seq, "every event of the indexed records, once");
        }
        if appended % 70 == 0 || appended == records.len() {
            check(&wal, appended);
        }
    }
    // After a restart the records not indexed yet are read back from their rows.
    let (_, indexed) = indexed_rows(dir.path());
    assert!((indexed as u64) < total, "some records are still waiting for the index");
    drop(wal);
    let mut wal = SqliteWal::open(dir.path()).unwrap();
    check(&wal, records.len());
    // Compaction past the indexed sequence leaves no hit for a removed record.
    let state = Hash([7; 32]);
    let at = total - 5;
    wal.put_snapshot_chunk(
        LogName::Kernel,
        SnapshotChunk { seq: at, state_hash: state, chunk: 0, chunks: 1, data: vec![1] },
    )
    .unwrap();
    wal.compact(LogName::Kernel, at).unwrap();
    let left = paged(&wal, &Query::default());
    assert_eq!(left, expected_hits(&records[at as usize..], |_| true));
    drop(wal);
    let wal = SqliteWal::open(dir.path()).unwrap();
    assert_eq!(paged(&wal, &Query::default()), left, "and none after a restart");
}

#[test]
fn sqlite_opens_a_database_whose_events_were_indexed_in_each_commit() {
    // The layout before events were indexed behind the log: no keys in the records' rows, no
    // indexed sequence; every record's events are in the `events` table.
    let dir = tempfile::tempdir().unwrap();
    let a = chain((0, Hash::ZERO), 4, "a");
    {
        let conn = rusqlite::Connection::open(dir.path().join("wal.sqlite3")).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE records (log TEXT NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL,
                prev_hash BLOB NOT NULL, time_us INTEGER NOT NULL, body BLOB NOT NULL,
                PRIMARY KEY (log, seq)) WITHOUT ROWID;
             CREATE TABLE events (log TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL,
                type TEXT NOT NULL, entity TEXT, time_us INTEGER NOT NULL,
                PRIMARY KEY (log, seq, idx)) WITHOUT ROWID;
             CREATE TABLE logs (log TEXT PRIMARY KEY, compacted_seq INTEGER NOT NULL DEFAULT 0,
                compacted_hash BLOB, published_seq INTEGER NOT NULL DEFAULT 0);",
        )
        .unwrap();
        for r in &a {
            conn.execute(
                "INSERT INTO records VALUES ('kernel', ?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![r.seq as i64, &r.hash.0[..], &r.prev_hash.0[..], r.time_us as i64, &r.body],
            )
            .unwrap();
            for (idx, k) in r.events.iter().enumerate() {
                conn.execute(
                    "INSERT INTO events VALUES ('kernel', ?1, ?2, ?3, ?4, ?5)",
                    rusqlite::params![r.seq as i64, idx as i64, k.event_type, k.entity, r.time_us as i64],
                )
                .unwrap();
            }
        }
    }
    let mut wal = SqliteWal::open(dir.path()).unwrap();
    assert_eq!(indexed_rows(dir.path()), (8, 4), "its records count as indexed");
    assert_eq!(paged(&wal, &Query::default()), expected_hits(&a, |_| true), "each event found once");
    let b = chain(head_of(&a), 2, "b");
    append_one(&mut wal, LogName::Kernel, &b).unwrap();
    let all: Vec<_> = a.iter().chain(&b).cloned().collect();
    assert_eq!(paged(&wal, &Query::default()), expected_hits(&all, |_| true));
}
