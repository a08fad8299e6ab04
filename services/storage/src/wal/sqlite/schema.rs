//! The database layout, and bringing a database written by an older layout up to it.

use rusqlite::Connection;

use super::{Error, io};

/// Tables and indexes, created if missing.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS records (
    log TEXT NOT NULL, seq INTEGER NOT NULL, hash BLOB NOT NULL, prev_hash BLOB NOT NULL,
    time_us INTEGER NOT NULL, body BLOB NOT NULL, event_keys BLOB,
    PRIMARY KEY (log, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    log TEXT NOT NULL, seq INTEGER NOT NULL, idx INTEGER NOT NULL, type TEXT NOT NULL,
    entity TEXT, time_us INTEGER NOT NULL,
    PRIMARY KEY (log, seq, idx)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS events_by_entity ON events (log, entity, seq, idx) WHERE entity IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_by_type ON events (log, type, seq, idx);
CREATE TABLE IF NOT EXISTS logs (
    log TEXT PRIMARY KEY, compacted_seq INTEGER NOT NULL DEFAULT 0,
    compacted_hash BLOB, published_seq INTEGER NOT NULL DEFAULT 0,
    indexed_seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS snapshots (
    log TEXT NOT NULL, seq INTEGER NOT NULL, state_hash BLOB NOT NULL, chunks INTEGER NOT NULL,
    PRIMARY KEY (log, seq));
CREATE TABLE IF NOT EXISTS snapshot_chunks (
    log TEXT NOT NULL, seq INTEGER NOT NULL, chunk INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (log, seq, chunk)) WITHOUT ROWID;
";

/// Brings a database written before events were indexed behind the log up to this
/// layout: every record it holds is indexed already.
pub(super) fn migrate(conn: &Connection) -> Result<(), Error> {
    let has = |table: &str, column: &str| -> Result<bool, Error> {
        let mut stmt = conn.prepare(&format!("PRAGMA table_info({table})")).map_err(io)?;
        let names = stmt.query_map([], |r| r.get::<_, String>(1)).map_err(io)?;
        for name in names {
            if name.map_err(io)? == column {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if !has("records", "event_keys")? {
        conn.execute_batch("ALTER TABLE records ADD COLUMN event_keys BLOB").map_err(io)?;
    }
    if !has("logs", "indexed_seq")? {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE logs ADD COLUMN indexed_seq INTEGER NOT NULL DEFAULT 0;
             INSERT OR IGNORE INTO logs (log) SELECT DISTINCT log FROM records;
             UPDATE logs SET indexed_seq = coalesce((SELECT max(seq) FROM records r WHERE r.log = logs.log), 0);
             COMMIT;",
        )
        .map_err(io)?;
    }
    Ok(())
}
