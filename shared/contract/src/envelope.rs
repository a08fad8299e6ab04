//! The CloudEvents 1.0 envelope in which storage publishes each committed event.
//!
//! Structured JSON mode: the core attributes, `data` holding the [`Event`], and three extension
//! attributes: `tokalog` (the log), `tokaseq` (the event's WAL address `<seq>.<idx>`, a string
//! because CloudEvents integers are 32-bit) and `traceparent` (W3C trace context, when the
//! operation carried one). `id` is `<log>:<seq>.<idx>`, unique per source, and doubles as the
//! JetStream `Nats-Msg-Id`, so a republish is deduplicated.

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::record::LogName;
use crate::schema::BASE_URI;

/// The CloudEvents version Toka speaks.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of `data`.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// A committed event as published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Always [`SPEC_VERSION`].
    pub specversion: String,
    /// `<log>:<seq>.<idx>`.
    pub id: String,
    /// `/toka/<log>`.
    pub source: String,
    /// `toka.<category>.<name>.v1`.
    #[serde(rename = "type")]
    pub ty: String,
    /// The sequencer's time, RFC 3339 in UTC with microseconds.
    pub time: String,
    /// The entity id, when the event has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Always [`DATA_CONTENT_TYPE`].
    pub datacontenttype: String,
    /// The URI of the event's schema.
    pub dataschema: String,
    /// The log.
    pub tokalog: LogName,
    /// `<seq>.<idx>`.
    pub tokaseq: String,
    /// W3C trace context of the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The event.
    pub data: Event,
}

impl Envelope {
    /// The envelope of event `idx` of record `seq` of `log`, recorded at `time_us`.
    pub fn new(log: LogName, seq: u64, idx: u16, time_us: u64, event: Event, traceparent: Option<String>) -> Self {
        let time = humantime::format_rfc3339_micros(UNIX_EPOCH + Duration::from_micros(time_us)).to_string();
        Envelope {
            specversion: SPEC_VERSION.to_owned(),
            id: message_id(log, seq, idx),
            source: format!("/toka/{log}"),
            ty: format!("toka.{}.v1", event.type_name()),
            time,
            subject: event.entity(),
            datacontenttype: DATA_CONTENT_TYPE.to_owned(),
            dataschema: format!("{BASE_URI}events/{}.v1.json", event.type_name()),
            tokalog: log,
            tokaseq: format!("{seq}.{idx}"),
            traceparent,
            data: event,
        }
    }
}

impl Envelope {
    /// Where the event sits in its log and when it was recorded: (record seq, index in the
    /// record, time in microseconds since the epoch), read back from `tokaseq` and `time`.
    pub fn position(&self) -> Option<(u64, u16, u64)> {
        let (seq, idx) = self.tokaseq.split_once('.')?;
        let time = humantime::parse_rfc3339(&self.time).ok()?;
        let time_us = u64::try_from(time.duration_since(UNIX_EPOCH).ok()?.as_micros()).ok()?;
        Some((seq.parse().ok()?, idx.parse().ok()?, time_us))
    }
}

/// The envelope id and JetStream `Nats-Msg-Id` of event `idx` of record `seq` of `log`.
pub fn message_id(log: LogName, seq: u64, idx: u16) -> String {
    format!("{log}:{seq}.{idx}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AgentId;

    #[test]
    fn builds_the_documented_attributes() {
        let agent = AgentId::mint(1_764_150_000_000_000, 42, 0);
        let env = Envelope::new(LogName::Kernel, 42, 1, 1_764_150_000_123_456, Event::AgentResumed { agent }, None);
        assert_eq!(env.id, "kernel:42.1");
        assert_eq!(env.ty, "toka.agent.resumed.v1");
        assert_eq!(env.time, "2025-11-26T09:40:00.123456Z");
        assert_eq!(env.subject, Some(agent.to_string()));
        assert_eq!(env.tokaseq, "42.1");
        assert_eq!(env.dataschema, "https://toka.dev/schemas/events/agent.resumed.v1.json");
        assert_eq!(env.position(), Some((42, 1, 1_764_150_000_123_456)));
    }
}
