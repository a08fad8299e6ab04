//! `toka-auth`: Ed25519 capability tokens: issue, delegate, revoke, rotate, rate-limit, audit.
//!
//! - [`run`]: the service: `toka.auth.v1.{issue, delegate, revoke, jwks, rotate, revocations,
//!   health}` on the NATS services API, the revocation heartbeat on `toka.auth.v1.heartbeat`,
//!   `/livez`, `/readyz` and `/metrics` on the admin port; stops gracefully when `shutdown`
//!   resolves.
//! - [`keys`]: the signing keys, stored in the key directory and shared by replicas.
//! - [`Config`]: its configuration (`toka-auth --dump-config` prints every key).
//!
//! Replicas share the key directory; the one holding the rotation lease (a NATS key-value
//! entry with a TTL) creates, rotates and retires keys, the others re-read them, and a rotation
//! asked of another replica is forwarded to the holder. This crate depends on `toka-shared`
//! only, never on another service.

pub mod keys;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use toka_shared::api::auth::{
    Claims, Credential, DelegateRequest, Heartbeat, IssueRequest, JwksReply, JwksRequest, RevocationsReply,
    RevocationsRequest, RevokeReply, RevokeRequest, RotateReply, RotateRequest, TokenReply,
};
use toka_shared::api::storage::{QueryReply, QueryRequest};
use toka_shared::capability::{Action, NoLineage, Target};
use toka_shared::record::LogName;
use toka_shared::runtime::bus::Bus;
use toka_shared::runtime::config::{AdminConfig, NatsConfig, ShutdownConfig, TelemetryConfig};
use toka_shared::runtime::host::{self, Host};
use toka_shared::runtime::lease::{self, Lease};
use toka_shared::runtime::limit::{self, Limits, Rate};
use toka_shared::runtime::now_us;
use toka_shared::runtime::shutdown::{patiently, unless};
use toka_shared::runtime::token::{self, AUDIENCE, ISSUER, Verifier};
use toka_shared::spec::Principal;
use toka_shared::wire::{ErrorCode, Reply, WireError};
use toka_shared::{Event, TokenId, subject};

use crate::keys::{KeyRing, KeyStore};
use toka_shared::runtime::audit::{self as ledger, Entry, Ledger};

/// The name this service registers with the NATS services API.
pub const SERVICE_NAME: &str = toka_shared::subject::service::AUTH;

/// What `--help` and the services API say the service is.
pub const DESCRIPTION: &str =
    "Toka auth: Ed25519 capability tokens: issue, delegate, revoke, rotate, rate-limit, audit";

/// The key-value bucket of the rotation lease.
pub const LEASE_BUCKET: &str = "toka_auth";
/// The lease's key.
pub const LEASE_KEY: &str = "rotation";

/// Auth's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where the signing keys are kept (`keys.json`, mode 0600); every replica mounts the same
    /// directory.
    pub key_dir: PathBuf,
    /// A file (mode 0600) holding the admin key, the credential that may issue the first
    /// tokens. Without it, only tokens holding `issue` on `token:*` can issue.
    pub admin_key_file: Option<PathBuf>,
    /// The principal the admin key acts as, in audit records.
    pub admin_principal: String,
    /// How often the signing key rotates, in milliseconds.
    pub rotate_every_ms: u64,
    /// The longest lifetime of a token, in milliseconds; a retired key keeps verifying this
    /// long (plus the leeway) after its rotation.
    pub max_token_ttl_ms: u64,
    /// The deepest delegation chain.
    pub max_delegation_depth: u8,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// How often the revocation heartbeat is published, in milliseconds.
    pub heartbeat_ms: u64,
    /// The rotation lease's time to live, in milliseconds (renewed every third of it).
    pub lease_ttl_ms: u64,
    /// How often aggregated denials are written (and the audit log re-read), in milliseconds.
    pub audit_interval_ms: u64,
    /// This replica's name (letters, digits, `-`, `_`); random when empty.
    pub instance: String,
    /// Rate limits per principal for each operation class: `issue`, `delegate`, `revoke`,
    /// `rotate`, and `read` (JWKS and revocations, for all callers together).
    pub rate_limits: BTreeMap<String, Rate>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            key_dir: PathBuf::from("data/auth"),
            admin_key_file: None,
            admin_principal: "admin".to_owned(),
            rotate_every_ms: 24 * 3_600_000,
            max_token_ttl_ms: 24 * 3_600_000,
            max_delegation_depth: 5,
            leeway_s: 5,
            heartbeat_ms: 1_000,
            lease_ttl_ms: 15_000,
            audit_interval_ms: 1_000,
            instance: String::new(),
            rate_limits: BTreeMap::from([
                ("issue".to_owned(), Rate::new(100, 200)),
                ("delegate".to_owned(), Rate::new(1_000, 2_000)),
                ("revoke".to_owned(), Rate::new(100, 200)),
                ("rotate".to_owned(), Rate::new(1, 3)),
                ("read".to_owned(), Rate::new(1_000, 2_000)),
            ]),
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
    /// Tokens and keys.
    pub auth: AuthConfig,
}

