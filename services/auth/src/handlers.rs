//! The endpoints' logic: who a credential is, what it may do, and each endpoint's decision,
//! recorded in the audit log before the caller is answered.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use toka_contract::api::auth::{
    AgentTokenRequest, Claims, Credential, DelegateRequest, Heartbeat, IssueRequest, RevokeReply, RevokeRequest,
    RotateReply, RotateRequest, TokenReply,
};
use toka_contract::capability::{self, Action, Capability, NoLineage, Target};
use toka_contract::spec::Principal;
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Event, TokenId, subject};
use toka_runtime::audit::{Committed, Entry, Events, Ledger};
use toka_runtime::bus::Bus;
use toka_runtime::lease::Lease;
use toka_runtime::limit::Limits;
use toka_runtime::now_us;
use toka_runtime::token::{self, AUDIENCE, ISSUER, Verifier};

use crate::config::AuthConfig;
use crate::keys::{self, KeyRing, KeyStore};
use crate::revocations::{self, Revocations};
use crate::{Error, delegation, lineage};

/// A fresh token id: the time, then 80 random bits.
fn fresh_jti(now_us: u64) -> Result<TokenId, WireError> {
    toka_runtime::fresh_id(now_us)
        .map(TokenId::from_u128)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("no random source: {e}")))
}

