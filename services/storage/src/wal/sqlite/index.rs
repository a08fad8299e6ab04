//! Events indexed behind the log: a record keeps its events' index keys in its row, and the
//! `events` table (with its indexes by entity and by type) catches up [`INDEX_EVERY`] records at
//! a time, inside the commit that brings that many to wait. Queries add the records not indexed
//! yet from memory, so they see every committed event.

use std::collections::BTreeMap;

use rusqlite::{Connection, OptionalExtension as _, params};
use toka_contract::record::LogName;

use super::{Error, io, seq_i64};
use crate::wal::{EventKey, Hit, Query};

/// How many committed records may wait to be indexed; the commit that reaches this many
/// indexes them all.
pub const INDEX_EVERY: usize = 256;

/// A committed record whose events are not in the `events` table yet.
#[derive(Debug, Clone)]
pub(super) struct Unindexed {
    pub(super) log: LogName,
    pub(super) seq: u64,
    pub(super) time_us: u64,
    pub(super) events: Vec<EventKey>,
}

/// A record's index keys as kept in its row: `[[type, entity or null], ...]`.
pub(super) fn encode_keys(events: &[EventKey]) -> Result<Vec<u8>, Error> {
    let pairs: Vec<(&str, Option<&str>)> =
        events.iter().map(|k| (k.event_type.as_str(), k.entity.as_deref())).collect();
    serde_json::to_vec(&pairs).map_err(io)
}

fn decode_keys(seq: i64, bytes: &[u8]) -> Result<Vec<EventKey>, Error> {
    let pairs: Vec<(String, Option<String>)> = serde_json::from_slice(bytes)
        .map_err(|e| Error::Corrupt(format!("record {seq}: index keys do not decode: {e}")))?;
    Ok(pairs.into_iter().map(|(event_type, entity)| EventKey { event_type, entity }).collect())
}

/// The records committed after each log's indexed sequence, with their index keys.
pub(super) fn unindexed_in(conn: &Connection) -> Result<Vec<Unindexed>, Error> {
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
pub(super) fn index(conn: &Connection, records: &[Unindexed]) -> Result<(), Error> {
    let mut insert = conn
        .prepare_cached(
            "INSERT OR IGNORE INTO events (log, seq, idx, type, entity, time_us) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .map_err(io)?;
    let mut last = BTreeMap::new();
    for r in records {
        let (seq, time) = (seq_i64(r.seq)?, seq_i64(r.time_us)?);
        for (idx, key) in r.events.iter().enumerate() {
            insert.execute(params![r.log.as_str(), seq, idx as i64, key.event_type, key.entity, time]).map_err(io)?;
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

/// The hits of `q` in `log`: from the `events` table, then from the records not indexed yet.
pub(super) fn query(conn: &Connection, unindexed: &[Unindexed], log: LogName, q: &Query) -> Result<Vec<Hit>, Error> {
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
    let mut stmt = conn.prepare_cached(&sql).map_err(io)?;
    let from = q.from_time_us.map(seq_i64).transpose()?;
    let to = q.to_time_us.map(seq_i64).transpose()?;
    let rows = stmt
        .query_map(params![log.as_str(), q.entity, q.event_type, from, to, after_seq, after_idx, q.limit as i64], |r| {
            Ok(Hit {
                seq: r.get::<_, i64>(0)? as u64,
                idx: r.get::<_, i64>(1)? as u16,
                time_us: r.get::<_, i64>(2)? as u64,
            })
        })
        .map_err(io)?;
    let mut hits = rows.collect::<Result<Vec<_>, _>>().map_err(io)?;
    // Records not indexed yet all follow the indexed ones: their hits come after.
    let after = q.after.map(|(s, i)| (s, i64::from(i))).unwrap_or((0, -1));
    for r in unindexed.iter().filter(|r| r.log == log) {
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
