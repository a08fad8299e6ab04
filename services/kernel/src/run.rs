//! The service: start-up (lease, verifier, recovery, audit writer), the endpoints on the NATS
//! services API, the lease kept while serving, and shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use toka_contract::access::Role;
use toka_contract::api::kernel::{AgentGetRequest, AgentListRequest, TaskGetRequest, TaskListRequest};
use toka_contract::record::Hash;
use toka_contract::{Event, subject};
use toka_runtime::audit::{self, Ledger};
use toka_runtime::bus::Bus;
use toka_runtime::host::Host;
use toka_runtime::lease::{self, Lease};
use toka_runtime::limit::Limits;
use toka_runtime::shutdown::{patiently, unless};
use toka_runtime::verifier::LiveVerifier;
use tokio::sync::{mpsc, watch};

use crate::sequencer::{self, Clock, Sequencer};
use crate::service::Kernel;
use crate::{Config, DESCRIPTION, Error, LEASE_BUCKET, LEASE_KEY, SERVICE_NAME, queries, recovery};

/// Runs the service on `bus` until `shutdown` resolves.
pub async fn run(config: Config, bus: Bus, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    // Nobody watches: the receiver is dropped here, so the sequencer never hashes to report.
    let (report, _) = watch::channel((0, Hash::ZERO));
    run_reporting(config, bus, shutdown, report).await
}

/// The sequencer lease once held, and the task renewing it (from the moment it is taken, so
/// that a long recovery does not let it lapse).
struct Held {
    lease: Arc<tokio::sync::Mutex<Lease>>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Stops renewing and releases the lease, so a standby need not wait out its TTL.
    async fn release(self) {
        self.keeper.abort();
        let _ = self.keeper.await;
        self.lease.lock().await.release().await;
    }
}

/// What start-up holds until the kernel serves; [`Startup::abandon`] gives it back in order
/// when start-up stops early (shutdown asked for, or the lease lost, while waiting).
struct Startup {
    host: Host,
    held: Option<Held>,
    grace: Duration,
    lost: Arc<AtomicBool>,
}

