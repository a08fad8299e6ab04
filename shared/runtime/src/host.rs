//! The NATS services-API host every service runs its endpoints in, and the admin HTTP probes.
//!
//! An endpoint is a typed function `Req -> impl Future<Output = Result<Rep, WireError>>`,
//! called in the order requests arrive (what it does before its first `.await` keeps that
//! order; the futures then run concurrently). The host decodes and
//! validates the request against its schema (a failure is a `bad_request` naming the schema
//! and pointer), runs the handler in a span that continues the caller's trace, and replies with
//! a JSON body plus the services-API error headers and the span's `traceparent`. At most
//! `max_in_flight` requests run at once; beyond that callers get `unavailable` with a retry
//! hint instead of unbounded queueing. Every service also answers `toka.<service>.v1.health`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::service::{Service, ServiceExt as _};
use async_nats::{Client, HeaderMap};
use futures::StreamExt as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

use super::bus::Bus;
use super::config::AdminConfig;
use super::observe;
use toka_contract::api::service::{HealthReply, HealthRequest};
use toka_contract::schema::{self, Contract, DecodeError, ReplyContract};
use toka_contract::subject::{self, Endpoint};
use toka_contract::wire::{ErrorCode, Reply, ReplyParts, WireError};

/// The most requests one service instance handles at once by default.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// Why the host could not start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Registration with the NATS services API failed.
    #[error("cannot register {what} with the NATS services API: {reason}")]
    Register {
        /// The service or endpoint.
        what: String,
        /// Why.
        reason: String,
    },
    /// The admin listener could not bind.
    #[error("admin.listen {addr}: {reason}")]
    Admin {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    endpoint: String,
    reason: String,
}

/// The host's metrics, served on `/metrics` and, when OTLP is on, exported there too.
struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram>,
    in_flight: Gauge,
    dropped: Family<DropLabels, Counter>,
    otel_requests: opentelemetry::metrics::Counter<u64>,
    otel_latency: opentelemetry::metrics::Histogram<f64>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("toka");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
        });
        let in_flight = Gauge::default();
        let dropped = Family::<DropLabels, Counter>::default();
        registry.register(
            "requests_dropped",
            "Requests dropped unanswered, by endpoint and reason (reply_subject: a reply subject outside the inboxes)",
            dropped.clone(),
        );
        registry.register(
            "requests",
            "Requests handled, by endpoint and reply code (ok or an error code)",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its reply",
            latency.clone(),
        );
        registry.register("requests_in_flight", "Requests being handled now", in_flight.clone());
        let meter = opentelemetry::global::meter("toka");
        Metrics {
            registry: Mutex::new(registry),
            requests,
            latency,
            in_flight,
            dropped,
            otel_requests: meter.u64_counter("toka.requests").with_description("Requests handled").build(),
            otel_latency: meter.f64_histogram("toka.request.duration").with_unit("s").build(),
        }
    }

    fn observe(&self, endpoint: &str, code: &str, elapsed: Duration) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_owned(), code: code.to_owned() }).inc();
        self.latency.get_or_create(&EndpointLabels { endpoint: endpoint.to_owned() }).observe(elapsed.as_secs_f64());
        let attrs = [
            opentelemetry::KeyValue::new("endpoint", endpoint.to_owned()),
            opentelemetry::KeyValue::new("code", code.to_owned()),
        ];
        self.otel_requests.add(1, &attrs);
        self.otel_latency.record(elapsed.as_secs_f64(), &attrs[..1]);
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            // Writing to a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}

/// Whether `request` asks for its reply on an inbox.
fn replies_to_an_inbox(request: &async_nats::service::Request) -> bool {
    request.message.reply.as_ref().is_some_and(|reply| toka_contract::access::is_inbox(reply))
}

/// Shared between the host, its endpoints and the admin server.
struct Shared {
    name: &'static str,
    ready: AtomicBool,
    started: Instant,
    metrics: Metrics,
    permits: Arc<Semaphore>,
    max_in_flight: usize,
    instance: String,
}

