//! `toka load kernel` and `toka load nats`: closed-loop clients measured end to end.
//!
//! `kernel`: `--concurrency` clients, each with one `toka.kernel.v1.submit` outstanding at a
//! time (the next sent when the reply arrives), for `--warmup` seconds unmeasured then
//! `--duration` seconds measured. Each reply means the operation was verified, sequenced,
//! applied and made durable by storage. The operations follow `--mix` (weights of `spawn`,
//! `schedule`, `report`, `observe`) on agents made at the start under one root. Latency is
//! reported for all operations and, when the mix has more than one, for each kind.
//!
//! `nats`: the same clients and timing against a plain NATS request/reply echo served in this
//! process, with a payload of the same size: what the bus alone costs on the same machine.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use serde::Serialize;
use toka_client::Client;
use toka_contract::access::INBOXES;
use toka_contract::api::kernel::SubmitRequest;
use toka_contract::capability::{Action, Capability, Pattern};
use toka_contract::spec::{AgentSpec, TaskSpec};
use toka_contract::wire::ERROR_HEADER;
use toka_contract::{AgentId, Event, OpId, Operation, subject};
use toka_runtime::bus::Bus;
use toka_runtime::config::NatsConfig;

/// How the clients run (shared by both loads).
#[derive(Debug, Clone, Serialize, clap::Args)]
pub(crate) struct Clients {
    /// Clients, each with one request outstanding.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Measured seconds.
    #[arg(long, default_value_t = 20)]
    pub(crate) duration: u64,
    /// Unmeasured seconds first.
    #[arg(long, default_value_t = 3)]
    pub(crate) warmup: u64,
    /// Print the result as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub(crate) json: bool,
}

/// `toka load kernel`.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub(crate) struct KernelLoad {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) nats: crate::connect::Nats,
    /// The admin key file (the load issues itself a token with it).
    #[arg(long, default_value = "data/creds/admin.key")]
    pub(crate) admin_key_file: PathBuf,
    /// Operation weights, e.g. `spawn=1,schedule=3,report=3,observe=3`.
    #[arg(long, default_value = "spawn=1,schedule=3,report=3,observe=3")]
    pub(crate) mix: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) clients: Clients,
}

/// `toka load nats`.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub(crate) struct NatsLoad {
    /// NATS server URL (a plain server: the echo subject needs no permissions).
    #[arg(long, default_value = "nats://127.0.0.1:4333")]
    pub(crate) nats_url: String,
    /// Client nkey seed file, if the server wants one.
    #[arg(long)]
    pub(crate) creds: Option<PathBuf>,
    /// Request and reply size in bytes (a kernel submit with its token is about 800).
    #[arg(long, default_value_t = 800)]
    pub(crate) payload: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) clients: Clients,
}

#[derive(Debug, Serialize)]
struct Outcome<C: Serialize> {
    config: C,
    requests: u64,
    errors: u64,
    seconds: f64,
    requests_per_second: f64,
    latency_us: BTreeMap<&'static str, u64>,
    /// Each kind of request's count and latency, when there is more than one kind.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    by_kind: BTreeMap<&'static str, KindOutcome>,
}

#[derive(Debug, Serialize)]
struct KindOutcome {
    requests: u64,
    latency_us: BTreeMap<&'static str, u64>,
}

/// What one request did: acknowledged, and of which kind (for the latency by kind), or why
/// not.
type Sent = Result<&'static str, String>;

/// Latency histograms, microseconds, by kind of request.
type Histograms = BTreeMap<&'static str, Histogram<u64>>;

/// A latency histogram: 1 µs to 60 s at 3 significant digits.
pub(crate) fn histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    Histogram::new_with_bounds(1, 60_000_000, 3)
}

/// p50, p95, p99, p99.9 and max of `h`.
pub(crate) fn percentiles(h: &Histogram<u64>) -> BTreeMap<&'static str, u64> {
    BTreeMap::from([
        ("p50", h.value_at_quantile(0.50)),
        ("p95", h.value_at_quantile(0.95)),
        ("p99", h.value_at_quantile(0.99)),
        ("p99.9", h.value_at_quantile(0.999)),
        ("max", h.max()),
    ])
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

