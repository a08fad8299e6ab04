//! Log records and the hash chain.
//!
//! Storage keeps named logs ([`LogName`]), each a contiguous sequence starting at 1. A record is
//! one accepted operation with the events it produced, the sequencer's time, and the hash of the
//! previous record, so each log is a tamper-evident chain:
//!
//! ```text
//! hash = BLAKE3-derive-key("toka record v1", canonical_json(record without "hash"))
//! ```
//!
//! where `canonical_json` is compact JSON with object keys sorted (RFC 8785 for Toka's documents,
//! which hold no floats: a float is an error). Any language can recompute it, for example Python's
//! `json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`. The first
//! record's `prev_hash` is [`Hash::ZERO`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use crate::OpId;
use crate::event::Event;
use crate::op::Operation;
use crate::spec::Principal;

/// The key-derivation context of record hashes; a new record format gets a new context.
const HASH_CONTEXT: &str = "toka record v1";

/// Why a record cannot be hashed or a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A float was found where only integers are allowed.
    #[error("float {0} in a hashed document: Toka hashes integers only")]
    Float(String),
    /// The record could not be turned into JSON.
    #[error("record does not serialize: {0}")]
    Serialize(String),
    /// A hash string is not 64 lowercase hex digits.
    #[error("invalid hash {0:?}: expected 64 lowercase hex digits")]
    Hash(String),
}

/// A named log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogName {
    /// Accepted kernel operations; written only by the kernel; replay rebuilds state from it.
    Kernel,
    /// Access decisions of auth and the kernel.
    Audit,
}

impl LogName {
    /// Every log.
    pub const ALL: [LogName; 2] = [LogName::Kernel, LogName::Audit];

    /// The name as used in subjects and envelopes.
    pub const fn as_str(self) -> &'static str {
        match self {
            LogName::Kernel => "kernel",
            LogName::Audit => "audit",
        }
    }
}

impl fmt::Display for LogName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A BLAKE3 hash; on the wire 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    /// The `prev_hash` of a log's first record.
    pub const ZERO: Hash = Hash([0; 32]);
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Without allocating: records carry two hashes each, so this is on every append's path.
        f.write_str(blake3::Hash::from_bytes(self.0).to_hex().as_str())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({self})")
    }
}

impl std::str::FromStr for Hash {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Hash(s.chars().take(80).collect());
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(bad()),
        };
        let b = s.as_bytes();
        if b.len() != 64 {
            return Err(bad());
        }
        let mut out = [0; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(Hash(out))
    }
}

impl Serialize for Hash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(blake3::Hash::from_bytes(self.0).to_hex().as_str())
    }
}

impl<'de> Deserialize<'de> for Hash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether an access decision allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
}

/// The body of an `audit` record: one access decision (or several identical denials).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEntry {
    /// What was asked, as `<service>.<endpoint>` or an operation type (`token.issue`, `agent.spawn`).
    pub action: String,
    /// On what: a resource in the capability grammar, or a token id (`token:<jti>`).
    pub resource: String,
    /// The decision.
    pub decision: Decision,
    /// Why, for denials.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// How many identical decisions this entry stands for (denials are aggregated per interval).
    pub count: u32,
}

/// One entry of a log: `op` is an [`Operation`] in the `kernel` log and an [`AuditEntry`] in
/// the `audit` log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record<B> {
    /// Position in the log, from 1, contiguous.
    pub seq: u64,
    /// The operation's idempotency key.
    pub op_id: OpId,
    /// Who acted.
    pub principal: Principal,
    /// When, by the sequencer's clock, in microseconds since the Unix epoch.
    pub time_us: u64,
    /// What was done.
    pub op: B,
    /// What it produced; event `idx` is its position here.
    pub events: Vec<Event>,
    /// The previous record's hash ([`Hash::ZERO`] for seq 1).
    pub prev_hash: Hash,
    /// This record's hash.
    pub hash: Hash,
}

/// A record of the `kernel` log.
pub type KernelRecord = Record<Operation>;
/// A record of the `audit` log.
pub type AuditRecord = Record<AuditEntry>;

