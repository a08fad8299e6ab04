//! Committed events, as storage published them to their log's JetStream stream (`TOKA_EVENTS`
//! for the kernel log, `TOKA_AUDIT` for the audit log): history and what follows in one
//! sequence, in log order, each event once.
//!
//! Events are read with direct gets (the next message on the filter from a stream sequence),
//! which need no consumer: a reader holds no right to create one, so none can point a stream
//! anywhere. The stream republishes each message it stores, headers only, under `toka.live`;
//! a follower that has read everything waits for such a notice (or, should one be lost, a
//! short poll) and reads on. A plain subscription to `toka.evt.>` sees only what is published
//! while it listens, at most once.
//!
//! The subjects name the log, the category, the event and the entity
//! (`toka_contract::subject`), so a reader can follow one agent or one kind of event.

use std::time::Duration;

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream};
use futures::{FutureExt as _, StreamExt as _};
use toka_contract::Envelope;
use toka_contract::subject;
use toka_contract::wire::{ErrorCode, WireError};

use crate::{Bus, unavailable};

/// How long a follower that has read everything waits before looking again without a notice.
const POLL: Duration = Duration::from_secs(2);

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
    /// The stream's sequence of its message (a reader resumes after it).
    pub stream_seq: u64,
}

/// Events read from a log's stream; dropping it stops following.
pub struct Events {
    stream: Stream<()>,
    filter: String,
    /// Notices of stored messages on the filter.
    live: async_nats::Subscriber,
    /// The stream sequence to read from next.
    next: u64,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("filter", &self.filter).field("next", &self.next).finish_non_exhaustive()
    }
}

/// The events on `filter` (a subject under `toka.evt.<log>`, wildcards allowed; see
/// `toka_contract::subject::{events_of, events_about, events_in}`), from `start`.
pub async fn follow(bus: &Bus, filter: &str, start: Start) -> Result<Events, WireError> {
    let (Some(log), Some(live)) = (subject::log_of(filter), subject::live(filter)) else {
        return Err(WireError::new(
            ErrorCode::BadRequest,
            format!("{filter:?} names no log: a filter starts with toka.evt.kernel or toka.evt.audit"),
        ));
    };
    let js = async_nats::jetstream::new(bus.client().clone());
    let stream =
        js.get_stream_no_info(subject::stream_of(log)).await.map_err(|e| unavailable("the events stream", e))?;
    // Listening before reading: nothing stored after the last read goes unnoticed.
    let live = bus.client().subscribe(live).await.map_err(|e| unavailable("following events", e))?;
    let next = match start {
        Start::Oldest => 1,
        Start::StreamSeq(seq) => seq.max(1),
        Start::New => match stream.direct_get_last_for_subject(filter).await {
            Ok(last) => last.sequence + 1,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => 1,
            Err(e) => return Err(unavailable("reading events", e)),
        },
    };
    Ok(Events { stream, filter: filter.to_owned(), live, next })
}

impl Events {
    /// The next event; waits for one to be stored. `None` when the connection closed.
    pub async fn next(&mut self) -> Option<Result<Event, WireError>> {
        loop {
            match self.stream.direct_get_next_for_subject(self.filter.as_str(), Some(self.next)).await {
                Ok(message) => {
                    self.next = message.sequence + 1;
                    return Some(
                        serde_json::from_slice::<Envelope>(&message.payload)
                            .map(|envelope| Event { envelope, stream_seq: message.sequence })
                            .map_err(|e| {
                                WireError::new(ErrorCode::Internal, format!("an event that is not an envelope: {e}"))
                            }),
                    );
                }
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => {}
                Err(e) => return Some(Err(unavailable("reading events", e))),
            }
            // Read everything there is: wait for a notice, then take every notice already here
            // (one read covers them all).
            tokio::select! {
                notice = self.live.next() => notice?,
                () = tokio::time::sleep(POLL) => continue,
            };
            while let Some(Some(_)) = self.live.next().now_or_never() {}
        }
    }
}