/// Runs `clients` closed loops of `request(client, i)`; warm-up, then the measured window.
async fn drive<F, Fut>(clients: &Clients, what: &str, request: F) -> anyhow::Result<(u64, u64, f64, Histograms)>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Sent> + Send,
{
    let request = Arc::new(request);
    let measuring = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients.concurrency.max(1) {
        let (request, measuring, stopping, count, errors, first_error) =
            (request.clone(), measuring.clone(), stopping.clone(), count.clone(), errors.clone(), first_error.clone());
        tasks.spawn(async move {
            let mut histograms = Histograms::new();
            let mut i = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = request(client, i).await;
                i += 1;
                let measured = measuring.load(Ordering::Relaxed);
                match result {
                    Ok(kind) if measured => {
                        count.fetch_add(1, Ordering::Relaxed);
                        let h = match histograms.entry(kind) {
                            Entry::Occupied(h) => h.into_mut(),
                            Entry::Vacant(slot) => match histogram() {
                                Ok(h) => slot.insert(h),
                                Err(_) => continue,
                            },
                        };
                        let _ = h.record(started.elapsed().as_micros().max(1) as u64);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = first_error.lock() {
                            first.get_or_insert(e);
                        }
                    }
                }
            }
            histograms
        });
    }
    tokio::time::sleep(Duration::from_secs(clients.warmup)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let end = started + Duration::from_secs(clients.duration.max(1));
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(1).min(end.saturating_duration_since(Instant::now()))).await;
        eprintln!(
            "  {:>3.0} s: {} {what} acknowledged, {} errors",
            started.elapsed().as_secs_f64(),
            count.load(Ordering::Relaxed),
            errors.load(Ordering::Relaxed)
        );
    }
    measuring.store(false, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    stopping.store(true, Ordering::Relaxed);
    let mut histograms = Histograms::new();
    while let Some(joined) = tasks.join_next().await {
        for (kind, h) in joined? {
            match histograms.entry(kind) {
                Entry::Occupied(mut all) => all.get_mut().add(h)?,
                Entry::Vacant(slot) => {
                    slot.insert(h);
                }
            }
        }
    }
    if let Some(e) = first_error.lock().ok().and_then(|f| f.clone()) {
        eprintln!("first error: {e}");
    }
    Ok((count.load(Ordering::Relaxed), errors.load(Ordering::Relaxed), seconds, histograms))
}

fn report<C: Serialize + std::fmt::Debug>(
    config: C,
    label: &str,
    (requests, errors, seconds, histograms): (u64, u64, f64, Histograms),
    json: bool,
) -> anyhow::Result<()> {
    let mut all = histogram()?;
    for h in histograms.values() {
        all.add(h)?;
    }
    let by_kind: BTreeMap<&'static str, KindOutcome> = if histograms.len() > 1 {
        histograms.iter().map(|(k, h)| (*k, KindOutcome { requests: h.len(), latency_us: percentiles(h) })).collect()
    } else {
        BTreeMap::new()
    };
    let outcome = Outcome {
        config,
        requests,
        errors,
        seconds,
        requests_per_second: requests as f64 / seconds,
        latency_us: percentiles(&all),
        by_kind,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
        return Ok(());
    }
    println!("{label}: {requests} in {seconds:.2} s, {errors} errors");
    println!("  throughput: {:.0}/s", outcome.requests_per_second);
    let line = |l: &BTreeMap<&'static str, u64>| {
        format!(
            "p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
            ms(l["p50"]),
            ms(l["p95"]),
            ms(l["p99"]),
            ms(l["p99.9"]),
            ms(l["max"])
        )
    };
    println!("  latency: {}", line(&outcome.latency_us));
    for (kind, k) in &outcome.by_kind {
        println!("    {kind:<9} {:>8}: {}", k.requests, line(&k.latency_us));
    }
    Ok(())
}

/// The parsed `--mix`: cumulative weights of each operation kind.
fn parse_mix(mix: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for part in mix.split(',').filter(|p| !p.is_empty()) {
        let (name, weight) = part.split_once('=').with_context(|| format!("--mix {part}: expected NAME=WEIGHT"))?;
        if !["spawn", "schedule", "report", "observe"].contains(&name) {
            bail!("--mix {name}: one of spawn, schedule, report, observe");
        }
        out.push((name.to_owned(), weight.parse().with_context(|| format!("--mix {part}"))?));
    }
    if out.iter().map(|(_, w)| w).sum::<u64>() == 0 {
        bail!("--mix: the weights add up to 0");
    }
    Ok(out)
}

fn pick(mix: &[(String, u64)], i: u64) -> &str {
    let total: u64 = mix.iter().map(|(_, w)| w).sum();
    let mut at = i % total;
    for (name, weight) in mix {
        if at < *weight {
            return name;
        }
        at -= weight;
    }
    "observe"
}

