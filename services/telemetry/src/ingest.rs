//! Ingestion: the kernel log's committed events, read from its stream (`TOKA_EVENTS`) through
//! the durable pull consumer `telemetry`, folded into the [`Views`].
//!
//! The views are rebuilt from the stream on every start: the consumer is made anew, delivering
//! from the stream's first message, and nothing is persisted. A restart after a crash folds
//! the same events in the same order, so the views are exact, with no write to keep atomic
//! with the consumer's position. The cost is a replay of the stream at start.

use std::sync::{Arc, Mutex};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use toka_contract::access::TELEMETRY_CONSUMER;
use toka_contract::envelope::Envelope;
use toka_contract::record::LogName;
use toka_contract::subject;
use toka_runtime::bus::Bus;

use crate::views::Views;

/// The consumer, attached to the kernel log's stream.
pub struct Ingest {
    consumer: consumer::PullConsumer,
    views: Arc<Mutex<Views>>,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

impl Ingest {
    /// Makes the consumer anew on the kernel log's stream, delivering from its first message.
    pub async fn attach(bus: &Bus, views: Arc<Mutex<Views>>) -> Result<Ingest, String> {
        let js = jetstream::new(bus.client().clone());
        let name = subject::stream_of(LogName::Kernel);
        let stream = js.get_stream(&name).await.map_err(|e| format!("stream {name}: {e}"))?;
        // Whatever an earlier run left: the views are rebuilt from the start.
        if let Err(e) = stream.delete_consumer(TELEMETRY_CONSUMER).await
            && !e.to_string().contains("not found")
        {
            return Err(format!("removing the earlier consumer: {e}"));
        }
        let config = consumer::pull::Config {
            durable_name: Some(TELEMETRY_CONSUMER.to_owned()),
            description: Some("toka-telemetry: the kernel log's events, folded into its views".to_owned()),
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        };
        let consumer = stream.create_consumer(config).await.map_err(|e| format!("consumer: {e}"))?;
        Ok(Ingest { consumer, views })
    }

    /// Folds what the consumer delivers until its messages end (the connection closes).
    pub async fn run(self) {
        let mut messages = match self.consumer.messages().await {
            Ok(messages) => messages,
            Err(e) => return tracing::error!(error = %e, "the consumer does not deliver"),
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    tracing::warn!(error = %e, "consumer");
                    continue;
                }
            };
            let folded = serde_json::from_slice::<Envelope>(&message.payload)
                .map_err(|e| e.to_string())
                .and_then(|envelope| envelope.position().map(|p| (p, envelope.data)).ok_or("no position".into()));
            match folded {
                Ok(((seq, idx, time_us), event)) => {
                    if let Ok(mut views) = self.views.lock() {
                        views.apply(seq, idx, time_us, &event);
                    }
                }
                Err(e) => tracing::warn!(error = %e, subject = %message.subject, "an event telemetry cannot read"),
            }
        }
    }
}
