//! Snapshots: stored chunk by chunk, served once complete, the newest few kept.

use rusqlite::{Connection, OptionalExtension as _, params};
use toka_contract::record::LogName;

use super::{Error, hash_of, io, seq_i64};
use crate::wal::{Head, KEEP_SNAPSHOTS, SnapshotChunk, check_chunk};

/// Stores a chunk of a snapshot of `log` (whose head is `head`); whether the snapshot is now
/// complete. Completing one removes every snapshot older than the newest [`KEEP_SNAPSHOTS`].
pub(super) fn put(conn: &mut Connection, log: LogName, head: Head, c: SnapshotChunk) -> Result<bool, Error> {
    check_chunk(&c, head)?;
    let tx = conn.transaction().map_err(io)?;
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
            return Err(Error::Invalid(format!("snapshot at {} was started with another hash or chunk count", c.seq)));
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

/// Chunk `chunk` of the newest complete snapshot of `log` at or before `at_or_before`.
pub(super) fn get(
    conn: &Connection,
    log: LogName,
    at_or_before: Option<u64>,
    chunk: u32,
) -> Result<Option<SnapshotChunk>, Error> {
    let limit = seq_i64(at_or_before.unwrap_or(i64::MAX as u64))?;
    let newest: Option<(i64, Vec<u8>, u32)> = conn
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
    let data: Option<Vec<u8>> = conn
        .query_row(
            "SELECT data FROM snapshot_chunks WHERE log = ?1 AND seq = ?2 AND chunk = ?3",
            params![log.as_str(), seq, chunk],
            |r| r.get(0),
        )
        .optional()
        .map_err(io)?;
    Ok(match data {
        Some(data) => Some(SnapshotChunk { seq: seq as u64, state_hash: hash_of(state_hash)?, chunk, chunks, data }),
        None => None,
    })
}