toka_shared::service_config!(Config);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The services-API host could not start.
    #[error(transparent)]
    Host(#[from] host::Error),
    /// The key store is unusable.
    #[error(transparent)]
    Keys(#[from] keys::Error),
    /// The admin key file is unusable.
    #[error("auth.admin_key_file: {0}")]
    AdminKey(String),
    /// A setting is out of range.
    #[error("{0}")]
    Setting(String),
    /// The rate limits are invalid.
    #[error("auth.rate_limits: {0}")]
    Limits(#[from] limit::Error),
    /// The lease bucket could not be opened.
    #[error(transparent)]
    Lease(#[from] lease::Error),
    /// A subscription failed.
    #[error("subscribing to {0}")]
    Subscribe(String),
}

/// A fresh token id: the time, then 80 random bits.
fn fresh_jti(now_us: u64) -> Result<TokenId, WireError> {
    toka_shared::runtime::fresh_id(now_us)
        .map(TokenId::from_u128)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("no random source: {e}")))
}

/// Reads the admin key: a file of mode 0600 holding at least 32 characters.
fn read_admin_key(path: &std::path::Path) -> Result<blake3::Hash, Error> {
    use std::os::unix::fs::PermissionsExt as _;
    let fail = |reason: String| Error::AdminKey(format!("{}: {reason}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(fail(format!("mode {mode:o} lets others read the admin key; chmod 600 it")));
    }
    let key = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let key = key.trim();
    if key.len() < 32 {
        return Err(fail("the admin key must be at least 32 characters (`toka nats-config` writes one)".into()));
    }
    Ok(blake3::hash(key.as_bytes()))
}

/// Everything the endpoints share.
struct Auth {
    config: AuthConfig,
    instance: String,
    admin_key: Option<blake3::Hash>,
    admin_principal: Principal,
    store: KeyStore,
    ring: RwLock<KeyRing>,
    verifier: Arc<RwLock<Verifier>>,
    ledger: Ledger,
    limits: Limits,
    bus: Bus,
    leader: AtomicBool,
    lease: tokio::sync::Mutex<Lease>,
    keys_changed: Arc<tokio::sync::Notify>,
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The deepest agent tree walked when checking a delegation's descent.
const MAX_LINEAGE_DEPTH: usize = 64;

/// Parents of agents as the kernel log recorded them.
#[derive(Debug, Default)]
struct LogLineage {
    parents: BTreeMap<toka_shared::AgentId, Option<toka_shared::AgentId>>,
}

impl toka_shared::capability::Lineage for LogLineage {
    fn is_descendant(&self, agent: toka_shared::AgentId, ancestor: toka_shared::AgentId) -> bool {
        let mut at = self.parents.get(&agent).copied().flatten();
        for _ in 0..MAX_LINEAGE_DEPTH {
            match at {
                Some(p) if p == ancestor => return true,
                Some(p) => at = self.parents.get(&p).copied().flatten(),
                None => return false,
            }
        }
        false
    }
}

/// The principal of callers whose credential did not verify.
const UNVERIFIED: &str = "unverified";

impl Auth {
    fn overlap_us(&self) -> u64 {
        self.config
            .max_token_ttl_ms
            .saturating_mul(1_000)
            .saturating_add(self.config.leeway_s.saturating_mul(1_000_000))
    }

    /// Makes `ring` the one that signs and verifies.
    fn install(&self, ring: KeyRing) {
        let jwks = ring.jwks(now_us());
        *write(&self.ring) = ring;
        if let Err(e) = write(&self.verifier).set_keys(&jwks) {
            tracing::error!(error = %e, "the key ring holds an unusable key");
        }
    }

    /// Re-reads the shared key store (another replica may have rotated).
    fn reload(&self) {
        match self.store.load() {
            Ok(ring) => {
                if ring.kids() != read(&self.ring).kids() {
                    tracing::info!(kids = ?ring.kids(), "key ring reloaded");
                    self.install(ring);
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the key store"),
        }
    }

    /// Checks a token: signature, time, and that no link of its chain is revoked.
    fn verify(&self, token: &str) -> Result<Claims, token::Error> {
        read(&self.verifier).verify(token, now_us() / 1_000_000)
    }

    /// Who `credential` is, if it holds `action` on `token:*`; denials are audited.
    fn authenticate(&self, credential: &Credential, action: Action, what: &str) -> Result<Principal, WireError> {
        match credential {
            Credential::AdminKey(key) => {
                let Some(expected) = self.admin_key else {
                    let e = WireError::new(
                        ErrorCode::Unauthorized,
                        "no admin key is configured: set auth.admin_key_file to a file (mode 0600) holding one \
                         (`toka nats-config` writes <dir>/creds/admin.key), or present a token with this capability",
                    );
                    self.ledger.deny(UNVERIFIED, what, "token:*", &e.message);
                    return Err(e);
                };
                if blake3::hash(key.trim().as_bytes()) != expected {
                    let e = WireError::new(ErrorCode::Unauthorized, "the admin key does not match");
                    self.ledger.deny(UNVERIFIED, what, "token:*", &e.message);
                    return Err(e);
                }
                Ok(self.admin_principal.clone())
            }
            Credential::Token(token) => {
                let claims = self.verify(token).map_err(|e| {
                    self.ledger.deny(UNVERIFIED, what, "token:*", &e.to_string());
                    WireError::from(&e)
                })?;
                toka_shared::runtime::verifier::authorize(&claims, action, Target::Tokens, &NoLineage)
                    .inspect_err(|e| self.ledger.deny(claims.sub.as_str(), what, "token:*", &e.message))?;
                Ok(claims.sub)
            }
        }
    }

    fn limit(&self, class: &str, principal: &str) -> Result<(), WireError> {
        self.limits.check(class, principal)
    }

    fn sign(&self, claims: &Claims) -> Result<String, WireError> {
        let ring = read(&self.ring);
        let key = ring
            .signing()
            .ok_or_else(|| WireError::new(ErrorCode::Unavailable, "no signing key yet").with_retry_after_ms(1_000))?;
        key.sign(claims).map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
    }

    fn ttl_s(&self, ttl_ms: u64) -> Result<u64, WireError> {
        if ttl_ms < 1_000 || ttl_ms > self.config.max_token_ttl_ms {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("ttl_ms must be between 1000 and auth.max_token_ttl_ms = {}", self.config.max_token_ttl_ms),
            )
            .with_detail("pointer", "/ttl_ms"));
        }
        Ok(ttl_ms.div_ceil(1_000))
    }

    async fn issue(&self, req: IssueRequest) -> Result<TokenReply, WireError> {
        let principal = self.authenticate(&req.credential, Action::Issue, "token.issue")?;
        self.limit("issue", principal.as_str())?;
        let ttl_s = self.ttl_s(req.ttl_ms)?;
        if req.capabilities.is_empty() {
            return Err(WireError::new(ErrorCode::BadRequest, "a token needs at least one capability")
                .with_detail("pointer", "/capabilities"));
        }
        let now = now_us();
        let now_s = now / 1_000_000;
        let claims = Claims {
            iss: ISSUER.into(),
            sub: req.sub,
            aud: AUDIENCE.into(),
            exp: now_s + ttl_s,
            nbf: now_s,
            iat: now_s,
            jti: fresh_jti(now)?,
            caps: req.capabilities,
            chain: Vec::new(),
            depth: 0,
            once: req.one_time,
        };
        let token = self.sign(&claims)?;
        let expires_at_us = claims.exp * 1_000_000;
        let event = Event::TokenIssued {
            jti: claims.jti,
            sub: claims.sub.clone(),
            capabilities: claims.caps.clone(),
            expires_at_us,
        };
        self.allowed(principal, "token.issue", format!("token:{}", claims.jti), event).await?;
        Ok(TokenReply { token, jti: claims.jti, expires_at_us, depth: 0 })
    }

    /// Where each agent named by `caps` sits in the tree, read from the kernel log's
    /// `agent.spawned` events: the lineage delegation checks descent against. Only durable
    /// spawns count, so a caller cannot claim a descent the kernel never recorded.
    async fn lineage_of(&self, caps: &[toka_shared::Capability]) -> Result<LogLineage, WireError> {
        let mut lineage = LogLineage::default();
        for cap in caps {
            let (toka_shared::capability::Pattern::Agent(start) | toka_shared::capability::Pattern::Subtree(start)) =
                cap.resource
            else {
                continue;
            };
            let mut at = start;
            for _ in 0..MAX_LINEAGE_DEPTH {
                if lineage.parents.contains_key(&at) {
                    break;
                }
                let query = QueryRequest {
                    log: LogName::Kernel,
                    entity: Some(at.to_string()),
                    event_type: Some("agent.spawned".into()),
                    from_time_us: None,
                    to_time_us: None,
                    after: None,
                    limit: 1,
                };
                let page: QueryReply =
                    self.bus.request(subject::STORAGE_QUERY.subject, &query).await.map_err(|e| e.to_wire())?;
                let parent = match page.hits.first().map(|h| &h.event) {
                    Some(Event::AgentSpawned { agent, parent, .. }) if *agent == at => *parent,
                    _ => None,
                };
                lineage.parents.insert(at, parent);
                match parent {
                    Some(p) => at = p,
                    None => break,
                }
            }
        }
        Ok(lineage)
    }

    async fn delegate(&self, req: DelegateRequest) -> Result<TokenReply, WireError> {
        let parent = self.verify(&req.token).map_err(|e| {
            self.ledger.deny(UNVERIFIED, "token.delegate", "token:*", &e.to_string());
            WireError::from(&e)
        })?;
        self.limit("delegate", parent.sub.as_str())?;
        let ttl_s = self.ttl_s(req.ttl_ms)?;
        // Descent is read from the kernel log only when a capability is not covered without it
        // (a parent holding `agent:*` needs no tree).
        let lineage = if toka_shared::capability::first_uncovered(&req.capabilities, &parent.caps, &NoLineage).is_some()
        {
            self.lineage_of(&req.capabilities).await?
        } else {
            LogLineage::default()
        };
        let now = now_us();
        let claims = token::delegate(
            &parent,
            req.sub,
            req.capabilities,
            ttl_s,
            req.one_time,
            fresh_jti(now)?,
            now / 1_000_000,
            self.config.max_delegation_depth,
            &lineage,
        )
        .map_err(|e| {
            let resource = format!("token:{}", parent.jti);
            self.ledger.deny(parent.sub.as_str(), "token.delegate", &resource, &e.to_string());
            WireError::new(ErrorCode::Forbidden, format!("delegation refused: {e}"))
        })?;
        let token = self.sign(&claims)?;
        let expires_at_us = claims.exp * 1_000_000;
        let event = Event::TokenDelegated {
            jti: claims.jti,
            parent: parent.jti,
            sub: claims.sub.clone(),
            depth: claims.depth,
            capabilities: claims.caps.clone(),
            expires_at_us,
        };
        self.allowed(parent.sub.clone(), "token.delegate", format!("token:{}", claims.jti), event).await?;
        Ok(TokenReply { token, jti: claims.jti, expires_at_us, depth: claims.depth })
    }

    /// The ancestors of a delegated token, nearest first, from the audit log's delegations.
    async fn ancestors(&self, jti: TokenId) -> Result<Vec<TokenId>, WireError> {
        let mut chain = Vec::new();
        let mut current = jti;
        for _ in 0..self.config.max_delegation_depth {
            let query = QueryRequest {
                log: LogName::Audit,
                entity: Some(current.to_string()),
                event_type: Some("auth.token_delegated".into()),
                from_time_us: None,
                to_time_us: None,
                after: None,
                limit: 1,
            };
            let page: QueryReply =
                self.bus.request(subject::STORAGE_QUERY.subject, &query).await.map_err(|e| e.to_wire())?;
            match page.hits.first().map(|h| &h.event) {
                Some(Event::TokenDelegated { parent, .. }) => {
                    chain.push(*parent);
                    current = *parent;
                }
                _ => break,
            }
        }
        Ok(chain)
    }

    async fn revoke(&self, req: RevokeRequest) -> Result<RevokeReply, WireError> {
        let resource = format!("token:{}", req.jti);
        let principal = match &req.credential {
            // A holder may revoke its own token or any token delegated from it.
            Credential::Token(token) => {
                let claims = self.verify(token).map_err(|e| {
                    self.ledger.deny(UNVERIFIED, "token.revoke", &resource, &e.to_string());
                    WireError::from(&e)
                })?;
                let allowed = claims.jti == req.jti
                    || toka_shared::capability::allows(&claims.caps, Action::Revoke, Target::Tokens, &NoLineage)
                    || self.ancestors(req.jti).await?.contains(&claims.jti);
                if !allowed {
                    let e = WireError::new(
                        ErrorCode::Forbidden,
                        format!(
                            "token {} may revoke only itself and its descendants, or needs revoke on token:*",
                            claims.jti
                        ),
                    );
                    self.ledger.deny(claims.sub.as_str(), "token.revoke", &resource, &e.message);
                    return Err(e);
                }
                claims.sub
            }
            admin @ Credential::AdminKey(_) => self.authenticate(admin, Action::Revoke, "token.revoke")?,
        };
        self.limit("revoke", principal.as_str())?;
        if self.ledger.is_revoked(&req.jti) {
            return Ok(RevokeReply { jti: req.jti, epoch: self.ledger.epoch() });
        }
        let committed = self.ledger.record(Entry::Revoke { principal, jti: req.jti, reason: req.reason }).await?;
        Ok(RevokeReply { jti: req.jti, epoch: committed.epoch.max(self.ledger.epoch()) })
    }

    async fn rotate(&self, req: RotateRequest) -> Result<RotateReply, WireError> {
        let principal = self.authenticate(&req.credential, Action::Rotate, "key.rotate")?;
        self.limit("rotate", principal.as_str())?;
        if self.leader.load(Ordering::SeqCst) {
            return self.rotate_now(principal).await;
        }
        // Only the lease holder writes keys: hand the request to it (it checks the credential
        // again, so nothing is trusted on the way).
        let holder = self.lease.lock().await.holder().await.ok_or_else(|| {
            WireError::new(ErrorCode::Unavailable, "no auth replica holds the rotation lease yet")
                .with_retry_after_ms(self.config.lease_ttl_ms)
        })?;
        self.bus.request(&subject::auth_rotate_at(&holder), &req).await.map_err(|e| e.to_wire())
    }

    /// Rotates (as the lease holder), then records the rotation.
    async fn rotate_now(&self, principal: Principal) -> Result<RotateReply, WireError> {
        let now = now_us();
        let unavailable =
            |e: keys::Error| WireError::new(ErrorCode::Unavailable, e.to_string()).with_retry_after_ms(1_000);
        let mut ring = self.store.load().map_err(unavailable)?;
        let reply = ring.rotate(now, self.overlap_us()).map_err(unavailable)?;
        self.store.save(&ring).map_err(unavailable)?;
        self.install(ring);
        tracing::info!(kid = %reply.kid, previous = ?reply.previous_kid, "signing key rotated");
        let event = Event::KeyRotated {
            kid: reply.kid.clone(),
            previous_kid: reply.previous_kid.clone(),
            retire_at_us: reply.retire_at_us,
        };
        self.allowed(principal, "key.rotate", format!("key:{}", reply.kid), event).await?;
        Ok(reply)
    }

    /// The lease holder's periodic work: the first key, scheduled rotation, retirement.
    async fn keep_keys(&self) {
        let now = now_us();
        let system: Principal = match "toka-auth".parse() {
            Ok(p) => p,
            Err(_) => return,
        };
        let since = read(&self.ring).signing_since_us();
        let due = since.is_none_or(|t| now >= t.saturating_add(self.config.rotate_every_ms.saturating_mul(1_000)));
        if due && let Err(e) = self.rotate_now(system).await {
            tracing::error!(error = %e.message, "scheduled key rotation failed");
        }
        let mut ring = match self.store.load() {
            Ok(ring) => ring,
            Err(e) => return tracing::error!(error = %e, "cannot read the key store"),
        };
        let retired = ring.retire(now);
        if !retired.is_empty() {
            match self.store.save(&ring) {
                Ok(()) => {
                    tracing::info!(?retired, "keys retired after their overlap");
                    self.install(ring);
                }
                Err(e) => tracing::error!(error = %e, "cannot retire keys"),
            }
        }
    }

    /// Records an allowed decision and its event, durably.
    async fn allowed(
        &self,
        principal: Principal,
        action: &'static str,
        resource: String,
        event: Event,
    ) -> Result<ledger::Committed, WireError> {
        self.ledger.record(Entry::Allowed { principal, action, resource, events: vec![event] }).await
    }

    fn heartbeat(&self) -> Heartbeat {
        Heartbeat { epoch: self.ledger.epoch(), time_us: now_us(), interval_ms: self.config.heartbeat_ms }
    }
}

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
    let store = KeyStore::open(&settings.key_dir)?;
    let ring = store.load()?;
    let mut shutdown = Box::pin(shutdown);
    let mut host = Host::start(&bus, SERVICE_NAME, DESCRIPTION, &config.admin).await?;
    let grace = Duration::from_millis(config.shutdown.grace_ms);

    let verifier = Arc::new(RwLock::new(
        Verifier::new(&JwksReply { keys: Vec::new() }, settings.leeway_s).map_err(|e| Error::Setting(e.to_string()))?,
    ));
    let keys_changed = Arc::new(tokio::sync::Notify::new());
    let observer: ledger::Observer = {
        let verifier = verifier.clone();
        let keys_changed = keys_changed.clone();
        Arc::new(move |event: &Event| match event {
            Event::TokenRevoked { jti, .. } => write(&verifier).revoke(*jti),
            Event::KeyRotated { .. } => keys_changed.notify_one(),
            _ => {}
        })
    };
    let ledger_settings = ledger::Settings {
        max_token_ttl_us: settings.max_token_ttl_ms.saturating_mul(1_000),
        interval: Duration::from_millis(settings.audit_interval_ms.max(10)),
        commit_timeout: Duration::from_millis(config.nats.request_timeout_ms.saturating_mul(2)),
        revocations: true,
    };
    // Storage may start after us: wait for the audit log, not ready meanwhile.
    let waiting = || Ledger::start(bus.clone(), ledger_settings.clone(), observer.clone());
    let Some(ledger) = patiently(&mut shutdown, "the audit log", waiting).await else {
        host.shutdown(grace).await;
        return Ok(());
    };
    let lease_ttl = Duration::from_millis(settings.lease_ttl_ms);
    let lease = Lease::open(&bus, LEASE_BUCKET, LEASE_KEY, &instance, lease_ttl).await?;
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

    let tasks = vec![
        keeper,
        tokio::spawn(heartbeat_loop(auth.clone())),
        tokio::spawn(follow_events(auth.clone())?),
        tokio::spawn(serve_forwarded_rotations(auth.clone()).await?),
    ];
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
    Ok(())
}

async fn register(host: &mut Host, auth: &Arc<Auth>) -> Result<(), Error> {
    macro_rules! serve {
        ($endpoint:expr, $method:ident) => {{
            let auth = auth.clone();
            host.endpoint($endpoint, move |req| {
                let auth = auth.clone();
                async move { auth.$method(req).await }
            })
            .await?;
        }};
    }
    serve!(subject::AUTH_ISSUE, issue);
    serve!(subject::AUTH_DELEGATE, delegate);
    serve!(subject::AUTH_REVOKE, revoke);
    serve!(subject::AUTH_ROTATE, rotate);
    let a = auth.clone();
    host.endpoint(subject::AUTH_JWKS, move |_: JwksRequest| {
        let reply = a.limit("read", "anyone").map(|()| read(&a.ring).jwks(now_us()));
        async move { reply }
    })
    .await?;
    let a = auth.clone();
    host.endpoint(subject::AUTH_REVOCATIONS, move |_: RevocationsRequest| {
        let reply: Result<RevocationsReply, WireError> =
            a.limit("read", "anyone").map(|()| a.ledger.revocations(now_us()));
        async move { reply }
    })
    .await?;
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

async fn heartbeat_loop(auth: Arc<Auth>) {
    let mut tick = tokio::time::interval(Duration::from_millis(auth.config.heartbeat_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(body) = serde_json::to_vec(&auth.heartbeat()) else { continue };
        if let Err(e) = auth.bus.client().publish(subject::AUTH_HEARTBEAT, body.into()).await {
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
            let Some(reply_to) = message.reply.clone() else { continue };
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