/// Reads the admin key: a file of mode 0600 holding at least 32 characters.
pub(crate) fn read_admin_key(path: &std::path::Path) -> Result<blake3::Hash, Error> {
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
pub(crate) struct Auth {
    pub(crate) config: AuthConfig,
    pub(crate) instance: String,
    pub(crate) admin_key: Option<blake3::Hash>,
    pub(crate) admin_principal: Principal,
    pub(crate) store: KeyStore,
    pub(crate) ring: RwLock<KeyRing>,
    pub(crate) verifier: Arc<RwLock<Verifier>>,
    pub(crate) ledger: Ledger<Revocations>,
    pub(crate) limits: Limits,
    pub(crate) bus: Bus,
    pub(crate) leader: AtomicBool,
    pub(crate) lease: tokio::sync::Mutex<Lease>,
    pub(crate) keys_changed: Arc<tokio::sync::Notify>,
}

pub(crate) fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The principal of callers whose credential did not verify.
pub(crate) const UNVERIFIED: &str = "unverified";

impl Auth {
    /// Makes `ring` the one that signs and verifies.
    pub(crate) fn install(&self, ring: KeyRing) {
        let jwks = ring.jwks(now_us());
        *write(&self.ring) = ring;
        if let Err(e) = write(&self.verifier).set_keys(&jwks) {
            tracing::error!(error = %e, "the key ring holds an unusable key");
        }
    }

    /// Re-reads the shared key store (another replica may have rotated).
    pub(crate) fn reload(&self) {
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
    pub(crate) fn verify(&self, token: &str) -> Result<Claims, token::Error> {
        read(&self.verifier).verify(token, now_us() / 1_000_000)
    }

    /// Who `credential` is, if it holds `action` on `token:*`; denials are audited.
    pub(crate) fn authenticate(
        &self,
        credential: &Credential,
        action: Action,
        what: &str,
    ) -> Result<Principal, WireError> {
        match credential {
            Credential::AdminKey(key) => {
                let Some(expected) = self.admin_key else {
                    let e = WireError::new(
                        ErrorCode::Unauthorized,
                        "no admin key is configured: set auth.admin_key_file to a file (mode 0600) holding one \
                         (`toka nats-config` writes <dir>/creds/admin.key), or present a token with this capability",
                    );
                    self.ledger.deny(UNVERIFIED, what, "token:*", &e.message);
                    return Err(self.unverified(what, e));
                };
                if blake3::hash(key.trim().as_bytes()) != expected {
                    let e = WireError::new(ErrorCode::Unauthorized, "the admin key does not match");
                    self.ledger.deny(UNVERIFIED, what, "token:*", &e.message);
                    return Err(self.unverified(what, e));
                }
                Ok(self.admin_principal.clone())
            }
            Credential::Token(token) => {
                let claims = self.verify(token).map_err(|e| {
                    self.ledger.deny(UNVERIFIED, what, "token:*", &e.to_string());
                    self.unverified(what, WireError::from(&e))
                })?;
                authorize(&claims, action, Target::Tokens)
                    .inspect_err(|e| self.ledger.deny(claims.sub.as_str(), what, "token:*", &e.message))?;
                Ok(claims.sub)
            }
        }
    }

    pub(crate) fn limit(&self, class: &str, principal: &str) -> Result<(), WireError> {
        self.limits.check(class, principal)
    }

    /// A refusal for a credential that did not verify, unless the endpoint's `unverified`
    /// budget (shared by every such request, apart from every root's) is spent: then
    /// `rate_limited`.
    pub(crate) fn unverified(&self, endpoint: &str, refusal: WireError) -> WireError {
        self.limits.refuse_within("unverified", endpoint, refusal)
    }

    /// The budget of a read of the keys or revocations: the services' own on their subjects;
    /// a client's root's `read` budget when its token verifies; else the endpoint's
    /// `unverified` one.
    pub(crate) fn read_budget(&self, service: bool, endpoint: &str, token: Option<&str>) -> Result<(), WireError> {
        if service {
            return self.limit("service_read", "services");
        }
        // The keys are public: a token that does not verify reads as no token.
        match token.map(|t| self.verify(t)) {
            Some(Ok(claims)) => self.limit("read", claims.root().as_str()),
            Some(Err(_)) | None => self.limit("unverified", endpoint),
        }
    }

    pub(crate) fn sign(&self, claims: &Claims) -> Result<String, WireError> {
        let ring = read(&self.ring);
        let key = ring
            .signing()
            .ok_or_else(|| WireError::new(ErrorCode::Unavailable, "no signing key yet").with_retry_after_ms(1_000))?;
        key.sign(claims).map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))
    }

    pub(crate) fn ttl_s(&self, ttl_ms: u64) -> Result<u64, WireError> {
        if ttl_ms < 1_000 || ttl_ms > self.config.max_token_ttl_ms {
            return Err(WireError::new(
                ErrorCode::BadRequest,
                format!("ttl_ms must be between 1000 and auth.max_token_ttl_ms = {}", self.config.max_token_ttl_ms),
            )
            .with_detail("pointer", "/ttl_ms"));
        }
        Ok(ttl_ms.div_ceil(1_000))
    }

    pub(crate) async fn issue(&self, req: IssueRequest) -> Result<TokenReply, WireError> {
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
            root: None,
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

    /// `toka.auth.v1.delegate`: a child named as its parent or under it.
    pub(crate) async fn delegate(&self, req: DelegateRequest) -> Result<TokenReply, WireError> {
        let parent = self.delegating_parent(&req.token)?;
        let sub = delegation::child_name(&parent, req.sub).map_err(|e| self.refuse_delegation(&parent, &e))?;
        self.delegate_to(parent, sub, req.capabilities, req.ttl_ms, req.one_time).await
    }

    /// `toka.auth.v1.agent_token`: the kernel's request for a spawned agent's token, named
    /// `agent:<id>` on its word (no one else may publish the subject). Not charged to the
    /// spawner's delegation budget: the kernel charged the spawn to its submit budget.
    pub(crate) async fn agent_token(&self, req: AgentTokenRequest) -> Result<TokenReply, WireError> {
        let parent = self.verified_parent(&req.token)?;
        let sub = format!("agent:{}", req.agent)
            .parse()
            .map_err(|e| WireError::new(ErrorCode::BadRequest, format!("agent {}: {e}", req.agent)))?;
        self.delegate_to(parent, sub, req.capabilities, req.ttl_ms, false).await
    }

    /// The verified claims of a token to delegate from, within its root's delegation budget.
    fn delegating_parent(&self, token: &str) -> Result<Claims, WireError> {
        let parent = self.verified_parent(token)?;
        self.limit("delegate", parent.root().as_str())?;
        Ok(parent)
    }

    /// The verified claims of a token to delegate from.
    fn verified_parent(&self, token: &str) -> Result<Claims, WireError> {
        self.verify(token).map_err(|e| {
            self.ledger.deny(UNVERIFIED, "token.delegate", "token:*", &e.to_string());
            self.unverified("token.delegate", WireError::from(&e))
        })
    }

    fn refuse_delegation(&self, parent: &Claims, e: &delegation::Error) -> WireError {
        let resource = format!("token:{}", parent.jti);
        self.ledger.deny(parent.sub.as_str(), "token.delegate", &resource, &e.to_string());
        WireError::new(ErrorCode::Forbidden, format!("delegation refused: {e}"))
    }

    async fn delegate_to(
        &self,
        parent: Claims,
        sub: Principal,
        capabilities: Vec<Capability>,
        ttl_ms: u64,
        one_time: bool,
    ) -> Result<TokenReply, WireError> {
        let ttl_s = self.ttl_s(ttl_ms)?;
        // Descent is read from the kernel log only when a capability is not covered without it
        // (a parent holding `agent:*` needs no tree).
        let lineage = if capability::first_uncovered(&capabilities, &parent.caps, &NoLineage).is_some() {
            lineage::lineage_of(&self.bus, &capabilities).await?
        } else {
            lineage::LogLineage::default()
        };
        let now = now_us();
        let claims = delegation::delegate(
            &parent,
            sub,
            capabilities,
            ttl_s,
            one_time,
            fresh_jti(now)?,
            now / 1_000_000,
            self.config.max_delegation_depth,
            &lineage,
        )
        .map_err(|e| self.refuse_delegation(&parent, &e))?;
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

    pub(crate) async fn revoke(&self, req: RevokeRequest) -> Result<RevokeReply, WireError> {
        let resource = format!("token:{}", req.jti);
        let mut own_expiry = None;
        let principal = match &req.credential {
            // A holder may revoke its own token or any token delegated from it.
            Credential::Token(token) => {
                let claims = self.verify(token).map_err(|e| {
                    self.ledger.deny(UNVERIFIED, "token.revoke", &resource, &e.to_string());
                    self.unverified("token.revoke", WireError::from(&e))
                })?;
                // Limited before any lookup in the log, per the chain's root.
                self.limit("revoke", claims.root().as_str())?;
                let allowed = claims.jti == req.jti
                    || capability::allows(&claims.caps, Action::Revoke, Target::Tokens, &NoLineage)
                    || lineage::ancestors(&self.bus, req.jti, usize::from(self.config.max_delegation_depth))
                        .await?
                        .contains(&claims.jti);
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
                if claims.jti == req.jti {
                    own_expiry = Some(claims.exp.saturating_mul(1_000_000));
                }
                claims.sub
            }
            admin @ Credential::AdminKey(_) => {
                let principal = self.authenticate(admin, Action::Revoke, "token.revoke")?;
                self.limit("revoke", principal.as_str())?;
                principal
            }
        };
        if self.ledger.fold(|r| r.is_revoked(&req.jti)) {
            return Ok(RevokeReply { jti: req.jti, epoch: self.ledger.fold(Revocations::epoch) });
        }
        // Kept until the token expires: its own, when it revokes itself, else as its issue or
        // delegation recorded it (unknown: the longest token lifetime).
        let expires_at_us = match own_expiry {
            Some(exp) => Some(exp),
            None => lineage::token_expiry(&self.bus, req.jti).await?,
        };
        let entry = revocations::entry(principal, req.jti, req.reason, expires_at_us);
        let committed = self.ledger.record(entry).await?;
        let epoch = revocations::epoch_of(&committed.events).unwrap_or(0);
        Ok(RevokeReply { jti: req.jti, epoch: epoch.max(self.ledger.fold(Revocations::epoch)) })
    }

    pub(crate) async fn rotate(&self, req: RotateRequest) -> Result<RotateReply, WireError> {
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
    pub(crate) async fn rotate_now(&self, principal: Principal) -> Result<RotateReply, WireError> {
        let now = now_us();
        let unavailable =
            |e: keys::Error| WireError::new(ErrorCode::Unavailable, e.to_string()).with_retry_after_ms(1_000);
        let mut ring = self.store.load().map_err(unavailable)?;
        let reply = ring.rotate(now, self.config.overlap_us()).map_err(unavailable)?;
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
    pub(crate) async fn keep_keys(&self) {
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
    pub(crate) async fn allowed(
        &self,
        principal: Principal,
        action: &'static str,
        resource: String,
        event: Event,
    ) -> Result<Committed, WireError> {
        self.ledger.record(Entry { principal, action, resource, events: Events::Fixed(vec![event]) }).await
    }

    pub(crate) fn heartbeat(&self) -> Heartbeat {
        Heartbeat {
            epoch: self.ledger.fold(Revocations::epoch),
            time_us: now_us(),
            interval_ms: self.config.heartbeat_ms,
        }
    }
}

/// Whether `claims` allow `action` on `target`; otherwise the `forbidden` error naming both.
fn authorize(claims: &Claims, action: Action, target: Target<'_>) -> Result<(), WireError> {
    if capability::allows(&claims.caps, action, target, &NoLineage) {
        Ok(())
    } else {
        Err(WireError::new(ErrorCode::Forbidden, format!("token {} does not allow {action} on {target}", claims.jti)))
    }
}
