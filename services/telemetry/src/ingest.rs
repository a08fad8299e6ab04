//! Ingestion: each log's committed events, read from its stream (`TOKA_EVENTS`, `TOKA_AUDIT`)
//! through the durable pull consumer `telemetry`, folded into that log's views.
//!
//! The views are rebuilt from the stream on every start: the consumer is made anew, delivering
//! from the stream's first message, and nothing is persisted. A restart after a crash folds
//! the same events in the same order, so the views are exact, with no write to keep atomic
//! with the consumer's position. The cost is a replay of the stream at start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use toka_contract::access::TELEMETRY_CONSUMER;
use toka_contract::envelope::Envelope;
use toka_contract::record::LogName;
use toka_contract::subject;
use toka_runtime::bus::Bus;

use crate::views::Fold;

/// The consumer of one log's stream, attached.
pub struct Ingest<F> {
    log: LogName,
    consumer: consumer::PullConsumer,
    views: Arc<Mutex<F>>,
    lag: Arc<AtomicU64>,
}

impl<F> std::fmt::Debug for Ingest<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").field("log", &self.log).finish_non_exhaustive()
    }
}

impl<F: Fold> Ingest<F> {
    /// Makes the consumer anew on `log`'s stream, delivering from its first message into
    /// `views`; `lag` is kept at the number of the stream's messages not yet delivered.
    pub async fn attach(bus: &Bus, log: LogName, views: Arc<Mutex<F>>, lag: Arc<AtomicU64>) -> Result<Self, String> {
        let js = jetstream::new(bus.client().clone());
        let name = subject::stream_of(log);
        let stream = js.get_stream(&name).await.map_err(|e| format!("stream {name}: {e}"))?;
        // Whatever an earlier run left: the views are rebuilt from the start.
        if let Err(e) = stream.delete_consumer(TELEMETRY_CONSUMER).await
            && !e.to_string().contains("not found")
        {
            return Err(format!("removing the earlier consumer of {name}: {e}"));
        }
        let config = consumer::pull::Config {
            durable_name: Some(TELEMETRY_CONSUMER.to_owned()),
            description: Some(format!("toka-telemetry: the {log} log's events, folded into its views")),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(|e| format!("consumer of {name}: {e}"))?;
        Ok(Ingest { log, consumer, views, lag })
    }

    /// Folds what the consumer delivers until its messages end (the connection closes), and
    /// reads the consumer's lag every second meanwhile.
    pub async fn run(self) {
        let mut messages = match self.consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return tracing::error!(log = %self.log, error = %e, "the consumer does not deliver"),
        };
        let mut watched = self.consumer.clone();
        let lag = self.lag.clone();
        let watching = tokio::spawn(async move {
            loop {
                if let Ok(info) = watched.info().await {
                    lag.store(info.num_pending, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(log = %self.log, error = %e, "consumer");
                    continue;
                }
            };
            let folded = serde_json::from_slice::<Envelope>(&message.payload)
                .map_err(|e| e.to_string())
                .and_then(|envelope| envelope.position().map(|p| (p, envelope.data)).ok_or("no position".into()));
            match folded {
                Ok(((seq, idx, time_us), event)) => {
                    if let Ok(mut views) = self.views.lock() {
                        views.fold(seq, idx, time_us, &event);
                    }
                }
                Err(e) => tracing::warn!(error = %e, subject = %message.subject, "an event telemetry cannot read"),
            }
        }
        watching.abort();
    }
}
