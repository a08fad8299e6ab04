//! `toka-kernel`: the deterministic state machine and single sequencer for agents and tasks.
//!
//! - [`run`]: the service: `toka.kernel.v1.{submit, submit_batch, agent.get, agent.list,
//!   task.get, task.list, health}` on the NATS services API, `/livez`, `/readyz` and
//!   `/metrics` on the admin port; stops gracefully when `shutdown` resolves.
//! - [`Config`]: its configuration (`toka-kernel --dump-config` prints every key).
//! - [`machine`]: the pure state machine: `State::apply(op, ctx)`, refusal rules, the state
//!   hash, snapshots and replay. No async, no I\/O, no clock, no randomness, ordered maps only.
//! - [`sequencer`]: the one task that owns the state: sequencing, group commit, rebuilds.
//! - [`recovery`]: the state rebuilt from storage (snapshot + replay), snapshots stored.
//!
//! One instance is active: it holds the sequencer lease (NATS KV bucket `toka_kernel`, key
//! `sequencer`); another waits as a standby, not ready, and takes over when the lease lapses,
//! after rebuilding its state from the log. This crate depends on `toka-shared` only, never
//! on another service.

pub mod machine;
pub mod recovery;
pub mod sequencer;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toka_shared::api::auth::{Claims, DelegateRequest, TokenReply};
use toka_shared::api::kernel::{
    AgentGetRequest, AgentListReply, AgentListRequest, AgentView, SubmitBatchReply, SubmitBatchRequest, SubmitReply,
    SubmitRequest, TaskGetRequest, TaskListReply, TaskListRequest, TaskView,
};
use toka_shared::capability::Target;
use toka_shared::record::Hash;
use toka_shared::runtime::audit::{self, Ledger};
use toka_shared::runtime::bus::Bus;
use toka_shared::runtime::config::{AdminConfig, NatsConfig, ShutdownConfig, TelemetryConfig};
use toka_shared::runtime::host::{self, Host};
use toka_shared::runtime::lease::{self, Lease};
use toka_shared::runtime::limit::{self, Limits, Rate};
use toka_shared::runtime::shutdown::{patiently, unless};
use toka_shared::runtime::verifier::{LiveVerifier, VerifierConfig};
use toka_shared::wire::{ErrorCode, Reply, WireError};
use toka_shared::{Action, Capability, subject};
use tokio::sync::{mpsc, oneshot, watch};

use crate::machine::State;
use crate::sequencer::{Input, Sequencer};

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_shared::subject::service::KERNEL;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str = "Toka kernel: the deterministic state machine and single sequencer for agents and tasks";

/// The key-value bucket of the sequencer lease.
pub const LEASE_BUCKET: &str = "toka_kernel";
/// The lease's key.
pub const LEASE_KEY: &str = "sequencer";

/// The kernel's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// This instance's name in the lease (letters, digits, `-`, `_`); random when empty.
    pub instance: String,
    /// The sequencer lease's time to live, in milliseconds (renewed every third of it); a
    /// standby takes over this long after the active instance stops renewing.
    pub lease_ttl_ms: u64,
    /// How often the sequencer looks for passed task deadlines (and logs a tick), in ms.
    pub tick_ms: u64,
    /// The most records in one storage append.
    pub max_batch_records: usize,
    /// The most bytes of records in one storage append (under NATS's 1 MiB payload limit).
    pub max_batch_bytes: usize,
    /// Storage appends in flight at once.
    pub max_in_flight: usize,
    /// Operations and queries waiting for the sequencer; beyond, callers get `unavailable`.
    pub queue_limit: usize,
    /// A snapshot is stored after this many records (0: never).
    pub snapshot_every: u64,
    /// How far back, in sequence numbers, a repeated operation id returns the first result.
    pub idempotency_window: u64,
    /// Rate limits per principal: `submit` (each operation) and `query`.
    pub rate_limits: BTreeMap<String, Rate>,
    /// The longest lifetime of a spawned agent's token, in milliseconds (never past the
    /// spawner's own token).
    pub agent_token_ttl_ms: u64,
    /// How often aggregated denials are written to the audit log, in milliseconds.
    pub audit_interval_ms: u64,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            instance: String::new(),
            lease_ttl_ms: 6_000,
            tick_ms: 100,
            max_batch_records: 2_000,
            max_batch_bytes: 800_000,
            max_in_flight: 2,
            queue_limit: 20_000,
            snapshot_every: 100_000,
            idempotency_window: machine::DEFAULT_IDEMPOTENCY_WINDOW,
            rate_limits: BTreeMap::from([
                ("submit".to_owned(), Rate::new(20_000, 40_000)),
                ("query".to_owned(), Rate::new(5_000, 10_000)),
            ]),
            agent_token_ttl_ms: 3_600_000,
            audit_interval_ms: 1_000,
        }
    }
}