/// A running service: its services-API registration, endpoints and admin server.
pub struct Host {
    client: Client,
    service: Service,
    shared: Arc<Shared>,
    endpoints: JoinSet<()>,
    admin_addr: SocketAddr,
    admin_stop: watch::Sender<bool>,
    admin_task: tokio::task::JoinHandle<()>,
    /// Tells the endpoint loops to stop taking requests (they do not rely on the services
    /// API's own stop, which does not end them while NATS is unreachable).
    stop: watch::Sender<bool>,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("service", &self.shared.name)
            .field("admin", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Registers `name` with the NATS services API, starts the admin server, and serves the
    /// health endpoint. The host starts not ready; call [`Host::set_ready`].
    pub async fn start(bus: &Bus, name: &'static str, description: &str, admin: &AdminConfig) -> Result<Host, Error> {
        let client = bus.client().clone();
        let service = client
            .service_builder()
            .description(description)
            .start(name, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| Error::Register { what: name.to_owned(), reason: e.to_string() })?;
        let instance = service.info().await.id;
        let shared = Arc::new(Shared {
            name,
            ready: AtomicBool::new(false),
            started: Instant::now(),
            metrics: Metrics::new(),
            permits: Arc::new(Semaphore::new(DEFAULT_MAX_IN_FLIGHT)),
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            instance,
        });
        let listener = tokio::net::TcpListener::bind(admin.listen)
            .await
            .map_err(|e| Error::Admin { addr: admin.listen, reason: e.to_string() })?;
        let admin_addr =
            listener.local_addr().map_err(|e| Error::Admin { addr: admin.listen, reason: e.to_string() })?;
        let (admin_stop, mut stopped) = watch::channel(false);
        let app = admin_router(shared.clone());
        let admin_task = tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
                tracing::error!(error = %e, "admin server failed");
            }
        });
        tracing::info!(service = name, %admin_addr, "admin endpoint listening (/livez, /readyz, /metrics)");
        let (stop, _) = watch::channel(false);
        let mut host =
            Host { client, service, shared, endpoints: JoinSet::new(), admin_addr, admin_stop, admin_task, stop };
        if let Some(health) = subject::health(name) {
            let shared = host.shared.clone();
            host.endpoint(health, move |_: HealthRequest| {
                let shared = shared.clone();
                async move {
                    Ok(HealthReply {
                        service: shared.name.to_owned(),
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                        instance: shared.instance.clone(),
                        ready: shared.ready.load(Ordering::Relaxed),
                        uptime_ms: u64::try_from(shared.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    })
                }
            })
            .await?;
        }
        Ok(host)
    }

    /// Where the admin server listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Adds one of the service's own metrics to `/metrics` (as `toka_<name>`).
    pub fn register_metric(&self, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
        if let Ok(mut registry) = self.shared.metrics.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    /// Adds a collector of the service's own series to `/metrics` (named `toka_<name>`),
    /// computed at each scrape.
    pub fn register_collector(&self, collector: Box<dyn prometheus_client::collector::Collector>) {
        if let Ok(mut registry) = self.shared.metrics.registry.lock() {
            registry.register_collector(collector);
        }
    }

    /// Marks the service ready (or not) for `/readyz` and the health endpoint.
    pub fn set_ready(&self, ready: bool) {
        self.shared.ready.store(ready, Ordering::Relaxed);
    }

    /// Serves `endpoint` with `handler`, handing each call a clone of `state` (an `Arc` of the
    /// service's shared parts): how every service registers its endpoints.
    pub async fn serve<S, Req, Rep, F, Fut>(&mut self, endpoint: Endpoint, state: &S, handler: F) -> Result<(), Error>
    where
        S: Clone + Send + Sync + 'static,
        Req: Contract + Send + 'static,
        Rep: ReplyContract + Send + 'static,
        F: Fn(S, Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Rep, WireError>> + Send + 'static,
    {
        let state = state.clone();
        self.endpoint(endpoint, move |req| handler(state.clone(), req)).await
    }

    /// Serves `endpoint` with `handler`.
    pub async fn endpoint<Req, Rep, F, Fut>(&mut self, endpoint: Endpoint, handler: F) -> Result<(), Error>
    where
        Req: Contract + Send + 'static,
        Rep: ReplyContract + Send + 'static,
        F: Fn(Req) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Rep, WireError>> + Send + 'static,
    {
        let mut requests = self
            .service
            .endpoint_builder()
            // Services-API endpoint names allow no dots (`snapshot.get` registers as `snapshot_get`).
            .name(endpoint.name.replace('.', "_"))
            .add(endpoint.subject)
            .await
            .map_err(|e| Error::Register { what: endpoint.subject.to_owned(), reason: e.to_string() })?;
        let shared = self.shared.clone();
        let handler = Arc::new(handler);
        let max_payload = self.client.server_info().max_payload;
        let mut stop = self.stop.subscribe();
        self.endpoints.spawn(async move {
            let mut in_flight = JoinSet::new();
            loop {
                let request = tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => break,
                    next = requests.next() => match next {
                        Some(request) => request,
                        None => break,
                    },
                };
                // Replies go to inboxes only: a request pointing its reply elsewhere (at a lease
                // key, an event subject, the JetStream API) is dropped unanswered and counted.
                if !replies_to_an_inbox(&request) {
                    let labels = DropLabels { endpoint: endpoint.name.to_owned(), reason: "reply_subject".to_owned() };
                    shared.metrics.dropped.get_or_create(&labels).inc();
                    tracing::warn!(endpoint = endpoint.subject, reply = ?request.message.reply, "request dropped: its reply subject is not an inbox");
                    continue;
                }
                let Ok(permit) = shared.permits.clone().try_acquire_owned() else {
                    let busy = WireError::new(
                        ErrorCode::Unavailable,
                        format!("{} is at its limit of {} requests in flight", shared.name, shared.max_in_flight),
                    )
                    .with_retry_after_ms(50);
                    respond(&request, &ReplyParts::error(&busy), None).await;
                    shared.metrics.observe(endpoint.name, busy.code.as_str(), Duration::ZERO);
                    continue;
                };
                let begun = begin::<Req, _, _>(endpoint, &request, &*handler);
                let shared = shared.clone();
                shared.metrics.in_flight.inc();
                // Boxed: a handler's future can be kilobytes, and a task moves its future on
                // every change of stage; a pointer is cheaper to move.
                in_flight.spawn(Box::pin(async move {
                    finish::<Rep, _>(endpoint, &request, begun, &shared, max_payload).await;
                    shared.metrics.in_flight.dec();
                    drop(permit);
                }));
                // Reap finished handlers so the set does not grow.
                while in_flight.try_join_next().is_some() {}
            }
            // Stop taking requests, and let those already taken finish.
            drop(requests);
            while in_flight.join_next().await.is_some() {}
        });
        Ok(())
    }

    /// Marks the service ready, serves until `shutdown` resolves, then shuts down gracefully
    /// and drains the bus.
    pub async fn serve_until(self, bus: &Bus, shutdown: impl Future<Output = ()>, grace: Duration) {
        self.serve_until_then(bus, shutdown, grace, async {}).await;
    }

    /// As [`Host::serve_until`], running `cleanup` after the last request finished and before
    /// the bus drains (to flush what the service still owes its peers: audit records, a lease).
    pub async fn serve_until_then(
        self,
        bus: &Bus,
        shutdown: impl Future<Output = ()>,
        grace: Duration,
        cleanup: impl Future<Output = ()>,
    ) {
        self.set_ready(true);
        tracing::info!(service = self.shared.name, "ready");
        shutdown.await;
        self.shutdown(grace).await;
        if tokio::time::timeout(grace, cleanup).await.is_err() {
            tracing::warn!(?grace, "clean-up did not finish in time");
        }
        if tokio::time::timeout(grace, bus.drain()).await.is_err() {
            tracing::warn!(?grace, "NATS did not drain in time (is the server gone?)");
        }
    }

    /// Stops taking requests, lets in-flight ones finish within `grace`, stops the admin
    /// server. The caller then drains the bus and flushes telemetry.
    pub async fn shutdown(mut self, grace: Duration) {
        self.set_ready(false);
        let name = self.shared.name;
        let _ = self.stop.send(true);
        if let Err(e) = self.service.stop().await {
            tracing::warn!(error = %e, "services-API stop failed");
        }
        let drained = tokio::time::timeout(grace, async { while self.endpoints.join_next().await.is_some() {} }).await;
        match drained {
            Ok(()) => tracing::info!(service = name, "in-flight requests finished"),
            Err(_) => {
                tracing::warn!(service = name, ?grace, "grace period over; abandoning in-flight requests");
                self.endpoints.abort_all();
            }
        }
        let _ = self.admin_stop.send(true);
        let _ = self.admin_task.await;
    }
}