/// Runs the kernel load and prints the result.
pub(crate) async fn kernel(load: KernelLoad) -> anyhow::Result<()> {
    let mix = parse_mix(&load.mix)?;
    // The operator issues the token; the load runs on a connection admitted with it.
    let operator = load.nats.connect("toka-load-operator", toka_contract::access::Role::Operator, 30_000).await?;
    let admin = std::fs::read_to_string(&load.admin_key_file)
        .with_context(|| format!("the admin key {}", load.admin_key_file.display()))?;
    let agent_actions = [
        Action::Spawn,
        Action::Schedule,
        Action::Observe,
        Action::Report,
        Action::Read,
        Action::Suspend,
        Action::Resume,
        Action::Terminate,
        Action::Cancel,
    ];
    let caps = vec![Capability::new(Pattern::AnyAgent, &agent_actions)];
    // Each token lives an hour; a longer run connects again with a fresh one before it expires.
    let sub: toka_contract::spec::Principal = "load".parse()?;
    let source: toka_client::TokenSource = Arc::new(move || {
        let (operator, admin, sub, caps) = (operator.clone(), admin.clone(), sub.clone(), caps.clone());
        Box::pin(async move {
            let ttl = Duration::from_secs(3_600);
            Ok(Client::issue_token(&operator, &admin, sub, caps, ttl, false).await?.token)
        })
    });
    let client = Client::connect_renewing(&load.nats.config(30_000), "toka-load", source)
        .await
        .context("issuing a token and connecting with it")?;
    let run_id = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_micros() as u64;
    let fresh = Arc::new(AtomicU64::new(0));
    let op_id = {
        let fresh = fresh.clone();
        move || OpId::from_u128(u128::from(run_id) << 64 | u128::from(fresh.fetch_add(1, Ordering::Relaxed)))
    };
    let root = AgentSpec { name: "load-root".parse()?, parent: None, limits: Default::default() };
    let reply = client.submit(Operation::SpawnAgent(root)).await.context("spawning the root")?;
    let Some(Event::AgentSpawned { agent: root, .. }) = reply.events.first() else { bail!("no agent spawned") };
    let root: AgentId = *root;
    eprintln!(
        "config: {} clients, {} s warm-up + {} s measured, mix {}, agents under {root}, {}",
        load.clients.concurrency, load.clients.warmup, load.clients.duration, load.mix, load.nats.url
    );
    let mix = Arc::new(mix);
    let queue: toka_contract::spec::QueueName = "load".parse()?;
    let observation: toka_contract::spec::ObservationKind = "load.tick".parse()?;
    let name: toka_contract::spec::AgentName = "load-agent".parse()?;
    let session = client.clone();
    let result = drive(&load.clients, "operations", move |client, i| {
        let (kind, op) = match pick(&mix, i.wrapping_mul(7).wrapping_add(client as u64)) {
            "spawn" => (
                "spawn",
                Operation::SpawnAgent(AgentSpec { name: name.clone(), parent: Some(root), limits: Default::default() }),
            ),
            "schedule" => (
                "schedule",
                Operation::ScheduleTask(TaskSpec {
                    agent: root,
                    queue: queue.clone(),
                    payload: "x".repeat(120),
                    priority: 5,
                    timeouts: Default::default(),
                    retry: Default::default(),
                }),
            ),
            "report" => ("report", Operation::ReportMemory { agent: root, bytes: 1_000_000 + i }),
            _ => (
                "observe",
                Operation::EmitObservation {
                    agent: root,
                    kind: observation.clone(),
                    body: format!("client {client} op {i}"),
                },
            ),
        };
        let (op_id, session) = (op_id(), session.clone());
        async move {
            // Sent raw, not through `Client::submit` (which checks each reply against its
            // schema), as the plain NATS load is: the generator shares the machine with what
            // it measures, so it does no more than it must. A reply without the services-API
            // error header is an acknowledged operation; an error's body says why.
            let (bus, token) = session.connection().await.map_err(|e| e.to_string())?;
            let body = serde_json::to_vec(&SubmitRequest { op_id, token, op }).map_err(|e| e.to_string())?;
            let message = bus.client().request(subject::KERNEL_SUBMIT.subject, body.into()).await;
            let message = message.map_err(|e| e.to_string())?;
            match message.headers.as_ref().and_then(|h| h.get(ERROR_HEADER)) {
                None => Ok(kind),
                Some(error) => Err(format!("{error}: {}", String::from_utf8_lossy(&message.payload))),
            }
        }
    })
    .await?;
    report(load.clone(), "kernel submit, durable", result, load.clients.json)
}

/// Runs the plain NATS request/reply baseline and prints the result.
pub(crate) async fn nats(load: NatsLoad) -> anyhow::Result<()> {
    let config = NatsConfig {
        url: load.nats_url.clone(),
        nkey_seed_file: load.creds.clone(),
        state_nkey_seed_file: None,
        connect_timeout_ms: 3_000,
        request_timeout_ms: 30_000,
    };
    let responder = Bus::connect(&config, "toka-load-echo", INBOXES).await?;
    let bus = Bus::connect(&config, "toka-load", INBOXES).await?;
    let echo_subject = format!("toka.load.echo.{}", std::process::id());
    let mut requests = responder.client().subscribe(echo_subject.clone()).await?;
    let echo_client = responder.client().clone();
    tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                let _ = echo_client.publish(reply, message.payload).await;
            }
        }
    });
    responder.client().flush().await?;
    eprintln!(
        "config: {} clients, {} s warm-up + {} s measured, {}-byte echo over {} (no service behind it)",
        load.clients.concurrency, load.clients.warmup, load.clients.duration, load.payload, load.nats_url
    );
    let payload = bytes::Bytes::from(vec![b'x'; load.payload]);
    let client = bus.client().clone();
    let result = drive(&load.clients, "requests", move |_, _| {
        let (client, subject, payload) = (client.clone(), echo_subject.clone(), payload.clone());
        async move { client.request(subject, payload).await.map(|_| "echo").map_err(|e| e.to_string()) }
    })
    .await?;
    report(load.clone(), "plain NATS request/reply", result, load.clients.json)
}