/// The service's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS connection.
    pub nats: NatsConfig,
    /// Admin HTTP probes and metrics.
    pub admin: AdminConfig,
    /// Logs, traces and metrics.
    pub telemetry: TelemetryConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// The sequencer.
    pub kernel: KernelConfig,
    /// Token verification.
    pub verifier: VerifierConfig,
}

toka_shared::service_config!(Config);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The services-API host could not start.
    #[error(transparent)]
    Host(#[from] host::Error),
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The rate limits are invalid.
    #[error("kernel.rate_limits: {0}")]
    Limits(#[from] limit::Error),
    /// The lease bucket could not be opened.
    #[error(transparent)]
    Lease(#[from] lease::Error),
    /// Another instance took the sequencer lease: this one stopped sequencing at once.
    #[error("the sequencer lease was lost; stopped so the new holder is the only sequencer")]
    LeaseLost,
    /// The log does not replay.
    #[error(transparent)]
    Recovery(#[from] recovery::Error),
}

/// What the endpoints share.
struct Kernel {
    bus: Bus,
    audit: Ledger,
    verifier: LiveVerifier,
    limits: Limits,
    inputs: mpsc::Sender<Input>,
    agent_token_ttl_ms: u64,
}

fn unavailable(message: &str) -> WireError {
    WireError::new(ErrorCode::Unavailable, message).with_retry_after_ms(100)
}

impl Kernel {
    fn enqueue(&self, input: Input) -> Result<(), WireError> {
        self.inputs.try_send(input).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => unavailable("the kernel is at its queue limit"),
            mpsc::error::TrySendError::Closed(_) => unavailable("the kernel is stopping"),
        })
    }

    /// The claims of `token`; a token that does not verify is audited.
    async fn verified(&self, token: &str, class: &str) -> Result<Claims, WireError> {
        self.verifier.verify(token).await.inspect_err(|e| {
            if e.code == ErrorCode::Unauthorized {
                self.audit.deny(UNVERIFIED, &format!("kernel.{class}"), "token", &e.message);
            }
        })
    }

    /// The claims of `token`, within the rate limit of `class`.
    async fn caller(&self, token: &str, class: &str) -> Result<Claims, WireError> {
        let claims = self.verified(token, class).await?;
        self.limits.check(class, claims.sub.as_str())?;
        Ok(claims)
    }

    /// Records a refused operation in the audit log (aggregated per principal and interval).
    fn audit_refusal(&self, claims: &Claims, op_type: &str, e: &WireError) {
        if e.code == ErrorCode::Forbidden {
            let resource = e.details.get("resource").and_then(|r| r.as_str()).unwrap_or("");
            self.audit.deny(claims.sub.as_str(), op_type, resource, &e.message);
        }
    }

    async fn submit_one(
        &self,
        claims: &toka_shared::api::auth::Claims,
        op_id: toka_shared::OpId,
        op: toka_shared::Operation,
    ) -> Result<oneshot::Receiver<Result<sequencer::Applied, WireError>>, WireError> {
        let (reply, wait) = oneshot::channel();
        self.enqueue(Input::Submit { op_id, principal: claims.sub.clone(), caps: claims.caps.clone(), op, reply })?;
        Ok(wait)
    }

    async fn submit(&self, req: SubmitRequest) -> Result<SubmitReply, WireError> {
        let claims = self.caller(&req.token, "submit").await?;
        let op_type = req.op.type_name();
        let wait = self.submit_one(&claims, req.op_id, req.op).await?;
        let outcome = wait.await.map_err(|_| unavailable("the kernel is stopping"))?;
        self.reply(&req.token, &claims, op_type, outcome).await
    }

    /// The reply to a sequenced operation: a refusal is audited; a spawn gets the new agent's
    /// token, a claim the task's payload.
    async fn reply(
        &self,
        token: &str,
        claims: &Claims,
        op_type: &str,
        outcome: Result<sequencer::Applied, WireError>,
    ) -> Result<SubmitReply, WireError> {
        let sequencer::Applied { accepted, durable } =
            outcome.inspect_err(|e| self.audit_refusal(claims, op_type, e))?;
        let durable = async { durable.await.unwrap_or_else(|_| Err(unavailable("the kernel is stopping"))) };
        let spawned = match (accepted.events.first(), accepted.agent_grant.clone()) {
            (Some(toka_shared::Event::AgentSpawned { agent, .. }), Some(grant)) => Some((*agent, grant)),
            _ => None,
        };
        let (durable, agent_token) = match spawned {
            // Asked for while the spawn is made durable, not after, when auth needs no descent
            // from the log: the reply waits for both, and if the spawn does not become durable
            // the token is dropped unseen (its delegation stays in the audit log, for an agent
            // that never existed).
            Some((agent, grant)) if !grant.through_descent => {
                tokio::join!(durable, self.agent_token(token, claims, agent, grant.capability))
            }
            Some((agent, grant)) => match durable.await {
                Ok(()) => (Ok(()), self.agent_token(token, claims, agent, grant.capability).await),
                Err(e) => (Err(e), None),
            },
            None => (durable.await, None),
        };
        durable?;
        Ok(SubmitReply {
            seq: accepted.seq,
            time_us: accepted.time_us,
            events: accepted.events,
            agent_token,
            task_payload: accepted.task_payload,
        })
    }

    /// A token for a newly spawned agent, delegated by auth from the caller's: `capability`
    /// (the actions of the caller's widest capability over the new agent, on
    /// `agent:<id>/**`), for at most `kernel.agent_token_ttl_ms` and never past the caller's
    /// own expiry. The spawn is durable whatever happens here; without a token the reply says
    /// so by leaving it out.
    async fn agent_token(
        &self,
        token: &str,
        claims: &Claims,
        agent: toka_shared::AgentId,
        capability: Capability,
    ) -> Option<String> {
        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        let left_ms = claims.exp.saturating_sub(now_s + 1).saturating_mul(1_000);
        let ttl_ms = left_ms.min(self.agent_token_ttl_ms);
        if ttl_ms < 1_000 {
            return None;
        }
        let sub = format!("agent:{agent}").parse().ok()?;
        let request = DelegateRequest {
            token: token.to_owned(),
            sub: Some(sub),
            capabilities: vec![capability],
            ttl_ms,
            one_time: false,
        };
        match self.bus.request::<_, TokenReply>(subject::AUTH_DELEGATE.subject, &request).await {
            Ok(reply) => Some(reply.token),
            Err(e) => {
                tracing::warn!(%agent, error = %e, "no token for the spawned agent");
                None
            }
        }
    }

    async fn submit_batch(&self, req: SubmitBatchRequest) -> Result<SubmitBatchReply, WireError> {
        // Verified once; each operation then takes its own place under the submit limit.
        let claims = self.verified(&req.token, "submit").await?;
        let mut waits = Vec::with_capacity(req.ops.len());
        for item in req.ops {
            let op_type = item.op.type_name();
            let queued = match self.limits.check("submit", claims.sub.as_str()) {
                Ok(()) => self.submit_one(&claims, item.op_id, item.op).await,
                Err(e) => Err(e),
            };
            waits.push((op_type, queued));
        }
        let mut results = Vec::with_capacity(waits.len());
        for (op_type, wait) in waits {
            let result = match wait {
                Ok(wait) => {
                    let outcome = wait.await.unwrap_or_else(|_| Err(unavailable("the kernel is stopping")));
                    self.reply(&req.token, &claims, op_type, outcome).await
                }
                Err(e) => Err(e),
            };
            results.push(Reply::from(result));
        }
        Ok(SubmitBatchReply { results })
    }

    /// Runs `f` on the state; the answer is released once what was applied before is durable.
    async fn query<T: Send + 'static>(
        &self,
        token: &str,
        f: impl FnOnce(&State, &[Capability]) -> Result<T, WireError> + Send + 'static,
    ) -> Result<T, WireError> {
        let claims = self.caller(token, "query").await?;
        let (reply, wait) = oneshot::channel();
        let caps = claims.caps;
        self.enqueue(Input::Query(Box::new(move |state: &State| {
            let answer = f(state, &caps);
            Box::new(move || {
                let _ = reply.send(answer);
            })
        })))?;
        wait.await.map_err(|_| unavailable("the kernel is rebuilding its state"))?
    }
}