async fn respond(request: &async_nats::service::Request, parts: &ReplyParts, traceparent: Option<String>) {
    let mut headers = HeaderMap::new();
    for (k, v) in &parts.headers {
        headers.insert(*k, v.as_str());
    }
    if let Some(tp) = traceparent {
        headers.insert("traceparent", tp.as_str());
    }
    // The services API's own error path sends an empty body; the body is the contract, so
    // errors go out as a normal reply carrying the error headers too.
    if let Err(e) = request.respond_with_headers(Ok(parts.body.clone().into()), headers).await {
        tracing::warn!(error = %e, "reply could not be sent");
    }
}

/// A request whose handler has been called (in arrival order) and whose reply is pending.
struct Begun<Fut> {
    span: tracing::Span,
    started: Instant,
    work: Result<Fut, WireError>,
}

/// Decodes the request and calls the handler, synchronously: whatever a handler does before
/// its first `.await` (storage enqueues appends there) happens in the order requests arrived.
fn begin<Req, F, Fut>(endpoint: Endpoint, request: &async_nats::service::Request, handler: &F) -> Begun<Fut>
where
    Req: Contract,
    F: Fn(Req) -> Fut,
{
    let span = tracing::info_span!(
        "nats.process",
        otel.kind = "server",
        otel.name = %format!("process {}", endpoint.subject),
        messaging.system = "nats",
        messaging.operation.type = "process",
        messaging.destination.name = endpoint.subject,
        toka.reply_code = tracing::field::Empty,
    );
    observe::adopt(&span, request.message.headers.as_ref());
    let started = Instant::now();
    let work = span.in_scope(|| match schema::decode::<Req>(&request.message.payload) {
        Ok(req) => Ok(handler(req)),
        Err(DecodeError::Schema(e)) => Err(e.into()),
        Err(DecodeError::Json(e)) => {
            Err(WireError::new(ErrorCode::BadRequest, format!("request body is not JSON: {e}")))
        }
    });
    Begun { span, started, work }
}

