//! Publishing committed events to JetStream.
//!
//! After a commit, each event of each new record goes to its log's stream (`TOKA_EVENTS` for the
//! kernel log, `TOKA_AUDIT` for the audit log) on
//! `toka.evt.<log>.<category>.<name>.<entity>`, as a CloudEvents envelope, with
//! `Nats-Msg-Id` = `<log>:<seq>.<idx>` so the stream drops a republished duplicate. The
//! messages of an append are built before its commit and handed to the publisher after it,
//! so the usual path neither reads the WAL back nor parses a record twice. The WAL remembers
//! how far it has published; on start, after any failure, and whenever the publisher fell
//! behind, publishing resumes from there, reading the WAL, so no committed event is lost to
//! consumers.

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use serde_json::Value;
use toka_contract::Event;
use toka_contract::envelope::{Envelope, message_id};
use toka_contract::record::{LogName, Record};
use toka_contract::subject;
use tokio::sync::watch;

use crate::writer::WalHandle;

/// How long the stream remembers message ids for deduplication.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream could not be created or found.
    #[error("JetStream stream {stream}: {reason}")]
    Stream {
        /// The stream.
        stream: &'static str,
        /// Why.
        reason: String,
    },
}

/// The stream of `log`'s committed events: its subjects, kept on file, read by direct gets
/// (which need no consumer, so readers need no right to make one), and each stored message
/// republished, headers only, under `toka.live` for followers to learn what to read.
pub fn stream_config(log: LogName) -> jetstream::stream::Config {
    let subjects = subject::events_of(log);
    jetstream::stream::Config {
        name: subject::stream_of(log).to_owned(),
        republish: subject::live(&subjects).map(|destination| jetstream::stream::Republish {
            source: subjects.clone(),
            destination,
            headers_only: true,
        }),
        subjects: vec![subjects],
        duplicate_window: DUPLICATE_WINDOW,
        storage: jetstream::stream::StorageType::File,
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates each log's stream if it does not exist and brings an existing one to its
/// configuration; returns the logs whose stream was created, which hold none of their events
/// yet. A stream that held other subjects (every log's events were once in `TOKA_EVENTS`) has
/// the other logs' events purged first, so its readers see its own log's only.
pub async fn ensure_streams(js: &jetstream::Context) -> Result<Vec<LogName>, Error> {
    use jetstream::context::GetStreamErrorKind;
    let mut created = Vec::new();
    for log in LogName::ALL {
        let config = stream_config(log);
        let fail = |e: &dyn std::fmt::Display| Error::Stream { stream: subject::stream_of(log), reason: e.to_string() };
        match js.get_stream(&config.name).await {
            Ok(stream) => {
                // `get_stream` read the stream's information already.
                let current = stream.cached_info().config.clone();
                if current.subjects == config.subjects && current.allow_direct && current.republish == config.republish
                {
                    continue;
                }
                for other in LogName::ALL.into_iter().filter(|other| *other != log) {
                    let foreign = subject::events_of(other);
                    if current.subjects.iter().any(|s| s == subject::ALL_EVENTS || *s == foreign) {
                        let purged = stream.purge().filter(foreign).await.map_err(|e| fail(&e))?;
                        tracing::info!(stream = config.name, %other, purged = purged.purged, "purged another log's events");
                    }
                }
                js.update_stream(&config).await.map_err(|e| fail(&e))?;
                tracing::info!(stream = config.name, "stream configuration updated");
            }
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
            {
                js.create_stream(config).await.map_err(|e| fail(&e))?;
                created.push(log);
            }
            Err(e) => return Err(fail(&e)),
        }
    }
    Ok(created)
}

/// One JetStream message: subject, `Nats-Msg-Id`, CloudEvents envelope.
#[derive(Debug, Clone)]
struct Message {
    subject: String,
    id: String,
    payload: bytes::Bytes,
}

/// The messages of `events`, the events of record `seq` of `log`, committed at `time_us`.
fn messages(log: LogName, seq: u64, time_us: u64, events: Vec<Event>) -> Result<Vec<Message>, String> {
    events
        .into_iter()
        .enumerate()
        .map(|(idx, event)| {
            let idx = u16::try_from(idx).map_err(|_| format!("record {seq} has too many events"))?;
            let envelope = Envelope::new(log, seq, idx, time_us, event, None);
            let payload = serde_json::to_vec(&envelope).map_err(|e| e.to_string())?.into();
            Ok(Message { subject: subject::event(log, &envelope.data), id: message_id(log, seq, idx), payload })
        })
        .collect()
}

/// The events of one append, decoded when it was checked, to publish once it is committed.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// The log.
    pub log: LogName,
    /// Each record's sequence, sequencer time and events, in order.
    pub records: Vec<(u64, u64, Vec<Event>)>,
}

impl Outbox {
    /// The first and last sequence.
    fn seqs(&self) -> (u64, u64) {
        (self.records.first().map_or(0, |r| r.0), self.records.last().map_or(0, |r| r.0))
    }
}

/// Sends `messages` and waits for every acknowledgement (all are in flight before the first
/// is awaited). Returns whether the stream's last message is now the last of `messages`, as
/// far as this publisher knows (its acknowledgement was not a duplicate's).
async fn send_acked(js: &jetstream::Context, messages: Vec<Message>) -> Result<bool, String> {
    let mut acks = Vec::with_capacity(messages.len());
    for m in messages {
        let message = PublishMessage::build().payload(m.payload).message_id(m.id);
        acks.push(js.send_publish(m.subject, message).await.map_err(|e| e.to_string())?);
    }
    let mut last_stored = false;
    for ack in acks {
        last_stored = !ack.await.map_err(|e| e.to_string())?.duplicate;
    }
    Ok(last_stored)
}

/// Sends `messages` as a chain: each names the one before it as the stream's last message
/// (`Nats-Expected-Last-Msg-Id`, the first naming `previous`), and only the last asks for an
/// acknowledgement. The stream refuses a message whose predecessor is not its last, so a
/// refused or lost message makes every later one refused too, the last included: its
/// acknowledgement proves the whole chain is stored, in order. Saves the stream one
/// acknowledgement per event, and this publisher one reply to read.
async fn send_chained(js: &jetstream::Context, previous: &str, messages: &[Message]) -> Result<(), String> {
    let Some((last, rest)) = messages.split_last() else { return Ok(()) };
    let client = js.client();
    let mut previous = previous;
    for m in rest {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, m.id.as_str());
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID, previous);
        client.publish_with_headers(m.subject.clone(), headers, m.payload.clone()).await.map_err(|e| e.to_string())?;
        previous = &m.id;
    }
    let message =
        PublishMessage::build().payload(last.payload.clone()).message_id(&last.id).expected_last_message_id(previous);
    let ack = js.send_publish(last.subject.clone(), message).await.map_err(|e| e.to_string())?;
    match ack.await {
        Ok(ack) if !ack.duplicate => Ok(()),
        Ok(_) => Err("the chain's last message was a duplicate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Where publishing stands: how far each log is published, as the WAL's marker says.
struct Progress {
    js: jetstream::Context,
    wal: WalHandle,
    published: BTreeMap<LogName, u64>,
    /// The id of each stream's last message, when this publisher sent it; what the next chain
    /// on that stream continues from.
    last_id: BTreeMap<LogName, String>,
    /// Sends left to acknowledge one by one before chaining again, after a refused chain:
    /// where another publisher writes to the stream as well, chains keep being refused, and
    /// each refusal costs a second sending.
    unchained: u32,
}

/// How many sends go unchained after a chain was refused.
const UNCHAINED_AFTER_REFUSAL: u32 = 64;

impl Progress {
    /// Publishes `messages`, as a chain after the stream's last message when that is known to
    /// be ours, else (or if the chain is refused) each acknowledged on its own: duplicates of
    /// what the chain did store are dropped by their ids.
    async fn send(&mut self, log: LogName, messages: Vec<Message>) -> Result<(), String> {
        let Some(last_id) = messages.last().map(|m| m.id.clone()) else { return Ok(()) };
        let previous = self.last_id.remove(&log);
        if self.unchained > 0 {
            self.unchained -= 1;
        } else if let Some(previous) = previous {
            match send_chained(&self.js, &previous, &messages).await {
                Ok(()) => {
                    self.last_id.insert(log, last_id);
                    return Ok(());
                }
                Err(e) => {
                    self.unchained = UNCHAINED_AFTER_REFUSAL;
                    tracing::debug!(error = %e, "chained publish refused; publishing each acknowledged for a while");
                }
            }
        }
        if send_acked(&self.js, messages).await? {
            self.last_id.insert(log, last_id);
        }
        Ok(())
    }

    async fn mark(&mut self, log: LogName, seq: u64) -> Result<(), String> {
        self.wal
            .call(move |w| w.set_published(log, seq))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        self.published.insert(log, seq);
        Ok(())
    }

    /// Publishes a committed append from memory if it continues what is published, else
    /// catches up from the WAL (which holds it too); an append already covered is skipped.
    async fn outbox(&mut self, outbox: Outbox) -> Result<(), String> {
        let done = self.published.get(&outbox.log).copied().unwrap_or(0);
        let (first, last) = outbox.seqs();
        if last <= done {
            return Ok(());
        }
        if first != done + 1 {
            return self.pending(outbox.log).await.map(|_| ());
        }
        let mut messages = Vec::new();
        for (seq, time_us, events) in outbox.records {
            messages.extend(self::messages(outbox.log, seq, time_us, events)?);
        }
        self.send(outbox.log, messages).await?;
        self.mark(outbox.log, last).await
    }

    /// Publishes every committed but unpublished event of `log`, read from the WAL; returns
    /// how many records it covered. Stops at the first failure, leaving the marker at the
    /// last success.
    async fn pending(&mut self, log: LogName) -> Result<u64, String> {
        let mut done = 0;
        loop {
            let published = self
                .wal
                .call(move |w| w.published(log))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let records = self
                .wal
                .call(move |w| w.read(log, published + 1, 256, 4 << 20))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let Some(last) = records.last().map(|r| r.seq) else {
                self.published.insert(log, published);
                return Ok(done);
            };
            let mut messages = Vec::new();
            for stored in &records {
                let record: Record<Value> =
                    serde_json::from_slice(&stored.body).map_err(|e| format!("record {}: {e}", stored.seq))?;
                messages.extend(self::messages(log, record.seq, record.time_us, record.events)?);
            }
            self.send(log, messages).await?;
            self.mark(log, last).await?;
            done += records.len() as u64;
        }
    }
}

/// Publishes what was committed before the start, then each commit as it happens (from
/// memory), and every second whatever a failure or a full queue left behind, until `stop`.
pub async fn run(js: jetstream::Context, wal: WalHandle, mut stop: watch::Receiver<bool>) {
    let Some(mut committed) = wal.take_committed() else {
        tracing::error!("a second publisher was started; this one stops");
        return;
    };
    let mut progress = Progress { js, wal, published: BTreeMap::new(), last_id: BTreeMap::new(), unchained: 0 };
    let mut catch_up = true;
    loop {
        if catch_up {
            for log in LogName::ALL {
                match progress.pending(log).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(%log, records = n, "published committed events from the WAL"),
                    Err(e) => tracing::warn!(%log, error = %e, "publishing committed events failed; will retry"),
                }
            }
        }
        let outbox = tokio::select! {
            outbox = committed.recv() => match outbox {
                Some(outbox) => outbox,
                None => return,
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                catch_up = true;
                continue;
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        catch_up = false;
        let log = outbox.log;
        if let Err(e) = progress.outbox(outbox).await {
            tracing::warn!(%log, error = %e, "publishing committed events failed; will retry");
        }
    }
}