/// The principal of callers whose token did not verify, in audit records.
const UNVERIFIED: &str = "unverified";

fn not_found(what: String) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("{what} does not exist"))
}

fn forbidden(what: String) -> WireError {
    WireError::new(ErrorCode::Forbidden, format!("no capability allows read on {what}"))
}

fn page_limit(limit: u32) -> usize {
    limit.clamp(1, toka_shared::api::MAX_PAGE) as usize
}

fn readable_task(state: &State, caps: &[Capability], view: &TaskView) -> bool {
    state.permits(caps, Action::Read, Target::Agent(view.agent))
        || state.permits(caps, Action::Read, Target::Queue(&view.queue))
}

fn agent_get(state: &State, caps: &[Capability], req: &AgentGetRequest) -> Result<AgentView, WireError> {
    let view = state.agent_view(req.agent).ok_or_else(|| not_found(format!("agent {}", req.agent)))?;
    if !state.permits(caps, Action::Read, Target::Agent(req.agent)) {
        return Err(forbidden(format!("agent:{}", req.agent)));
    }
    Ok(view)
}

fn agent_list(state: &State, caps: &[Capability], req: &AgentListRequest) -> AgentListReply {
    let limit = page_limit(req.limit);
    let mut agents = Vec::new();
    let mut next_after = None;
    let ids = state.agent_ids().filter(|id| req.after.is_none_or(|after| *id > after));
    for id in ids {
        let Some(view) = state.agent_view(id) else { continue };
        let wanted = req.parent.is_none_or(|p| view.parent == Some(p)) && req.state.is_none_or(|s| view.state == s);
        if !wanted || !state.permits(caps, Action::Read, Target::Agent(id)) {
            continue;
        }
        if agents.len() == limit {
            next_after = agents.last().map(|v: &AgentView| v.agent);
            break;
        }
        agents.push(view);
    }
    AgentListReply { agents, next_after }
}

