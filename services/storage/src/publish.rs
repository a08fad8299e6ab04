//! Publishing committed events to JetStream.
//!
//! After a commit, each event of each new record goes to the stream `TOKA_EVENTS` on
//! `toka.evt.<log>.<category>.<name>.<entity>`, as a CloudEvents envelope, with
//! `Nats-Msg-Id` = `<log>:<seq>.<idx>` so the stream drops a republished duplicate. The WAL
//! remembers how far it has published; on start (and after any failure) publishing resumes
//! from there, so no committed event is lost to consumers.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage};
use serde_json::Value;
use toka_shared::envelope::{Envelope, message_id};
use toka_shared::record::{LogName, Record};
use toka_shared::subject;
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

/// Creates the events stream if it does not exist.
pub async fn ensure_stream(js: &jetstream::Context) -> Result<(), Error> {
    let config = jetstream::stream::Config {
        name: subject::EVENTS_STREAM.to_owned(),
        subjects: vec![subject::ALL_EVENTS.to_owned()],
        duplicate_window: DUPLICATE_WINDOW,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    };
    js.get_or_create_stream(config)
        .await
        .map_err(|e| Error::Stream { stream: subject::EVENTS_STREAM, reason: e.to_string() })?;
    Ok(())
}

/// Publishes every committed but unpublished event of `log`; returns how many records it
/// covered. Stops at the first failure, leaving the progress marker at the last success.
pub async fn publish_pending(js: &jetstream::Context, wal: &WalHandle, log: LogName) -> Result<u64, String> {
    let mut done = 0;
    loop {
        let published =
            wal.call(move |w| w.published(log)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        let records = wal
            .call(move |w| w.read(log, published + 1, 256, 4 << 20))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let Some(last) = records.last().map(|r| r.seq) else { return Ok(done) };
        let mut acks = Vec::new();
        for stored in &records {
            let record: Record<Value> =
                serde_json::from_slice(&stored.body).map_err(|e| format!("record {}: {e}", stored.seq))?;
            for (idx, event) in record.events.into_iter().enumerate() {
                let idx = u16::try_from(idx).map_err(|_| format!("record {} has too many events", stored.seq))?;
                let envelope = Envelope::new(log, record.seq, idx, record.time_us, event, None);
                let payload = serde_json::to_vec(&envelope).map_err(|e| e.to_string())?;
                let message =
                    PublishMessage::build().payload(payload.into()).message_id(message_id(log, record.seq, idx));
                let ack =
                    js.send_publish(subject::event(log, &envelope.data), message).await.map_err(|e| e.to_string())?;
                acks.push(ack);
            }
        }
        // Pipelined: every publish is in flight before the first acknowledgement is awaited.
        for ack in acks {
            ack.await.map_err(|e| e.to_string())?;
        }
        wal.call(move |w| w.set_published(log, last)).await.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?;
        done += records.len() as u64;
    }
}

/// Publishes after every commit (and every second, to retry after a failure) until `stop`.
pub async fn run(js: jetstream::Context, wal: WalHandle, mut stop: watch::Receiver<bool>) {
    let appended = wal.appended();
    loop {
        for log in LogName::ALL {
            match publish_pending(&js, &wal, log).await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(%log, records = n, "published committed events"),
                Err(e) => tracing::warn!(%log, error = %e, "publishing committed events failed; will retry"),
            }
        }
        tokio::select! {
            _ = appended.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
