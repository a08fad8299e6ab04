//! Auth over NATS with storage running: issuing with the configured credential, the attack
//! suite, delegation rules, revocation cascades, rate limits, aggregated denials in the audit
//! log, key rotation across its overlap, restarts, replicas and the rotation lease, verifiers
//! that follow auth and fail closed, and interop with PyJWT.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt as _;
use toka_auth::AuthConfig;
use toka_auth::signing::SigningKey;
use toka_contract::TokenId;
use toka_contract::access::Role;
use toka_contract::api::auth::{
    Claims, Credential, DelegateRequest, IssueRequest, JwksReply, JwksRequest, RevocationsReply, RevocationsRequest,
    RevokeReply, RevokeRequest, RotateReply, RotateRequest, TokenReply,
};
use toka_contract::capability::{Action, Capability, Pattern};
use toka_contract::record::{AuditEntry, Decision, LogName};
use toka_contract::subject::{self, service};
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Envelope, Event};
use toka_runtime::bus::{Bus, RequestError};
use toka_runtime::lease::Lease;
use toka_runtime::token::{AUDIENCE, ISSUER, Verifier};
use toka_runtime::verifier::{LiveVerifier, VerifierConfig};

use crate::assert_eventually;
use crate::harness::{Nats, Running, TempDir, expect_event, spawn_service, temp_dir};
use crate::storage::start_storage;

/// Starts auth with its keys in `key_dir`, the test's changes applied to its settings.
pub(crate) async fn start_auth(nats: &Nats, key_dir: &Path, tweak: impl FnOnce(&mut AuthConfig)) -> Running {
    let mut auth = AuthConfig { key_dir: key_dir.to_owned(), callout: nats.callout(), ..AuthConfig::default() };
    tweak(&mut auth);
    spawn_service(service::AUTH, nats, Role::Auth, move |nats, admin, bus, stop| {
        toka_auth::run(toka_auth::Config { nats, admin, auth, ..Default::default() }, bus, stop)
    })
    .await
}

/// NATS, storage and a place for keys and the admin key.
struct Stack {
    nats: Nats,
    dir: TempDir,
    _storage: Running,
    admin_key: String,
    client: Bus,
}

impl Stack {
    async fn start(tag: &str) -> Option<Stack> {
        let nats = Nats::start().await?;
        let dir = temp_dir(tag);
        let storage = start_storage(&nats, &dir.path().join("storage")).await;
        let admin_key = toka_runtime::deploy::new_admin_key().unwrap();
        toka_runtime::deploy::write_secret(&dir.path().join("admin.key"), &format!("{admin_key}\n")).unwrap();
        let client = nats.connect(Role::Operator).await;
        Some(Stack { nats, dir, _storage: storage, admin_key, client })
    }