impl Startup {
    /// Releases the lease and stops the host.
    async fn abandon(self) -> Result<(), Error> {
        if let Some(held) = self.held {
            held.release().await;
        }
        self.host.shutdown(self.grace).await;
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::LeaseLost);
        }
        Ok(())
    }
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
    let most = bus.max_payload().saturating_sub(4_096);
    if !(16_384..=most).contains(&settings.max_record_bytes) {
        return Err(Error::Setting(format!(
            "kernel.max_record_bytes = {} must be at least 16384 and at most the NATS server's max_payload less 4096 ({most})",
            settings.max_record_bytes
        )));
    }
    let limits = Limits::new(&settings.rate_limits)?;
    let grace = Duration::from_millis(config.shutdown.grace_ms);
    // Stop when asked to, or at once when the lease is lost: the new holder is the only
    // sequencer.
    let (lost_tx, mut lost_rx) = watch::channel(false);
    let lost = Arc::new(AtomicBool::new(false));
    let mut shutdown = Box::pin({
        let lost = lost.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                Ok(_) = lost_rx.wait_for(|l| *l) => lost.store(true, Ordering::SeqCst),
            }
        }
    });
    // The lease: a user of its own, which serves no request.
    let state = Bus::connect_state(&config.nats, "toka-kernel-state", &Role::KernelState.inbox()).await?;
    let host = Host::start(&bus, SERVICE_NAME, DESCRIPTION, &config.admin).await?;
    let mut startup = Startup { host, held: None, grace, lost: lost.clone() };

    // A standby waits here, not ready, until the active instance's lease lapses.
    let lease_ttl = Duration::from_millis(settings.lease_ttl_ms);
    let opened = patiently(&mut shutdown, "the lease bucket", || {
        Lease::open(&state, LEASE_BUCKET, LEASE_KEY, &instance, lease_ttl)
    });
    let Some(mut lease) = opened.await else { return startup.abandon().await };
    let every = lease.renew_every();
    let acquired = async {
        while !lease.renew().await {
            tokio::time::sleep(every).await;
        }
    };
    if unless(&mut shutdown, acquired).await.is_none() {
        lease.release().await;
        return startup.abandon().await;
    }
    // Renewed from now on, through the verifier's start and recovery as well as while serving.
    let lease = Arc::new(tokio::sync::Mutex::new(lease));
    let kept = lease.clone();
    let keeper = tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if !kept.lock().await.renew().await {
                let _ = lost_tx.send(true);
                return;
            }
            if lost_tx.is_closed() {
                return;
            }
        }
    });
    startup.held = Some(Held { lease, keeper });
    tracing::info!(%instance, "sequencer lease held");
    let verifier =
        patiently(&mut shutdown, "auth (JWKS and revocations)", || LiveVerifier::start(&bus, config.verifier.clone()));
    let Some(verifier) = verifier.await else { return startup.abandon().await };
    let window = settings.idempotency_window;
    let recovered = patiently(&mut shutdown, "the kernel log", || recovery::recover(&bus, window));
    let Some(recovered) = recovered.await else { return startup.abandon().await };
    let state_hash = recovered.state.hash().map(|h| h.to_string()).unwrap_or_default();
    tracing::info!(
        seq = recovered.state.last_seq(),
        snapshot = recovered.snapshot_seq,
        replayed = recovered.replayed,
        state_hash,
        "state recovered from the log"
    );
    let audit_settings = audit::Settings {
        interval: Duration::from_millis(settings.audit_interval_ms.max(10)),
        commit_timeout: Duration::from_millis(config.nats.request_timeout_ms.saturating_mul(2)),
    };
    let observer: audit::Observer = Arc::new(|_: &Event| {});
    let audit_log = patiently(&mut shutdown, "the audit log", || {
        Ledger::start(bus.clone(), audit_settings.clone(), (), observer.clone())
    });
    let Some(audit_log) = audit_log.await else { return startup.abandon().await };

    let (inputs, rx) = mpsc::channel(settings.queue_limit.max(1));
    let sequencer_settings = sequencer::Settings {
        max_batch_records: settings.max_batch_records,
        max_batch_bytes: settings.max_batch_bytes,
        max_record_bytes: settings.max_record_bytes,
        max_in_flight: settings.max_in_flight,
        tick: Duration::from_millis(settings.tick_ms.max(1)),
        snapshot_every: settings.snapshot_every,
        idempotency_window: window,
        clock: Clock::system(),
    };
    let (stop_sequencer, sequencer_stop) = watch::channel(false);
    let sequencer =
        tokio::spawn(Sequencer::new(bus.clone(), sequencer_settings, recovered, report).run(rx, sequencer_stop));
    let Startup { mut host, held, .. } = startup;
    let Some(held) = held else { return Ok(()) };
    let kernel = Arc::new(Kernel {
        bus: bus.clone(),
        audit: audit_log.clone(),
        verifier,
        limits,
        inputs,
        agent_token_ttl_ms: settings.agent_token_ttl_ms,
        instance: instance.clone(),
        lease: held.lease.clone(),
    });
    register(&mut host, &kernel).await?;

    let cleanup = async {
        // No more inputs: the sequencer finishes what is in flight and returns.
        let _ = stop_sequencer.send(true);
        let _ = sequencer.await;
        // The last interval's denials.
        audit_log.close().await;
        held.release().await;
    };
    host.serve_until_then(&bus, shutdown, grace, cleanup).await;
    state.drain().await;
    if lost.load(Ordering::SeqCst) {
        return Err(Error::LeaseLost);
    }
    Ok(())
}

async fn register(host: &mut Host, kernel: &Arc<Kernel>) -> Result<(), Error> {
    host.serve(subject::KERNEL_SUBMIT, kernel, |k, req| async move { k.submit(req).await }).await?;
    host.serve(subject::KERNEL_SUBMIT_BATCH, kernel, |k, req| async move { k.submit_batch(req).await }).await?;
    host.serve(subject::KERNEL_STATUS, kernel, |k, req| async move { k.status(req).await }).await?;
    host.serve(subject::KERNEL_AGENT_GET, kernel, |k, req: AgentGetRequest| async move {
        let token = req.token.clone();
        k.query(&token, move |state, caps| queries::agent_get(state, caps, &req)).await
    })
    .await?;
    host.serve(subject::KERNEL_AGENT_LIST, kernel, |k, req: AgentListRequest| async move {
        let token = req.token.clone();
        k.query(&token, move |state, caps| Ok(queries::agent_list(state, caps, &req))).await
    })
    .await?;
    host.serve(subject::KERNEL_TASK_GET, kernel, |k, req: TaskGetRequest| async move {
        let token = req.token.clone();
        k.query(&token, move |state, caps| queries::task_get(state, caps, &req)).await
    })
    .await?;
    host.serve(subject::KERNEL_TASK_LIST, kernel, |k, req: TaskListRequest| async move {
        let token = req.token.clone();
        k.query(&token, move |state, caps| Ok(queries::task_list(state, caps, &req))).await
    })
    .await?;
    Ok(())
}