fn task_get(state: &State, caps: &[Capability], req: &TaskGetRequest) -> Result<TaskView, WireError> {
    let view = state.task_view(req.task).ok_or_else(|| not_found(format!("task {}", req.task)))?;
    if !readable_task(state, caps, &view) {
        return Err(forbidden(format!("task {}", req.task)));
    }
    Ok(view)
}

fn task_list(state: &State, caps: &[Capability], req: &TaskListRequest) -> TaskListReply {
    let limit = page_limit(req.limit);
    let mut tasks = Vec::new();
    let mut next_after = None;
    for id in state.task_ids().filter(|id| req.after.is_none_or(|after| *id > after)) {
        let Some(view) = state.task_view(id) else { continue };
        let wanted = req.agent.is_none_or(|a| view.agent == a)
            && req.queue.as_ref().is_none_or(|q| view.queue == *q)
            && req.state.is_none_or(|s| view.state == s);
        if !wanted || !readable_task(state, caps, &view) {
            continue;
        }
        if tasks.len() == limit {
            next_after = tasks.last().map(|v: &TaskView| v.task);
            break;
        }
        tasks.push(view);
    }
    TaskListReply { tasks, next_after }
}

/// Runs the service on `bus` until `shutdown` resolves.
pub async fn run(config: Config, bus: Bus, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // Nobody watches: the receiver is dropped here, so the sequencer never hashes to report.
    let (report, _) = watch::channel((0, Hash::ZERO));
    run_reporting(config, bus, shutdown, report).await
}