    fn keys(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    /// Auth with the admin key configured.
    async fn auth(&self, tweak: impl FnOnce(&mut AuthConfig)) -> Running {
        let admin_key_file = self.dir.path().join("admin.key");
        start_auth(&self.nats, &self.keys(), move |c| {
            c.admin_key_file = Some(admin_key_file);
            tweak(c);
        })
        .await
    }

    fn admin(&self) -> Credential {
        Credential::AdminKey(self.admin_key.clone())
    }

    async fn issue_as(
        &self,
        credential: Credential,
        caps: &[Capability],
        ttl_ms: u64,
        one_time: bool,
    ) -> Result<TokenReply, WireError> {
        let request =
            IssueRequest { credential, sub: "alice".parse().unwrap(), capabilities: caps.to_vec(), ttl_ms, one_time };
        self.client.request(subject::AUTH_ISSUE.subject, &request).await.map_err(remote)
    }

    async fn issue(&self, caps: &[Capability], ttl_ms: u64) -> TokenReply {
        self.issue_as(self.admin(), caps, ttl_ms, false).await.unwrap()
    }

    async fn delegate(&self, token: &str, caps: &[Capability], ttl_ms: u64) -> Result<TokenReply, WireError> {
        let request = DelegateRequest {
            token: token.to_owned(),
            sub: None,
            capabilities: caps.to_vec(),
            ttl_ms,
            one_time: false,
        };
        self.client.request(subject::AUTH_DELEGATE.subject, &request).await.map_err(remote)
    }

    async fn revoke(&self, credential: Credential, jti: TokenId) -> Result<RevokeReply, WireError> {
        let request = RevokeRequest { credential, jti, reason: "test".into() };
        self.client.request(subject::AUTH_REVOKE.subject, &request).await.map_err(remote)
    }

    async fn rotate(&self) -> Result<RotateReply, WireError> {
        self.client
            .request(subject::AUTH_ROTATE.subject, &RotateRequest { credential: self.admin() })
            .await
            .map_err(remote)
    }

    /// The keys as the operator (no token: the endpoint's `unverified` budget) reads them,
    /// waiting as told when over that budget.
    async fn jwks(&self) -> JwksReply {
        loop {
            match self.client.request(subject::AUTH_JWKS.subject, &JwksRequest::default()).await.map_err(remote) {
                Ok(jwks) => return jwks,
                Err(e) if e.code == ErrorCode::RateLimited => {
                    tokio::time::sleep(Duration::from_millis(e.retry_after_ms.unwrap_or(50))).await;
                }
                Err(e) => panic!("jwks: {e}"),
            }
        }
    }

    /// The audit log as the operator reads it.
    async fn audit(&self) -> Vec<toka_contract::record::AuditRecord> {
        self.nats.read_log::<AuditEntry>(LogName::Audit).await
    }

    /// The signing key auth keeps, as a forger who stole it would use it.
    fn signing_key(&self) -> SigningKey {
        let ring = toka_auth::keys::KeyStore::open(&self.keys()).unwrap().load().unwrap();
        let key = ring.signing().unwrap();
        SigningKey::from_seed(key.kid(), key.seed())
    }
}

fn remote(e: RequestError) -> WireError {
    match e {
        RequestError::Remote(e) => e,
        other => panic!("expected an error reply, got {other}"),
    }
}

fn cap(pattern: Pattern, actions: &[Action]) -> Capability {
    Capability::new(pattern, actions)
}

fn read_agents() -> Vec<Capability> {
    vec![cap(Pattern::AnyAgent, &[Action::Read, Action::Spawn])]
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn header_kid(token: &str) -> String {
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap();
    serde_json::from_slice::<serde_json::Value>(&header).unwrap()["kid"].as_str().unwrap().to_owned()
}

fn claims(jti: u128) -> Claims {
    let now = now_s();
    Claims {
        iss: ISSUER.into(),
        sub: "mallory".parse().unwrap(),
        aud: AUDIENCE.into(),
        exp: now + 600,
        nbf: now - 1,
        iat: now - 1,
        jti: TokenId::from_u128(jti),
        caps: read_agents(),
        chain: Vec::new(),
        depth: 0,
        once: false,
        root: None,
    }
}

#[track_caller]
fn assert_refused(result: Result<TokenReply, WireError>, code: ErrorCode, phrase: &str, case: &str) {
    match result {
        Ok(reply) => panic!("{case}: accepted (jti {})", reply.jti),
        Err(e) => {
            assert_eq!(e.code, code, "{case}: {}", e.message);
            assert!(e.message.contains(phrase), "{case}: {:?} does not say {phrase:?}", e.message);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_issued_only_for_the_configured_admin_key_or_an_issue_token_and_audited() {
    let Some(stack) = Stack::start("auth-issue").await else { return };
    // No admin key configured: nothing is issued, and the error says how to configure one.
    let bare = start_auth(&stack.nats, &stack.dir.path().join("bare-keys"), |_| {}).await;
    let refused = stack.issue_as(stack.admin(), &read_agents(), 60_000, false).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unauthorized);
    assert!(
        refused.message.contains("auth.admin_key_file") && refused.message.contains("toka nats-config"),
        "{refused:?}"
    );
    bare.stop().await.unwrap();

    let auth = stack.auth(|_| {}).await;
    let wrong = Credential::AdminKey("x".repeat(43));
    assert_refused(
        stack.issue_as(wrong, &read_agents(), 60_000, false).await,
        ErrorCode::Unauthorized,
        "does not match",
        "wrong admin key",
    );
    for ttl_ms in [0, 999, 25 * 3_600_000] {
        let e = stack.issue_as(stack.admin(), &read_agents(), ttl_ms, false).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "ttl {ttl_ms}");
    }

    let issued = stack.issue(&read_agents(), 60_000).await;
    let jwks = stack.jwks().await;
    assert_eq!(header_kid(&issued.token), jwks.keys[0].kid, "signed with the first key of the JWKS");
    let verifier = Verifier::new(&jwks, 0).unwrap();
    let claims = verifier.verify(&issued.token, now_s()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.caps.clone(), claims.depth, claims.jti),
        ("alice", read_agents(), 0, issued.jti)
    );
    assert_eq!((claims.iss.as_str(), claims.aud.as_str()), (ISSUER, AUDIENCE));
    assert!(claims.exp >= now_s() + 55 && claims.exp <= now_s() + 61);

    // A token may issue only if it holds issue on token:*.
    let plain = Credential::Token(issued.token.clone());
    assert_refused(
        stack.issue_as(plain, &read_agents(), 60_000, false).await,
        ErrorCode::Forbidden,
        "does not allow issue",
        "no issue capability",
    );
    let issuer = stack.issue(&[cap(Pattern::Tokens, &[Action::Issue])], 60_000).await;
    let by_token = stack.issue_as(Credential::Token(issuer.token), &read_agents(), 60_000, false).await.unwrap();

    // Every issue is in the audit log, durable before the token was handed out.
    let audit = stack.audit().await;
    let issues: Vec<_> =
        audit.iter().filter(|r| r.op.action == "token.issue" && r.op.decision == Decision::Allow).collect();
    assert_eq!(issues.len(), 3);
    assert_eq!(issues[0].principal.as_str(), "admin");
    assert_eq!(issues[2].principal.as_str(), "alice", "issued by the token's subject");
    let jtis: Vec<_> = issues
        .iter()
        .filter_map(|r| match &r.events[0] {
            Event::TokenIssued { jti, .. } => Some(*jti),
            _ => None,
        })
        .collect();
    assert_eq!(jtis, vec![issued.jti, issuer.jti, by_token.jti]);
    toka_contract::record::verify_chain(&audit, 0, toka_contract::record::Hash::ZERO).unwrap();
    assert_eventually!(
        Duration::from_secs(5),
        stack.audit().await.iter().any(|r| r.op.decision == Decision::Deny && r.op.action == "token.issue"),
        "the denials written at the end of their interval"
    );
    auth.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attack_suite_is_refused_through_the_service() {
    let Some(stack) = Stack::start("auth-attacks").await else { return };
    let _auth = stack
        .auth(|c| {
            c.max_delegation_depth = 2;
            c.leeway_s = 0;
        })
        .await;
    let key = stack.signing_key();
    let kid = key.kid().to_owned();
    let good = stack.issue(&read_agents(), 60_000).await;
    let read = vec![cap(Pattern::AnyAgent, &[Action::Read])];
    let forge = |header: &str, claims: &Claims, signature: &[u8]| {
        format!("{}.{}.{}", b64(header.as_bytes()), b64(&serde_json::to_vec(claims).unwrap()), b64(signature))
    };

    let none = forge(r#"{"alg":"none","typ":"JWT"}"#, &claims(1), b"");
    assert_refused(stack.delegate(&none, &read, 1_000).await, ErrorCode::Unauthorized, "algorithm none", "alg none");

    let public = stack.jwks().await.keys[0].x.clone();
    let mut hs = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    hs.kid = Some(kid.clone());
    let confused =
        jsonwebtoken::encode(&hs, &claims(2), &jsonwebtoken::EncodingKey::from_secret(public.as_bytes())).unwrap();
    assert_refused(
        stack.delegate(&confused, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "algorithm HS256",
        "HS256 key confusion",
    );

    let impostor = SigningKey::from_seed(&kid, [9; 32]).sign(&claims(3)).unwrap();
    assert_refused(
        stack.delegate(&impostor, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "bad signature",
        "bad signature",
    );

    let stranger = SigningKey::from_seed("k-unknown", [9; 32]).sign(&claims(4)).unwrap();
    assert_refused(
        stack.delegate(&stranger, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "unknown signing key",
        "unknown kid",
    );

    let expired = key.sign(&Claims { exp: now_s() - 10, nbf: now_s() - 100, ..claims(5) }).unwrap();
    assert_refused(stack.delegate(&expired, &read, 1_000).await, ErrorCode::Unauthorized, "expired", "expired");

    let early = key.sign(&Claims { nbf: now_s() + 300, ..claims(6) }).unwrap();
    assert_refused(
        stack.delegate(&early, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "not yet valid",
        "not yet valid",
    );

    let elsewhere = key.sign(&Claims { aud: "another-system".into(), ..claims(7) }).unwrap();
    assert_refused(
        stack.delegate(&elsewhere, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "another audience",
        "wrong audience",
    );

    let parts: Vec<&str> = good.token.split('.').collect();
    let mut payload: serde_json::Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["caps"] = serde_json::json!([{"resource": "token:*", "actions": ["issue"]}]);
    let tampered = format!("{}.{}.{}", parts[0], b64(&serde_json::to_vec(&payload).unwrap()), parts[2]);
    assert_refused(
        stack.delegate(&tampered, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "bad signature",
        "tampered claims",
    );

    let wider = vec![cap(Pattern::AnyAgent, &[Action::Terminate])];
    assert_refused(
        stack.delegate(&good.token, &wider, 1_000).await,
        ErrorCode::Forbidden,
        "not covered",
        "widened delegation",
    );

    let child = stack.delegate(&good.token, &read, 30_000).await.unwrap();
    let grandchild = stack.delegate(&child.token, &read, 20_000).await.unwrap();
    assert_eq!((child.depth, grandchild.depth), (1, 2));
    assert_refused(
        stack.delegate(&grandchild.token, &read, 10_000).await,
        ErrorCode::Forbidden,
        "exceeds the cap of 2",
        "too deep",
    );

    assert_refused(
        stack.delegate(&child.token, &read, 120_000).await,
        ErrorCode::Forbidden,
        "after its parent",
        "child outliving its parent",
    );

    // A holder revokes its own descendants, not its ancestors.
    let parent = stack.issue(&read_agents(), 60_000).await;
    let kid_token = stack.delegate(&parent.token, &read, 30_000).await.unwrap();
    let upward = stack.revoke(Credential::Token(kid_token.token.clone()), parent.jti).await.unwrap_err();
    assert_eq!(upward.code, ErrorCode::Forbidden, "{upward:?}");
    let down = stack.revoke(Credential::Token(parent.token.clone()), kid_token.jti).await.unwrap();
    assert!(down.epoch >= 1);
    assert_refused(
        stack.delegate(&kid_token.token, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "revoked",
        "revoked by its parent",
    );

    // Revoking a token revokes its children and grandchildren, also while they sit in the cache.
    assert!(stack.delegate(&grandchild.token, &read, 1_000).await.is_err(), "depth cap, but verified and cached");
    let epoch = stack.revoke(stack.admin(), good.jti).await.unwrap().epoch;
    assert!(epoch > down.epoch, "the epoch counts revocations");
    assert_refused(
        stack.delegate(&child.token, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "revoked",
        "revoked parent",
    );
    assert_refused(
        stack.delegate(&grandchild.token, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "revoked",
        "revoked grandparent",
    );
    assert_refused(
        stack.delegate(&good.token, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "revoked",
        "revoked while cached",
    );

    let once = stack.issue_as(stack.admin(), &read_agents(), 60_000, true).await.unwrap();
    let child = stack.delegate(&once.token, &read, 1_000).await.unwrap();
    assert_refused(
        stack.delegate(&once.token, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "already used",
        "one-time reuse",
    );
    // Its child, asked for without `one_time`, is one-time too: it works once.
    stack.delegate(&child.token, &read, 1_000).await.expect("the child works once");
    assert_refused(
        stack.delegate(&child.token, &read, 1_000).await,
        ErrorCode::Unauthorized,
        "already used",
        "a one-time token's child reused",
    );

    // The revocations are in the log and fetchable, with the epoch.
    let revocations: RevocationsReply =
        stack.client.request(subject::AUTH_REVOCATIONS.subject, &RevocationsRequest::default()).await.unwrap();
    assert_eq!(revocations.epoch, epoch);
    let revoked: Vec<_> = revocations.revoked.iter().map(|r| r.jti).collect();
    assert!(revoked.contains(&good.jti) && revoked.contains(&kid_token.jti), "{revoked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_say_when_to_retry_and_denials_are_aggregated_in_the_audit_log() {
    let Some(stack) = Stack::start("auth-limits").await else { return };
    let _auth = stack
        .auth(|c| {
            c.rate_limits.insert("issue".into(), toka_runtime::limit::Rate::new(1, 2));
            c.audit_interval_ms = 300;
        })
        .await;
    stack.issue(&read_agents(), 60_000).await;
    stack.issue(&read_agents(), 60_000).await;
    let limited = stack.issue_as(stack.admin(), &read_agents(), 60_000, false).await.unwrap_err();
    assert_eq!(limited.code, ErrorCode::RateLimited, "{limited:?}");
    let wait = limited.retry_after_ms.expect("retry_after_ms");
    assert!((1..=1_000).contains(&wait), "{wait}");
    tokio::time::sleep(Duration::from_millis(wait + 10)).await;
    stack.issue(&read_agents(), 60_000).await;

    // A flood of bad tokens: every one refused (past the small budget of credentials that do
    // not verify, as rate limited), a handful of audit records.
    let floods = 200;
    let caps = read_agents();
    let requests = (0..floods).map(|i| stack.delegate("not.a.token", &caps, 1_000 + i));
    let started = std::time::Instant::now();
    let codes: Vec<ErrorCode> =
        futures::future::join_all(requests).await.into_iter().map(|r| r.unwrap_err().code).collect();
    let limited = codes.iter().filter(|c| **c == ErrorCode::RateLimited).count();
    assert!(codes.iter().all(|c| matches!(c, ErrorCode::Unauthorized | ErrorCode::RateLimited)), "{codes:?}");
    let budget = crate::kernel::unverified_budget(started.elapsed());
    assert!(floods as usize - limited <= budget, "{limited} of {floods} limited (budget {budget})");
    let mut denied: Vec<toka_contract::record::AuditRecord>;
    assert_eventually!(
        Duration::from_secs(5),
        {
            denied = stack
                .audit()
                .await
                .into_iter()
                .filter(|r| r.op.decision == Decision::Deny && r.op.action == "token.delegate")
                .collect();
            denied.iter().map(|r| r.op.count).sum::<u32>() == floods as u32
        },
        "all {floods} denials counted: {:?}",
        denied.iter().map(|r| r.op.count).collect::<Vec<_>>()
    );
    assert!(denied.len() <= 4, "{} records for {floods} denials", denied.len());
    assert!(denied.iter().all(|r| r.principal.as_str() == "unverified"));
    assert!(matches!(&denied[0].events[0], Event::AccessDenied { count, .. } if *count == denied[0].op.count));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rotate_across_their_overlap_survive_restarts_and_replicas_agree() {
    let Some(stack) = Stack::start("auth-rotate").await else { return };
    let tweak = |instance: &'static str| {
        move |c: &mut AuthConfig| {
            c.max_token_ttl_ms = 5_000;
            c.leeway_s = 0;
            c.lease_ttl_ms = 900;
            c.instance = instance.into();
            c.rate_limits.insert("rotate".into(), toka_runtime::limit::Rate::new(100, 100));
        }
    };
    let a = stack.auth(tweak("a")).await;
    let first = stack.jwks().await;
    assert_eq!(first.keys.len(), 1);
    let old = stack.issue(&read_agents(), 5_000).await;
    let mut events = stack.client.client().subscribe("toka.evt.audit.auth.key_rotated.>").await.unwrap();

    let rotated = stack.rotate().await.unwrap();
    assert_eq!(rotated.previous_kid.as_deref(), Some(first.keys[0].kid.as_str()));
    assert!(rotated.retire_at_us.is_some());
    let event: Envelope = expect_event(&mut events, Duration::from_secs(5)).await;
    assert!(matches!(&event.data, Event::KeyRotated { kid, .. } if *kid == rotated.kid), "{:?}", event.data);
    let both = stack.jwks().await;
    assert_eq!(
        both.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
        vec![rotated.kid.clone(), first.keys[0].kid.clone()]
    );
    stack
        .delegate(&old.token, &[cap(Pattern::AnyAgent, &[Action::Read])], 1_000)
        .await
        .expect("old tokens verify in the overlap");
    let new = stack.issue(&read_agents(), 5_000).await;
    assert_eq!(header_kid(&new.token), rotated.kid, "new tokens use the new key");
    stack.revoke(stack.admin(), new.jti).await.unwrap();

    // A restart keeps the keys and the revocations.
    let before = stack.jwks().await;
    a.stop().await.unwrap();
    let a = stack.auth(tweak("a")).await;
    assert_eq!(stack.jwks().await, before);
    let revocations: RevocationsReply =
        stack.client.request(subject::AUTH_REVOCATIONS.subject, &RevocationsRequest::default()).await.unwrap();
    assert!(revocations.revoked.iter().any(|r| r.jti == new.jti), "{revocations:?}");
    assert_eq!(revocations.epoch, 1);
    assert_refused(
        stack.delegate(&new.token, &read_agents(), 1_000).await,
        ErrorCode::Unauthorized,
        "revoked",
        "revoked before the restart",
    );

    // After the overlap the old key is retired (and the token it signed has expired).
    assert_eventually!(Duration::from_secs(10), stack.jwks().await.keys.len() == 1, "the old key retired");
    assert!(stack.delegate(&old.token, &read_agents(), 1_000).await.is_err());

    // A second replica on the same key directory publishes the same JWKS, before and after
    // rotations asked of either (the one without the lease forwards to the holder).
    let b = stack.auth(tweak("b")).await;
    for round in 0..5 {
        let rotated = stack.rotate().await.unwrap();
        assert_eventually!(
            Duration::from_secs(5),
            {
                let mut sets = Vec::new();
                for _ in 0..12 {
                    sets.push(stack.jwks().await);
                }
                sets.iter().all(|s| *s == sets[0] && s.keys[0].kid == rotated.kid)
            },
            "round {round}: both replicas serve the same JWKS led by {}",
            rotated.kid
        );
    }
    // Both replicas append to the audit log at once: sequence conflicts are resolved by
    // re-reading the head, and every issue lands exactly once.
    let caps = read_agents();
    let issued: Vec<TokenReply> =
        futures::future::join_all((0..40).map(|_| stack.issue_as(stack.admin(), &caps, 5_000, false)))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let audit = stack.audit().await;
    toka_contract::record::verify_chain(&audit, 0, toka_contract::record::Hash::ZERO).unwrap();
    for token in &issued {
        let found = audit
            .iter()
            .flat_map(|r| &r.events)
            .filter(|e| matches!(e, Event::TokenIssued { jti, .. } if *jti == token.jti));
        assert_eq!(found.count(), 1, "{} recorded once", token.jti);
    }

    // Only the lease holder rotates: a forwarded request reaching the other is refused.
    let auth_bus = stack.nats.connect(Role::Auth).await;
    let probe = Lease::open(
        &stack.nats.connect(Role::AuthState).await,
        toka_auth::LEASE_BUCKET,
        toka_auth::LEASE_KEY,
        "probe",
        Duration::from_millis(900),
    )
    .await
    .unwrap();
    let holder = probe.holder().await.expect("a replica holds the lease");
    let other = if holder == "a" { "b" } else { "a" };
    let request = RotateRequest { credential: stack.admin() };
    let refused = auth_bus
        .request::<_, RotateReply>(&subject::auth_rotate_at(other), &request)
        .await
        .map_err(remote)
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
    auth_bus.request::<_, RotateReply>(&subject::auth_rotate_at(&holder), &request).await.unwrap();

    // The holder stops; the other takes the lease over and rotates.
    let (leader, follower) = if holder == "a" { (a, b) } else { (b, a) };
    leader.stop().await.unwrap();
    assert_eventually!(Duration::from_secs(5), probe.holder().await.as_deref() == Some(other), "lease taken over");
    let after = stack.rotate().await.expect("rotation after the failover");
    assert_eq!(stack.jwks().await.keys[0].kid, after.kid);
    follower.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verifier_follows_revocations_and_rotations_and_fails_closed_when_auth_falls_silent() {
    let Some(stack) = Stack::start("auth-verifier").await else { return };
    let tweak = |c: &mut AuthConfig| {
        c.heartbeat_ms = 200;
        c.instance = "solo".into();
    };
    let auth = stack.auth(tweak).await;
    let config = VerifierConfig { leeway_s: 0, jwks_refetch_ms: 60_000, max_silence_ms: 1_000 };
    // As the kernel verifies: its user reads keys and revocations on the services' subjects.
    let kernel_bus = stack.nats.connect(Role::Kernel).await;
    let verifier = LiveVerifier::start(&kernel_bus, config).await.unwrap();
    let token = stack.issue(&read_agents(), 60_000).await;
    assert_eq!(verifier.verify(&token.token).await.unwrap().jti, token.jti);

    // An unknown kid fetches the JWKS once per interval, not once per token.
    let fetches = verifier.jwks_fetches();
    let stranger = SigningKey::from_seed("k-nobody", [3; 32]).sign(&claims(9)).unwrap();
    for _ in 0..3 {
        let e = verifier.verify(&stranger).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthorized);
        assert!(e.message.contains("unknown signing key"), "{e:?}");
    }
    assert_eq!(verifier.jwks_fetches(), fetches + 1);

    // A rotation's event brings the new key.
    stack.rotate().await.unwrap();
    let fresh = stack.issue(&read_agents(), 60_000).await;
    assert_eventually!(Duration::from_secs(5), verifier.verify(&fresh.token).await.is_ok(), "new key known");

    // A revocation reaches the verifier while the token sits in its cache.
    stack.revoke(stack.admin(), token.jti).await.unwrap();
    assert_eventually!(
        Duration::from_secs(5),
        verifier
            .verify(&token.token)
            .await
            .is_err_and(|e| e.code == ErrorCode::Unauthorized && e.message.contains("revoked")),
        "revoked while cached"
    );
    assert!(verifier.epoch() >= 1);

    // Auth stops: after the silence bound every token is refused, until it is back.
    auth.stop().await.unwrap();
    assert_eventually!(
        Duration::from_secs(5),
        verifier
            .verify(&fresh.token)
            .await
            .is_err_and(|e| e.code == ErrorCode::Unavailable && e.message.contains("heartbeat")),
        "fails closed"
    );
    let _auth = stack.auth(tweak).await;
    assert_eventually!(Duration::from_secs(5), verifier.verify(&fresh.token).await.is_ok(), "open again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_verifies_with_pyjwt_given_only_the_published_jwks() {
    let Some(python) = crate::harness::python("jwt, cryptography") else { return };
    let Some(stack) = Stack::start("auth-pyjwt").await else { return };
    let _auth = stack.auth(|_| {}).await;
    let token = stack.issue(&read_agents(), 60_000).await;
    let jwks = stack.jwks().await;
    let jwks_file = stack.dir.path().join("jwks.json");
    std::fs::write(&jwks_file, serde_json::to_vec(&jwks).unwrap()).unwrap();
    let script = r#"
import json, sys, jwt
keys = jwt.PyJWKSet.from_dict(json.load(open(sys.argv[1])))
token = sys.argv[2]
kid = jwt.get_unverified_header(token)["kid"]
key = next(k for k in keys.keys if k.key_id == kid)
print(json.dumps(jwt.decode(token, key=key, algorithms=["EdDSA"], audience="toka", issuer="toka-auth")))
"#;
    let run = |token: &str| {
        std::process::Command::new(&python).args(["-c", script]).arg(&jwks_file).arg(token).output().unwrap()
    };
    let out = run(&token.token);
    assert!(out.status.success(), "PyJWT refused: {}", String::from_utf8_lossy(&out.stderr));
    let claims: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(claims["jti"], token.jti.to_string());
    assert_eq!(claims["sub"], "alice");
    // The same library refuses the token once a byte of its payload changes.
    let mut tampered = token.token.clone().into_bytes();
    let at = tampered.iter().position(|b| *b == b'.').unwrap() + 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let out = run(std::str::from_utf8(&tampered).unwrap());
    assert!(!out.status.success(), "PyJWT accepted a tampered token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_is_not_ready_until_the_audit_log_answers_then_makes_its_first_key() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("auth-wait");
    let admin = toka_runtime::config::AdminConfig {
        listen: std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(),
    };
    let addr = admin.listen;
    let config = toka_auth::Config {
        nats: nats.config(Role::Auth),
        admin,
        auth: AuthConfig { key_dir: dir.path().join("keys"), ..AuthConfig::default() },
        ..Default::default()
    };
    let bus = nats.connect(Role::Auth).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(toka_auth::run(config, bus, async move {
        let _ = stopped.await;
    }));
    assert_eventually!(Duration::from_secs(5), crate::harness::http_get(addr, "/livez").await.0 == 200, "alive");
    // Auth asks for the audit log's head and, with nobody answering, asks again: it is waiting.
    let mut asked = nats.connect(Role::Storage).await.client().subscribe(subject::STORAGE_HEAD.subject).await.unwrap();
    for _ in 0..2 {
        tokio::time::timeout(Duration::from_secs(10), asked.next()).await.expect("auth asks for the head").unwrap();
    }
    assert_eq!(crate::harness::http_get(addr, "/readyz").await.0, 503, "not ready without the audit log");
    drop(asked);
    let _storage = start_storage(&nats, &dir.path().join("storage")).await;
    assert_eventually!(Duration::from_secs(10), crate::harness::http_get(addr, "/readyz").await.0 == 200, "ready");
    let client = nats.connect(Role::Operator).await;
    let jwks: JwksReply = client.request(subject::AUTH_JWKS.subject, &JwksRequest::default()).await.unwrap();
    assert_eq!(jwks.keys.len(), 1, "the first key was made");
    let _ = stop.send(());
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_writers_appending_at_once_each_get_every_decision_into_the_audit_log_once() {
    use toka_auth::revocations::{self, Revocations};
    use toka_runtime::audit::{Entry, Events, Ledger, Settings};
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("audit-writers");
    let _storage = start_storage(&nats, dir.path()).await;
    let settings = Settings { interval: Duration::from_secs(1), commit_timeout: Duration::from_secs(10) };
    let fold = Revocations::new(3_600_000_000, 5_000_000);
    let observer: toka_runtime::audit::Observer = std::sync::Arc::new(|_: &Event| {});
    // Two replicas of auth: each seals its batches on its own view of the head, with appends in
    // flight, so they conflict all the time and must settle through the log.
    let a =
        Ledger::start(nats.connect(Role::Auth).await, settings.clone(), fold.clone(), observer.clone()).await.unwrap();
    let b = Ledger::start(nats.connect(Role::Auth).await, settings, fold, observer).await.unwrap();
    let per_writer = 150;
    let record = |ledger: Ledger<Revocations>, writer: &'static str, i: u32| async move {
        let entry = if i % 50 == 7 {
            let jti = TokenId::from_u128(u128::from(i) << 8 | u128::from(writer == "b"));
            revocations::entry("load".parse().unwrap(), jti, writer.into(), None)
        } else {
            Entry {
                principal: "load".parse().unwrap(),
                action: "token.delegate",
                resource: format!("token:{writer}-{i}"),
                events: Events::Fixed(vec![]),
            }
        };
        ledger.record(entry).await
    };
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..per_writer {
        calls.spawn(record(a.clone(), "a", i));
        calls.spawn(record(b.clone(), "b", i));
    }
    let mut committed = Vec::new();
    while let Some(done) = calls.join_next().await {
        committed.push(done.unwrap().expect("every decision is made durable"));
    }
    assert_eq!(committed.len(), 2 * per_writer as usize);

    // The log holds each decision once, in a chain storage verifies.
    let log = nats.read_log::<AuditEntry>(LogName::Audit).await;
    let mut resources: Vec<&str> = log
        .iter()
        .filter(|r| r.op.action == "token.delegate" || r.op.action == "token.revoke")
        .map(|r| r.op.resource.as_str())
        .collect();
    let total = resources.len();
    resources.sort_unstable();
    resources.dedup();
    assert_eq!((total, resources.len()), (2 * per_writer as usize, 2 * per_writer as usize), "each decision once");
    let operators = nats.connect(Role::Operator).await;
    let verified: toka_contract::api::storage::VerifyReply = operators
        .request(
            subject::STORAGE_VERIFY.subject,
            &toka_contract::api::storage::VerifyRequest { log: LogName::Audit, from_seq: None, to_seq: None },
        )
        .await
        .unwrap();
    assert_eq!((verified.verified, verified.first_break), (log.len() as u64, None));
    // Revocation epochs count up along the log, one per revocation, whoever wrote it.
    let epochs: Vec<u64> = log
        .iter()
        .flat_map(|r| &r.events)
        .filter_map(|e| match e {
            Event::TokenRevoked { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect();
    assert_eq!(epochs, (1..=epochs.len() as u64).collect::<Vec<_>>());
    assert_eq!(epochs.len(), 2 * (per_writer as usize).div_ceil(50));
    a.close().await;
    b.close().await;
}
