//! The service: start-up, the endpoints on the NATS services API, and the loops that keep
//! the keys, send the heartbeat and follow other replicas.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use toka_contract::access::Role;
use toka_contract::api::auth::{
    JwksReply, JwksRequest, RevocationsReply, RevocationsRequest, RotateReply, RotateRequest,
};
use toka_contract::capability::Action;
use toka_contract::spec::Principal;
use toka_contract::wire::{ErrorCode, Reply, WireError};
use toka_contract::{Event, subject};
use toka_runtime::audit::{self, Ledger};
use toka_runtime::bus::Bus;
use toka_runtime::host::Host;
use toka_runtime::lease::{self, Lease};
use toka_runtime::limit::Limits;
use toka_runtime::now_us;
use toka_runtime::shutdown::{patiently, unless};
use toka_runtime::token::Verifier;

use crate::callout::{self, Callout};
use crate::handlers::{Auth, read, read_admin_key, write};
use crate::keys::{KeyRing, KeyStore};
use crate::kick;
use crate::revocations::Revocations;
use crate::{Config, DESCRIPTION, Error, LEASE_BUCKET, LEASE_KEY, SERVICE_NAME};

/// Runs the service on `bus` until `shutdown` resolves.
pub async fn run(config: Config, bus: Bus, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let settings = config.auth.clone();
    let admin_key = settings.admin_key_file.as_deref().map(read_admin_key).transpose()?;
    if admin_key.is_none() {
        tracing::warn!("no auth.admin_key_file: only tokens holding issue on token:* can issue tokens");
    }
    let admin_principal: Principal =
        settings.admin_principal.parse().map_err(|e| Error::Setting(format!("auth.admin_principal: {e}")))?;
    let instance =
        lease::candidate_name(&settings.instance).map_err(|e| Error::Setting(format!("auth.instance = {e}")))?;
    if settings.max_delegation_depth == 0 || settings.heartbeat_ms == 0 || settings.lease_ttl_ms < 300 {
        return Err(Error::Setting(
            "auth.max_delegation_depth and auth.heartbeat_ms must be positive, auth.lease_ttl_ms at least 300".into(),
        ));
    }
    let limits = Limits::new(&settings.rate_limits)?;
    let callout = connect_callout(&config).await?;
    // The lease and the heartbeat: a user of their own, which serves no request.
    let state = Bus::connect_state(&config.nats, "toka-auth-state", &Role::AuthState.inbox()).await?;
    let store = KeyStore::open(&settings.key_dir)?;
    let ring = store.load()?;
    let mut shutdown = Box::pin(shutdown);
    let mut host = Host::start(&bus, SERVICE_NAME, DESCRIPTION, &config.admin).await?;
    let grace = Duration::from_millis(config.shutdown.grace_ms);

    let verifier = Arc::new(RwLock::new(
        Verifier::new(&JwksReply { keys: Vec::new() }, settings.leeway_s).map_err(|e| Error::Setting(e.to_string()))?,
    ));
    let keys_changed = Arc::new(tokio::sync::Notify::new());
    // Revocations, for closing the revoked tokens' open connections.
    let (revoked_tx, revoked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let observer: audit::Observer = {
        let verifier = verifier.clone();
        let keys_changed = keys_changed.clone();
        Arc::new(move |event: &Event| match event {
            Event::TokenRevoked { jti, .. } => {
                write(&verifier).revoke(*jti);
                let _ = revoked_tx.send(jti.to_string());
            }
            Event::KeyRotated { .. } => keys_changed.notify_one(),
            _ => {}
        })
    };
    let max_token_ttl_us = settings.max_token_ttl_ms.saturating_mul(1_000);
    let leeway_us = settings.leeway_s.saturating_mul(1_000_000);
    let ledger_settings = audit::Settings {
        interval: Duration::from_millis(settings.audit_interval_ms.max(10)),
        commit_timeout: Duration::from_millis(config.nats.request_timeout_ms.saturating_mul(2)),
    };
    // Storage may start after us: wait for the audit log, not ready meanwhile.
    let waiting = || {
        Ledger::start(
            bus.clone(),
            ledger_settings.clone(),
            Revocations::new(max_token_ttl_us + leeway_us, leeway_us),
            observer.clone(),
        )
    };
    let Some(ledger) = patiently(&mut shutdown, "the audit log", waiting).await else {
        host.shutdown(grace).await;
        return Ok(());
    };
    let lease_ttl = Duration::from_millis(settings.lease_ttl_ms);
    let lease = Lease::open(&state, LEASE_BUCKET, LEASE_KEY, &instance, lease_ttl).await?;
    let auth = Arc::new(Auth {
        config: settings,
        instance: instance.clone(),
        admin_key,
        admin_principal,
        store,
        ring: RwLock::new(KeyRing::empty()),
        verifier,
        ledger,
        limits,
        bus: bus.clone(),
        leader: AtomicBool::new(false),
        lease: tokio::sync::Mutex::new(lease),
        keys_changed,
    });
    auth.install(ring);

    // The lease and the keys: the holder keeps them, the others follow the store. Not ready
    // until a key signs.
    let keeper = tokio::spawn(keep_keys_loop(auth.clone()));
    let signing = async {
        while read(&auth.ring).signing().is_none() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if unless(&mut shutdown, signing).await.is_none() {
        keeper.abort();
        host.shutdown(grace).await;
        return Ok(());
    }

    let mut tasks = vec![
        keeper,
        tokio::spawn(heartbeat_loop(auth.clone(), state.clone())),
        tokio::spawn(follow_events(auth.clone())?),
        tokio::spawn(serve_forwarded_rotations(auth.clone()).await?),
    ];
    if let Some((callout, callout_bus, system_bus)) = &callout {
        host.register_metric(
            "auth_callout_refusals",
            "Client connections refused by the auth callout, by reason",
            callout.refusals(),
        );
        tasks.push(callout::serve(auth.clone(), callout.clone(), callout_bus.clone()).await?);
        tasks.push(tokio::spawn(kick::serve(system_bus.clone(), revoked_rx)));
    }
    register(&mut host, &auth).await?;
    tracing::info!(instance = %instance, "auth serving");
    let cleanup = async {
        for task in tasks {
            task.abort();
        }
        // The last interval's denials, then the lease, so a standby need not wait out the TTL.
        auth.ledger.close().await;
        auth.lease.lock().await.release().await;
    };
    host.serve_until_then(&bus, shutdown, grace, cleanup).await;
    state.drain().await;
    if let Some((_, callout_bus, system_bus)) = callout {
        callout_bus.drain().await;
        system_bus.drain().await;
    }
    Ok(())
}

/// The callout's keys and its own connection (so no client flood can starve it), and the
/// system user's connection that closes revoked tokens' connections, if configured.
async fn connect_callout(config: &Config) -> Result<Option<(Arc<Callout>, Bus, Bus)>, Error> {
    let c = &config.auth.callout;
    match (&c.nkey_seed_file, &c.issuer_seed_file, &c.xkey_seed_file, &c.system_nkey_seed_file) {
        (None, None, None, None) => {
            tracing::warn!("no auth.callout: clients connecting with tokens will be refused by NATS");
            Ok(None)
        }
        (Some(user), Some(issuer), Some(xkey), Some(system)) => {
            let callout = Callout::load(issuer, xkey)?;
            let bus = Bus::connect_user(&config.nats, user, "toka-auth-callout", &Role::AuthCallout.inbox()).await?;
            let system = Bus::connect_user(&config.nats, system, "toka-auth-system", &Role::AuthSystem.inbox()).await?;
            Ok(Some((Arc::new(callout), bus, system)))
        }
        _ => Err(Error::Setting(
            "auth.callout: set all of nkey_seed_file, issuer_seed_file, xkey_seed_file and system_nkey_seed_file, \
             or none"
                .into(),
        )),
    }
}

async fn register(host: &mut Host, auth: &Arc<Auth>) -> Result<(), Error> {
    host.serve(subject::AUTH_ISSUE, auth, |a, req| async move { a.issue(req).await }).await?;
    host.serve(subject::AUTH_DELEGATE, auth, |a, req| async move { a.delegate(req).await }).await?;
    host.serve(subject::AUTH_AGENT_TOKEN, auth, |a, req| async move { a.agent_token(req).await }).await?;
    host.serve(subject::AUTH_REVOKE, auth, |a, req| async move { a.revoke(req).await }).await?;
    host.serve(subject::AUTH_ROTATE, auth, |a, req| async move { a.rotate(req).await }).await?;
    // The keys and revocations, twice: for clients, each within its root's `read` budget (or,
    // without a verified token, the endpoint's small `unverified` one), and for the services'
    // verifiers, on subjects only services may publish to, with a budget of their own
    // (`service_read`), so no client flood keeps a kernel from starting or following a rotation.
    for (endpoint, service) in [(subject::AUTH_JWKS, false), (subject::AUTH_SERVICE_JWKS, true)] {
        host.serve(endpoint, auth, move |a, req: JwksRequest| {
            let reply = a.read_budget(service, "jwks", req.token.as_deref()).map(|()| read(&a.ring).jwks(now_us()));
            async move { reply }
        })
        .await?;
    }
    for (endpoint, service) in [(subject::AUTH_REVOCATIONS, false), (subject::AUTH_SERVICE_REVOCATIONS, true)] {
        host.serve(endpoint, auth, move |a, req: RevocationsRequest| {
            let page = req.limit.map_or(a.config.revocations_page, |l| l.min(a.config.revocations_page)) as usize;
            let reply: Result<RevocationsReply, WireError> = a
                .read_budget(service, "revocations", req.token.as_deref())
                .map(|()| a.ledger.fold_mut(|r| r.in_force(now_us(), req.after, page)));
            async move { reply }
        })
        .await?;
    }
    Ok(())
}

/// Renews the lease; as holder, keeps the keys; otherwise re-reads them when told or on each
/// renewal.
async fn keep_keys_loop(auth: Arc<Auth>) {
    let every = auth.lease.lock().await.renew_every();
    loop {
        let held = auth.lease.lock().await.renew().await;
        auth.leader.store(held, Ordering::SeqCst);
        if held {
            auth.keep_keys().await;
        } else {
            auth.reload();
        }
        auth.limits.forget_idle();
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = auth.keys_changed.notified() => {}
        }
        if !auth.leader.load(Ordering::SeqCst) {
            auth.reload();
        }
    }
}

async fn heartbeat_loop(auth: Arc<Auth>, state: Bus) {
    let mut tick = tokio::time::interval(Duration::from_millis(auth.config.heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(body) = serde_json::to_vec(&auth.heartbeat()) else { continue };
        if let Err(e) = state.client().publish(subject::AUTH_HEARTBEAT, body.into()).await {
            tracing::warn!(error = %e, "heartbeat not sent");
        }
    }
}

/// Auth events from the log (another replica's revocations and rotations): read the log.
fn follow_events(auth: Arc<Auth>) -> Result<impl Future<Output = ()>, Error> {
    Ok(async move {
        let mut events = match auth.bus.client().subscribe(subject::AUTH_EVENTS).await {
            Ok(s) => s,
            Err(e) => return tracing::error!(error = %e, "cannot follow auth events"),
        };
        while let Some(message) = events.next().await {
            let seq = serde_json::from_slice::<serde_json::Value>(&message.payload)
                .ok()
                .and_then(|v| v["tokaseq"].as_str().and_then(|s| s.split('.').next()?.parse::<u64>().ok()));
            if seq.is_none_or(|s| s > auth.ledger.head_seq()) {
                auth.ledger.tail();
            }
        }
    })
}

/// Rotation requests forwarded by other replicas to this one, as the lease holder.
async fn serve_forwarded_rotations(auth: Arc<Auth>) -> Result<impl Future<Output = ()>, Error> {
    let at = subject::auth_rotate_at(&auth.instance);
    let mut requests =
        auth.bus.client().subscribe(at.clone()).await.map_err(|e| Error::Subscribe(format!("{at}: {e}")))?;
    Ok(async move {
        while let Some(message) = requests.next().await {
            // Replies go to inboxes only, as the host's.
            let Some(reply_to) = message.reply.clone().filter(|r| toka_contract::access::is_inbox(r)) else { continue };
            let result = match serde_json::from_slice::<RotateRequest>(&message.payload) {
                Err(e) => Err(WireError::new(ErrorCode::BadRequest, e.to_string())),
                Ok(_) if !auth.leader.load(Ordering::SeqCst) => {
                    Err(WireError::new(ErrorCode::Unavailable, "this replica no longer holds the rotation lease")
                        .with_retry_after_ms(auth.config.lease_ttl_ms))
                }
                Ok(req) => match auth.authenticate(&req.credential, Action::Rotate, "key.rotate") {
                    Ok(principal) => auth.rotate_now(principal).await,
                    Err(e) => Err(e),
                },
            };
            let reply: Reply<RotateReply> = result.into();
            if let Ok(body) = serde_json::to_vec(&reply) {
                let _ = auth.bus.client().publish(reply_to, body.into()).await;
            }
        }
    })
}