/// As [`run`], reporting (durable sequence, state hash) on `report` whenever the state is
/// quiescent at a durable point (after recovery, and after commits that leave nothing pending).
pub async fn run_reporting(
    config: Config,
    bus: Bus,
    shutdown: impl Future<Output = ()>,
    report: watch::Sender<(u64, Hash)>,
) -> Result<(), Error> {
    let settings = config.kernel.clone();
    let instance =
        lease::candidate_name(&settings.instance).map_err(|e| Error::Setting(format!("kernel.instance = {e}")))?;
    if settings.lease_ttl_ms < 300 || settings.max_batch_records == 0 || settings.max_in_flight == 0 {
        return Err(Error::Setting(
            "kernel.lease_ttl_ms must be at least 300, kernel.max_batch_records and kernel.max_in_flight positive"
                .into(),
        ));
    }
    let limits = Limits::new(&settings.rate_limits)?;
    let grace = Duration::from_millis(config.shutdown.grace_ms);
    let mut shutdown = Box::pin(shutdown);
    let mut host = Host::start(&bus, SERVICE_NAME, DESCRIPTION, &config.admin).await?;
    let stop_early = |host: Host| async move { host.shutdown(grace).await };

    // A standby waits here, not ready, until the active instance's lease lapses.
    let lease_ttl = Duration::from_millis(settings.lease_ttl_ms);
    let Some(mut lease) = patiently(&mut shutdown, "the lease bucket", || {
        Lease::open(&bus, LEASE_BUCKET, LEASE_KEY, &instance, lease_ttl)
    })
    .await
    else {
        stop_early(host).await;
        return Ok(());
    };
    let every = lease.renew_every();
    let acquired = async {
        while !lease.renew().await {
            tokio::time::sleep(every).await;
        }
    };
    if unless(&mut shutdown, acquired).await.is_none() {
        stop_early(host).await;
        return Ok(());
    }
    tracing::info!(%instance, "sequencer lease held");
    let Some(verifier) =
        patiently(&mut shutdown, "auth (JWKS and revocations)", || LiveVerifier::start(&bus, config.verifier.clone()))
            .await
    else {
        lease.release().await;
        stop_early(host).await;
        return Ok(());
    };
    let window = settings.idempotency_window;
    let Some(recovered) = patiently(&mut shutdown, "the kernel log", || recovery::recover(&bus, window)).await else {
        lease.release().await;
        stop_early(host).await;
        return Ok(());
    };
    let state_hash = recovered.state.hash().map(|h| h.to_string()).unwrap_or_default();
    tracing::info!(
        seq = recovered.state.last_seq(),
        snapshot = recovered.snapshot_seq,
        replayed = recovered.replayed,
        state_hash,
        "state recovered from the log"
    );

    let audit_settings = audit::Settings {
        max_token_ttl_us: 0,
        interval: Duration::from_millis(settings.audit_interval_ms.max(10)),
        commit_timeout: Duration::from_millis(config.nats.request_timeout_ms.saturating_mul(2)),
        revocations: false,
    };
    let observer: audit::Observer = Arc::new(|_: &toka_shared::Event| {});
    let Some(audit_log) = patiently(&mut shutdown, "the audit log", || {
        Ledger::start(bus.clone(), audit_settings.clone(), observer.clone())
    })
    .await
    else {
        lease.release().await;
        stop_early(host).await;
        return Ok(());
    };
    let (inputs, rx) = mpsc::channel(settings.queue_limit.max(1));
    let sequencer_settings = sequencer::Settings {
        max_batch_records: settings.max_batch_records,
        max_batch_bytes: settings.max_batch_bytes,
        max_in_flight: settings.max_in_flight,
        tick: Duration::from_millis(settings.tick_ms.max(1)),
        snapshot_every: settings.snapshot_every,
        idempotency_window: window,
    };
    let (stop_sequencer, sequencer_stop) = watch::channel(false);
    let sequencer =
        tokio::spawn(Sequencer::new(bus.clone(), sequencer_settings, recovered, report).run(rx, sequencer_stop));
    let kernel = Arc::new(Kernel {
        bus: bus.clone(),
        audit: audit_log.clone(),
        verifier,
        limits,
        inputs,
        agent_token_ttl_ms: settings.agent_token_ttl_ms,
    });
    register(&mut host, &kernel).await?;

    // Renew the lease; if it is lost, stop at once: the new holder is the only sequencer.
    let (lost_tx, mut lost_rx) = watch::channel(false);
    let keeper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if !lease.renew().await {
                let _ = lost_tx.send(true);
                return lease;
            }
            if lost_tx.is_closed() {
                return lease;
            }
        }
    });
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = {
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = lost_rx.wait_for(|l| *l) => lost.store(true, std::sync::atomic::Ordering::SeqCst),
            }
        }
    };
    let cleanup = async {
        // No more inputs: the sequencer finishes what is in flight and returns.
        let _ = stop_sequencer.send(true);
        let _ = sequencer.await;
        // The last interval's denials.
        audit_log.close().await;
        keeper.abort();
        if let Ok(mut lease) = keeper.await {
            lease.release().await;
        }
    };
    host.serve_until_then(&bus, stop, grace, cleanup).await;
    if lost.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(Error::LeaseLost);
    }
    Ok(())
}