/// Awaits the handler's result and replies.
async fn finish<Rep, Fut>(
    endpoint: Endpoint,
    request: &async_nats::service::Request,
    begun: Begun<Fut>,
    shared: &Shared,
    max_payload: usize,
) where
    Rep: ReplyContract,
    Fut: Future<Output = Result<Rep, WireError>>,
{
    let Begun { span, started, work } = begun;
    async {
        let reply: Reply<Rep> = match work {
            Ok(fut) => fut.await.into(),
            Err(e) => Reply::Error(e),
        };
        let mut parts = ReplyParts::of(&reply);
        if parts.body.len() > max_payload {
            let size = parts.body.len();
            parts = ReplyParts::error(&WireError::too_large(
                format!("reply of {size} bytes exceeds the server's max_payload of {max_payload} bytes"),
                "nats.max_payload",
                max_payload as u64,
                Some(size as u64),
            ));
        }
        let code = match &reply {
            Reply::Ok(_) if parts.headers.is_empty() => "ok",
            Reply::Ok(_) => ErrorCode::TooLarge.as_str(),
            Reply::Error(e) => e.code.as_str(),
        };
        tracing::Span::current().record("toka.reply_code", code);
        respond(request, &parts, observe::traceparent(&tracing::Span::current())).await;
        shared.metrics.observe(endpoint.name, code, started.elapsed());
    }
    .instrument(span)
    .await
}

fn admin_router(shared: Arc<Shared>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    let ready = shared.clone();
    let metrics = shared;
    axum::Router::new()
        .route("/livez", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.ready.load(Ordering::Relaxed);
                async move {
                    if ready { (StatusCode::OK, "ready\n") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready\n") }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let body = metrics.metrics.render();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
}
