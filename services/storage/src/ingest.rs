//! Turning an append request into WAL records: every record is checked before anything is
//! written. A batch with one bad entry is refused whole, with an error that names the entry,
//! the schema and the JSON pointer.

use serde::Deserialize as _;
use serde_json::Value;
use toka_contract::Event;
use toka_contract::record::{self, Hash, LogName};
use toka_contract::schema::Registry;
use toka_contract::wire::{ErrorCode, WireError};

use crate::publish::Outbox;
use crate::wal::{EventKey, StoredRecord};

/// The most records one append may carry.
pub const MAX_BATCH_RECORDS: usize = 10_000;

/// The append request schema of `log`.
pub fn append_schema(log: LogName) -> &'static str {
    match log {
        LogName::Kernel => "api/storage.append.kernel.request.v1.json",
        LogName::Audit => "api/storage.append.audit.request.v1.json",
    }
}

fn bad(entry: usize, message: String) -> WireError {
    WireError::new(ErrorCode::BadRequest, format!("record {entry}: {message}")).with_detail("entry", entry as u64)
}

/// Checks an append request body for `log` and returns its records, ready for the WAL:
/// the request and every record validate against their schemas, each record's hash is its
/// content's, sequences are contiguous from `expected_seq`, and each record links to the one
/// before it (the first one's link to the head is the WAL's to check).
pub fn records(log: LogName, body: &Value) -> Result<Vec<StoredRecord>, WireError> {
    validate(log, body)?;
    checked_records(body)
}

/// Validates an append request against `log`'s schema, naming the failing entry.
fn validate(log: LogName, body: &Value) -> Result<(), WireError> {
    let schema = append_schema(log);
    Registry::global().validate(schema, body).map_err(|e| {
        let entry =
            e.pointer.strip_prefix("/records/").and_then(|p| p.split('/').next()).and_then(|i| i.parse::<u64>().ok());
        let mut w = WireError::from(e);
        if let Some(entry) = entry {
            w = w.with_detail("entry", entry);
        }
        w
    })
}

/// [`records`] for a body already validated against its schema (the services host does that).
pub fn checked_records(body: &Value) -> Result<Vec<StoredRecord>, WireError> {
    checked(body, false).map(|(records, _)| records)
}

/// [`checked_records`], with the append's events as the messages to publish once it is
/// committed.
pub fn checked_with_outbox(log: LogName, body: &Value) -> Result<(Vec<StoredRecord>, Outbox), WireError> {
    let (records, events) = checked(body, true)?;
    Ok((records, Outbox { log, records: events }))
}

/// Each record's (sequence, time, events).
type RecordEvents = Vec<(u64, u64, Vec<Event>)>;

/// The members of a received record that storage reads; the document itself is kept as it
/// came (the schema has checked every member).
#[derive(serde::Deserialize)]
struct Received {
    seq: u64,
    time_us: u64,
    prev_hash: Hash,
    hash: Hash,
    events: Vec<Event>,
}

fn checked(body: &Value, keep_events: bool) -> Result<(Vec<StoredRecord>, RecordEvents), WireError> {
    let expected_seq = body["expected_seq"].as_u64().unwrap_or(0);
    let items = body["records"].as_array().map(Vec::as_slice).unwrap_or_default();
    if items.len() > MAX_BATCH_RECORDS {
        return Err(WireError::too_large(
            format!("{} records; at most {MAX_BATCH_RECORDS} per append", items.len()),
            "storage.append_records",
            MAX_BATCH_RECORDS as u64,
            Some(items.len() as u64),
        ));
    }
    let mut out: Vec<StoredRecord> = Vec::with_capacity(items.len());
    let mut kept = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let record = Received::deserialize(item).map_err(|e| bad(i, e.to_string()))?;
        let expected = expected_seq + i as u64;
        if record.seq != expected {
            return Err(bad(i, format!("seq {} where {expected} was expected", record.seq)));
        }
        if let Some(prev) = out.last()
            && record.prev_hash != prev.hash
        {
            return Err(bad(i, format!("prev_hash {} does not link to record {}", record.prev_hash, prev.seq)));
        }
        // Hashed as received, members sorted: no decoding into a record and encoding again.
        let computed = record::document_hash(item)
            .map_err(|e| bad(i, e.to_string()))?
            .ok_or_else(|| bad(i, "a record is an object".to_owned()))?;
        if computed != record.hash {
            return Err(bad(i, format!("hash {} does not match its content ({computed})", record.hash)));
        }
        let events = record
            .events
            .iter()
            .map(|e: &Event| EventKey { event_type: e.type_name().to_owned(), entity: e.entity() })
            .collect();
        let body = serde_json::to_vec(item).map_err(|e| bad(i, e.to_string()))?;
        if keep_events {
            kept.push((record.seq, record.time_us, record.events));
        }
        out.push(StoredRecord {
            seq: record.seq,
            hash: record.hash,
            prev_hash: record.prev_hash,
            time_us: record.time_us,
            body,
            events,
        });
    }
    Ok((out, kept))
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use toka_contract::AgentId;
    use toka_contract::KernelRecord;
    use toka_contract::testing::{Sample, TIME_US, kernel_chain};

    use super::*;

    fn request(records: &[KernelRecord]) -> Value {
        json!({"expected_seq": records[0].seq, "records": records})
    }

    #[test]
    fn a_valid_batch_becomes_wal_records() {
        let chain = kernel_chain(3, Sample::Resume);
        let out = records(LogName::Kernel, &request(&chain)).unwrap();
        assert_eq!(out.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(out[2].hash, chain[2].hash);
        assert_eq!(
            out[0].events,
            [EventKey {
                event_type: "agent.resumed".into(),
                entity: Some(AgentId::mint(TIME_US + 1, 1, 0).to_string())
            }]
        );
    }

    #[test]
    fn one_bad_entry_refuses_the_batch_naming_it() {
        let chain = kernel_chain(3, Sample::Resume);
        let mut doc = request(&chain);
        doc["records"][2]["op"]["agent"] = json!("not-an-id");
        let err = records(LogName::Kernel, &doc).unwrap_err();
        assert_eq!((err.code, err.details["entry"].clone()), (ErrorCode::BadRequest, json!(2)));
        assert_eq!(err.details["pointer"], "/records/2/op/agent");
        assert_eq!(err.details["schema"], "api/storage.append.kernel.request.v1.json");

        let mut tampered = chain.clone();
        tampered[1].time_us += 1;
        let err = records(LogName::Kernel, &request(&tampered)).unwrap_err();
        assert_eq!(err.details["entry"], json!(1));
        assert!(err.message.contains("does not match its content"), "{}", err.message);

        let mut gap = chain.clone();
        gap.remove(1);
        let err = records(LogName::Kernel, &request(&gap)).unwrap_err();
        assert!(err.message.contains("seq 3 where 2 was expected"), "{}", err.message);

        let mut relinked = chain;
        relinked[2].prev_hash = Hash([1; 32]);
        relinked[2].hash = relinked[2].compute_hash().unwrap();
        let err = records(LogName::Kernel, &request(&relinked)).unwrap_err();
        assert!(err.message.contains("does not link"), "{}", err.message);
    }

    #[test]
    fn a_kernel_record_is_refused_on_the_audit_log() {
        let err = records(LogName::Audit, &request(&kernel_chain(1, Sample::Resume))).unwrap_err();
        assert_eq!(err.details["schema"], "api/storage.append.audit.request.v1.json");
        assert_eq!(err.details["entry"], json!(0));
    }
}