/// The hashed part of a record: everything but `hash`.
#[derive(Serialize)]
struct Body<'a, B> {
    seq: u64,
    op_id: &'a OpId,
    principal: &'a Principal,
    time_us: u64,
    op: &'a B,
    events: &'a [Event],
    prev_hash: &'a Hash,
}

impl<B: Serialize> Record<B> {
    /// Builds the record and computes its hash.
    #[allow(clippy::too_many_arguments)]
    pub fn seal(
        seq: u64,
        op_id: OpId,
        principal: Principal,
        time_us: u64,
        op: B,
        events: Vec<Event>,
        prev_hash: Hash,
    ) -> Result<Self, Error> {
        let record = Record { seq, op_id, principal, time_us, op, events, prev_hash, hash: Hash::ZERO };
        record.sealed().map(|(record, _)| record)
    }

    /// This record with its hash computed (whatever `hash` held is replaced), and the length of
    /// its compact JSON (what an append's byte bound counts), known from the canonical form the
    /// hash needed anyway.
    pub fn sealed(mut self) -> Result<(Self, usize), Error> {
        let (hash, body_len) = self.hash_and_len()?;
        self.hash = hash;
        // The body's members plus `,"hash":"<64 hex digits>"`.
        Ok((self, body_len + r#","hash":""#.len() + 64 + 1))
    }

    /// The hash this record should carry, recomputed from its content.
    pub fn compute_hash(&self) -> Result<Hash, Error> {
        self.hash_and_len().map(|(hash, _)| hash)
    }

    /// The hash and the length of the canonical JSON it covers.
    fn hash_and_len(&self) -> Result<(Hash, usize), Error> {
        let body = Body {
            seq: self.seq,
            op_id: &self.op_id,
            principal: &self.principal,
            time_us: self.time_us,
            op: &self.op,
            events: &self.events,
            prev_hash: &self.prev_hash,
        };
        let value = serde_json::to_value(&body).map_err(|e| Error::Serialize(e.to_string()))?;
        let canonical = canonical_json(&value)?;
        let mut hasher = blake3::Hasher::new_derive_key(HASH_CONTEXT);
        hasher.update(&canonical);
        Ok((Hash(*hasher.finalize().as_bytes()), canonical.len()))
    }
}

/// The end of a hash chain: the sequence and hash the next record follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chain {
    /// The last record's sequence (0 for an empty log).
    pub seq: u64,
    /// The last record's hash ([`Hash::ZERO`] for an empty log).
    pub hash: Hash,
}

impl Chain {
    /// The start of a log.
    pub const START: Chain = Chain { seq: 0, hash: Hash::ZERO };

