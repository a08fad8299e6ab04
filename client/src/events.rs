//! Committed events, as storage published them to the JetStream stream `TOKA_EVENTS`: read
//! through an ordered consumer, so history and what follows arrive in one sequence, in log
//! order, each event once (the consumer starts again where it was if a message goes missing).
//!
//! A plain subscription to `toka.evt.>` sees only what is published while it listens; the
//! stream holds what was published before. The subjects name the log, the category, the event
//! and the entity (`toka_contract::subject`), so a consumer can follow one agent or one kind of
//! event.

use futures::StreamExt as _;
use toka_contract::Envelope;
use toka_contract::subject;
use toka_contract::wire::{ErrorCode, WireError};

use crate::Bus;

/// Where a stream of events starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With the oldest event the stream holds.
    Oldest,
    /// With events published from now on.
    New,
    /// With the stream's message of this sequence (not the log's: see [`Event::stream_seq`]).
    StreamSeq(u64),
}

/// A committed event with where it is in the stream.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The envelope storage published.
    pub envelope: Envelope,
    /// The stream's sequence of its message (a consumer resumes after it).
    pub stream_seq: u64,
}

/// Events read through an ordered consumer; dropping it stops the consumer.
pub struct Events {
    messages: async_nats::jetstream::consumer::pull::Ordered,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Unavailable, format!("{what}: {e}")).with_retry_after_ms(1_000)
}

/// The events on `filter` (a subject under `toka.evt.>`, wildcards allowed; see
/// `toka_contract::subject::{ALL_EVENTS, events_about, events_in}`), from `start`.
pub async fn follow(bus: &Bus, filter: &str, start: Start) -> Result<Events, WireError> {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    let js = async_nats::jetstream::new(bus.client().clone());
    let stream = js.get_stream(subject::EVENTS_STREAM).await.map_err(|e| unavailable("the events stream", e))?;
    let deliver_policy = match start {
        Start::Oldest => DeliverPolicy::All,
        Start::New => DeliverPolicy::New,
        Start::StreamSeq(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
    };
    // Named, so the filter is part of the request's subject, which is what the bus permits.
    let name = format!("events-{}", crate::fresh_op_id()?);
    let config = OrderedConfig {
        name: Some(name),
        filter_subject: filter.to_owned(),
        deliver_policy,
        ..OrderedConfig::default()
    };
    let consumer = stream.create_consumer(config).await.map_err(|e| unavailable("an events consumer", e))?;
    let messages = consumer.messages().await.map_err(|e| unavailable("reading events", e))?;
    Ok(Events { messages })
}

impl Events {
    /// The next event; waits for one to be published. `None` when the connection closed.
    pub async fn next(&mut self) -> Option<Result<Event, WireError>> {
        let message = match self.messages.next().await? {
            Ok(message) => message,
            Err(e) => return Some(Err(unavailable("reading events", e))),
        };
        let stream_seq = match message.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => return Some(Err(WireError::new(ErrorCode::Internal, format!("an event without metadata: {e}")))),
        };
        Some(
            serde_json::from_slice::<Envelope>(&message.payload)
                .map(|envelope| Event { envelope, stream_seq })
                .map_err(|e| WireError::new(ErrorCode::Internal, format!("an event that is not an envelope: {e}"))),
        )
    }
}