async fn register(host: &mut Host, kernel: &Arc<Kernel>) -> Result<(), Error> {
    macro_rules! serve {
        ($endpoint:expr, $req:ty, |$k:ident, $r:ident| $body:expr) => {{
            let kernel = kernel.clone();
            host.endpoint($endpoint, move |$r: $req| {
                let $k = kernel.clone();
                async move { $body }
            })
            .await?;
        }};
    }
    serve!(subject::KERNEL_SUBMIT, SubmitRequest, |k, req| k.submit(req).await);
    serve!(subject::KERNEL_SUBMIT_BATCH, SubmitBatchRequest, |k, req| k.submit_batch(req).await);
    serve!(subject::KERNEL_AGENT_GET, AgentGetRequest, |k, req| {
        let token = req.token.clone();
        k.query(&token, move |state, caps| agent_get(state, caps, &req)).await
    });
    serve!(subject::KERNEL_AGENT_LIST, AgentListRequest, |k, req| {
        let token = req.token.clone();
        k.query(&token, move |state, caps| Ok(agent_list(state, caps, &req))).await
    });
    serve!(subject::KERNEL_TASK_GET, TaskGetRequest, |k, req| {
        let token = req.token.clone();
        k.query(&token, move |state, caps| task_get(state, caps, &req)).await
    });
    serve!(subject::KERNEL_TASK_LIST, TaskListRequest, |k, req| {
        let token = req.token.clone();
        k.query(&token, move |state, caps| Ok(task_list(state, caps, &req))).await
    });
    Ok(())
}