    /// Seals the next record onto the chain and moves the end past it; the record, and the
    /// length of its compact JSON.
    pub fn seal<B: Serialize>(
        &mut self,
        op_id: OpId,
        principal: Principal,
        time_us: u64,
        op: B,
        events: Vec<Event>,
    ) -> Result<(Record<B>, usize), Error> {
        let seq = self.seq + 1;
        let unsealed = Record { seq, op_id, principal, time_us, op, events, prev_hash: self.hash, hash: Hash::ZERO };
        let (record, len) = unsealed.sealed()?;
        *self = Chain { seq, hash: record.hash };
        Ok((record, len))
    }
}

/// Where and why a chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("chain broken at seq {seq}: {reason}")]
pub struct ChainBreak {
    /// The first record that does not verify.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Verifies records that follow a record with sequence `prev_seq` and hash `prev_hash`
/// (`0` and [`Hash::ZERO`] from the start of a log): sequence contiguous, links intact, every
/// hash recomputed. Returns the last sequence and hash, or the first break.
pub fn verify_chain<'r, B: Serialize + 'r>(
    records: impl IntoIterator<Item = &'r Record<B>>,
    mut prev_seq: u64,
    mut prev_hash: Hash,
) -> Result<(u64, Hash), ChainBreak> {
    for r in records {
        let fail = |reason: String| ChainBreak { seq: r.seq, reason };
        if r.seq != prev_seq + 1 {
            return Err(fail(format!("expected seq {}", prev_seq + 1)));
        }
        if r.prev_hash != prev_hash {
            return Err(fail(format!(
                "prev_hash {} does not match the previous record's hash {prev_hash}",
                r.prev_hash
            )));
        }
        let computed = r.compute_hash().map_err(|e| fail(e.to_string()))?;
        if computed != r.hash {
            return Err(fail(format!("content hashes to {computed}, record says {}", r.hash)));
        }
        prev_seq = r.seq;
        prev_hash = r.hash;
    }
    Ok((prev_seq, prev_hash))
}

/// Compact JSON with object keys sorted by their UTF-16 code units (RFC 8785); floats refused.
pub fn canonical_json(value: &Value) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(256);
    write_canonical(value, &mut out)?;
    Ok(out)
}

/// The hash of a record received as a JSON document: the canonical form of its members but
/// `hash`. For a record serialized from a [`Record`] this is [`Record::compute_hash`], without
/// decoding the document into one and encoding it again; it covers exactly the document
/// received, which is what storage keeps. `None` if `record` is not an object.
pub fn document_hash(record: &Value) -> Result<Option<Hash>, Error> {
    let Value::Object(members) = record else { return Ok(None) };
    let mut out = Vec::with_capacity(512);
    write_object(members.iter().filter(|(key, _)| key.as_str() != "hash"), &mut out)?;
    let mut hasher = blake3::Hasher::new_derive_key(HASH_CONTEXT);
    hasher.update(&out);
    Ok(Some(Hash(*hasher.finalize().as_bytes())))
}

fn write_object<'v>(members: impl Iterator<Item = (&'v String, &'v Value)>, out: &mut Vec<u8>) -> Result<(), Error> {
    let mut entries: Vec<(&String, &Value)> = members.collect();
    entries.sort_unstable_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
    out.push(b'{');
    for (i, (key, item)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        serde_json::to_writer(&mut *out, key).map_err(|e| Error::Serialize(e.to_string()))?;
        out.push(b':');
        write_canonical(item, out)?;
    }
    out.push(b'}');
    Ok(())
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) -> Result<(), Error> {
    let write_scalar =
        |v: &Value, out: &mut Vec<u8>| serde_json::to_writer(out, v).map_err(|e| Error::Serialize(e.to_string()));
    match value {
        Value::Number(n) if n.is_f64() => Err(Error::Float(n.to_string())),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) => write_scalar(value, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out)?;
            }
            out.push(b']');
            Ok(())
        }
        Value::Object(map) => write_object(map.iter(), out),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::AgentId;
    use crate::testing::{Sample, kernel_chain};

    #[test]
    fn canonical_json_sorts_keys_and_refuses_floats() {
        let v = json!({"b": 1, "a": {"d": [true, null, "x\n\"y\u{1}"], "c": -3}, "é": 0, "Z": 2});
        assert_eq!(
            String::from_utf8(canonical_json(&v).unwrap()).unwrap(),
            r#"{"Z":2,"a":{"c":-3,"d":[true,null,"x\n\"y\u0001"]},"b":1,"é":0}"#
        );
        assert_eq!(canonical_json(&json!({"x": 1.5})), Err(Error::Float("1.5".into())));
    }

    #[test]
    fn a_sealed_record_knows_its_encoded_length() {
        let agent = AgentId::mint(1_000, 1, 0);
        let spec = json!({"agent": agent, "queue": "q", "payload": "é \"quoted\"\n\u{1} 😀"});
        let op = Operation::ScheduleTask(serde_json::from_value(spec).unwrap());
        let unsealed = Record {
            seq: 7,
            op_id: OpId::mint(1_000, 7, 9),
            principal: "admin".parse().unwrap(),
            time_us: 1_007,
            op,
            events: vec![],
            prev_hash: Hash::ZERO,
            hash: Hash([9; 32]),
        };
        let (record, len) = unsealed.sealed().unwrap();
        assert_eq!(len, serde_json::to_vec(&record).unwrap().len());
        assert_eq!(record.hash, record.compute_hash().unwrap());
        assert_eq!(Hash([0xab; 32]).to_string(), "ab".repeat(32));
        assert_eq!(serde_json::to_value(Hash([0x0f; 32])).unwrap(), json!("0f".repeat(32)));
    }

    #[test]
    fn a_received_document_hashes_as_its_record() {
        for r in kernel_chain(3, Sample::Resume) {
            let doc = serde_json::to_value(&r).unwrap();
            assert_eq!(document_hash(&doc).unwrap(), Some(r.hash));
            // Any member but `hash` is covered, whatever its type.
            let mut edited = doc.clone();
            edited["op"]["extra"] = json!([1, {"b": null, "a": true}]);
            assert_ne!(document_hash(&edited).unwrap(), Some(r.hash));
            let mut rehashed = doc;
            rehashed["hash"] = json!("00".repeat(32));
            assert_eq!(document_hash(&rehashed).unwrap(), Some(r.hash));
        }
        assert_eq!(document_hash(&json!([1])).unwrap(), None);
        assert_eq!(document_hash(&json!({"seq": 1.5})), Err(Error::Float("1.5".into())));
    }

    #[test]
    fn an_intact_chain_verifies() {
        let records = kernel_chain(5, Sample::Resume);
        let (seq, hash) = verify_chain(&records, 0, Hash::ZERO).unwrap();
        assert_eq!((seq, hash), (5, records[4].hash));
        // Verifying from the middle works with the previous record's position.
        assert_eq!(verify_chain(&records[2..], 2, records[1].hash).unwrap().0, 5);
    }

    #[test]
    fn every_kind_of_tampering_is_found_at_the_right_record() {
        let records = kernel_chain(4, Sample::Resume);
        let mut edited = records.clone();
        edited[2].time_us += 1;
        assert_eq!(verify_chain(&edited, 0, Hash::ZERO).unwrap_err().seq, 3);

        let mut relinked = records.clone();
        relinked[2].time_us += 1;
        relinked[2].hash = relinked[2].compute_hash().unwrap();
        let err = verify_chain(&relinked, 0, Hash::ZERO).unwrap_err();
        assert_eq!(err.seq, 4, "rehashing one record breaks the next link: {err}");

        let mut dropped = records.clone();
        dropped.remove(1);
        assert_eq!(verify_chain(&dropped, 0, Hash::ZERO).unwrap_err().seq, 3);

        let mut event_edited = records;
        event_edited[0].events.clear();
        assert_eq!(verify_chain(&event_edited, 0, Hash::ZERO).unwrap_err().seq, 1);
    }

    #[test]
    fn hash_is_pinned() {
        // A change to the canonical form or the record layout changes every hash in every
        // existing log: it must be deliberate (a new HASH_CONTEXT), never accidental.
        let agent = AgentId::mint(1_000, 1, 0);
        let op = Operation::ResumeAgent { agent };
        let events = vec![Event::AgentResumed { agent }];
        let principal = "admin".parse().unwrap();
        let r = &Record::seal(1, OpId::mint(1_000, 1, 9), principal, 1_001, op, events, Hash::ZERO).unwrap();
        let expected = r.hash.to_string();
        let value = serde_json::to_value(r).unwrap();
        let mut body = value.as_object().unwrap().clone();
        body.remove("hash");
        let mut hasher = blake3::Hasher::new_derive_key("toka record v1");
        hasher.update(&canonical_json(&Value::Object(body)).unwrap());
        assert_eq!(hasher.finalize().to_hex().as_str(), expected);
        assert_eq!(expected, "0197f686233dcaa080d7f565a10a573092b98b69ea91719ebef50022a5063723");
        assert_eq!(expected.parse::<Hash>().unwrap(), r.hash);
        assert!("ABCD".parse::<Hash>().is_err());
        assert!(expected.to_uppercase().parse::<Hash>().is_err());
    }
}
