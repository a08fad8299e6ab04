//! Observability: `tracing` spans and logs, exported as OpenTelemetry traces and metrics over
//! OTLP/HTTP when an endpoint is configured, with W3C trace context carried in NATS headers so
//! one operation is one trace across services.

use std::io::IsTerminal;
use std::time::Duration;

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use super::config::{LogFormat, TelemetryConfig};

/// Why observability could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The log filter does not parse.
    #[error("telemetry.log_filter: {0}")]
    Filter(String),
    /// The OTLP exporter could not be built.
    #[error("telemetry.otlp_endpoint: {0}")]
    Exporter(String),
    /// A global subscriber is already installed.
    #[error("observability is already initialised: {0}")]
    Installed(String),
}

/// Keeps the exporters alive; [`Telemetry::shutdown`] flushes them.
#[derive(Debug)]
pub struct Telemetry {
    tracer: SdkTracerProvider,
    meter: Option<SdkMeterProvider>,
    flush_timeout: Duration,
}

impl Telemetry {
    /// Flushes and stops the exporters, waiting at most the configured flush timeout.
    pub async fn shutdown(self) {
        let Telemetry { tracer, meter, flush_timeout } = self;
        let flush = tokio::task::spawn_blocking(move || {
            if let Err(e) = tracer.shutdown() {
                tracing::warn!(error = %e, "trace export did not flush");
            }
            if let Some(meter) = meter
                && let Err(e) = meter.shutdown()
            {
                tracing::warn!(error = %e, "metric export did not flush");
            }
        });
        if tokio::time::timeout(flush_timeout, flush).await.is_err() {
            tracing::warn!(?flush_timeout, "telemetry flush timed out");
        }
    }
}

/// Installs the global subscriber, tracer and propagator for `service`.
pub fn init(config: &TelemetryConfig, service: &'static str) -> Result<Telemetry, Error> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let mut tracer = SdkTracerProvider::builder().with_resource(resource.clone());
    let mut meter = None;
    if let Some(base) = &config.otlp_endpoint {
        let base = base.trim_end_matches('/');
        let spans = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{base}/v1/traces"))
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        tracer = tracer.with_batch_exporter(spans);
        let metrics = opentelemetry_otlp::MetricExporter::builder()
            .with_http()
            .with_endpoint(format!("{base}/v1/metrics"))
            .build()
            .map_err(|e| Error::Exporter(e.to_string()))?;
        let provider = SdkMeterProvider::builder().with_resource(resource).with_periodic_exporter(metrics).build();
        opentelemetry::global::set_meter_provider(provider.clone());
        meter = Some(provider);
    } else {
        // Nothing would receive the spans: a trace started here is not recorded (trace
        // context still propagates, and a sampled caller's trace is still continued).
        tracer = tracer.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
    }
    let tracer = tracer.build();
    let filter = EnvFilter::try_new(&config.log_filter).map_err(|e| Error::Filter(e.to_string()))?;
    let json = match config.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().with_current_span(true).boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt.with_filter(tracing_subscriber::filter::filter_fn(not_per_message)))
        .with(span_layer(tracer.tracer(service)))
        .try_init()
        .map_err(|e| Error::Installed(e.to_string()))?;
    Ok(Telemetry { tracer, meter, flush_timeout: Duration::from_millis(config.flush_timeout_ms) })
}

/// Spans become OpenTelemetry spans with their fields as attributes, and nothing more: no
/// code location, thread or busy/idle timings, and no OpenTelemetry context attached on
/// every poll (trace context is read from the span itself where it is injected), which
/// halved what tracing cost a service per request.
fn span_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_context_activation(false)
}

/// The log lines leave out the spans opened for every NATS message (`nats.process`,
/// `nats.request`): formatting their fields for each message cost a tenth of a service's CPU
/// under load, and those spans are traces, exported over OTLP with their trace context.
fn not_per_message(meta: &tracing::Metadata<'_>) -> bool {
    !(meta.is_span() && meta.name().starts_with("nats."))
}

#[cfg(feature = "test-util")]
/// For tests: installs tracing with trace ids but no exporter, once per process; later calls
/// do nothing.
pub fn init_for_tests() {
    static ONCE: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    ONCE.get_or_init(|| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        let tracer = SdkTracerProvider::builder().build();
        let _ = tracing_subscriber::registry()
            .with(EnvFilter::new("info"))
            .with(tracing_subscriber::fmt::layer().with_test_writer())
            .with(span_layer(tracer.tracer("toka-tests")))
            .try_init();
        // Keep the provider for the whole test process.
        std::mem::forget(tracer);
    });
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the trace context of `span` into NATS headers (`traceparent`, `tracestate`).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut HeaderInjector(headers)));
}

/// Reads a trace context from NATS headers (empty when there is none).
pub fn extract(headers: Option<&HeaderMap>) -> Context {
    match headers {
        Some(h) => opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(h))),
        None => Context::new(),
    }
}

/// Makes `span` a child of the trace context in `headers`, if any.
pub fn adopt(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let cx = extract(headers);
    use opentelemetry::trace::TraceContextExt as _;
    if cx.span().span_context().is_valid() {
        // Fails only if the span is disabled, in which case there is nothing to link.
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut headers = HeaderMap::new();
    inject(span, &mut headers);
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}
