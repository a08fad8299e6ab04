//! The live verifier with auth spoken for from memory, on Tokio's paused clock: keys and
//! revocations at start, revocation events and gaps, heartbeats ahead of the epoch, failing
//! closed when auth falls silent, JWKS refetches on unknown keys and rotations.

#![allow(clippy::unwrap_used)]

use toka_contract::TokenId;
use toka_contract::api::auth::Revocation;
use tokio::sync::mpsc;

use super::*;
use crate::token::testing::{KEY, Key};

const NOW: u64 = 1_764_150_000;
const SILENCE_MS: u64 = 5_000;

/// Auth, answering from memory.
#[derive(Clone, Default)]
struct Auth {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    jwks: Vec<Key>,
    epoch: u64,
    revoked: Vec<u128>,
    down: bool,
    notices: Option<mpsc::UnboundedSender<Notice>>,
}

fn unreachable_auth() -> RequestError {
    RequestError::NoResponders("toka.auth.v1.jwks".into())
}

impl AuthSource for Auth {
    async fn jwks(&self) -> Result<JwksReply, RequestError> {
        let inner = lock(&self.inner);
        if inner.down {
            return Err(unreachable_auth());
        }
        Ok(JwksReply { keys: inner.jwks.iter().map(Key::jwk).collect() })
    }

    async fn revocations(&self) -> Result<RevocationsReply, RequestError> {
        let inner = lock(&self.inner);
        if inner.down {
            return Err(unreachable_auth());
        }
        let revoked = inner
            .revoked
            .iter()
            .map(|j| Revocation { jti: TokenId::from_u128(*j), revoked_at_us: 0, expires_at_us: u64::MAX })
            .collect();
        Ok(RevocationsReply { epoch: inner.epoch, revoked, next: None })
    }

    async fn notices(&self) -> Result<BoxStream<'static, Notice>, StartError> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.inner).notices = Some(tx);
        Ok(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|n| (n, rx)) }).boxed())
    }
}

impl Auth {
    fn with(keys: Vec<Key>, epoch: u64, revoked: Vec<u128>) -> Auth {
        let auth = Auth::default();
        *lock(&auth.inner) = Inner { jwks: keys, epoch, revoked, ..Inner::default() };
        auth
    }

    /// Publishes `notice` and lets the verifier take it in.
    async fn publish(&self, notice: Notice) {
        lock(&self.inner).notices.as_ref().unwrap().send(notice).unwrap();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    async fn beat(&self, epoch: u64) {
        self.publish(Notice::Heartbeat(Heartbeat { epoch, time_us: 0, interval_ms: 1_000 })).await;
    }

    async fn revoke(&self, jti: u128, epoch: u64) {
        let event =
            Event::TokenRevoked { jti: TokenId::from_u128(jti), epoch, reason: String::new(), expires_at_us: None };
        self.publish(Notice::Event(event)).await;
    }
}

fn config() -> VerifierConfig {
    VerifierConfig { leeway_s: 0, jwks_refetch_ms: 1_000, max_silence_ms: SILENCE_MS }
}

fn token(key: &Key, jti: u128) -> String {
    key.sign(&toka_contract::testing::claims(jti, NOW))
}

async fn code(verifier: &LiveVerifier<Auth>, token: &str) -> Result<TokenId, ErrorCode> {
    verifier.verify_at(token, NOW).await.map(|c| c.jti).map_err(|e| e.code)
}

#[tokio::test(start_paused = true)]
async fn keys_and_revocations_are_fetched_at_start() {
    let auth = Auth::with(vec![KEY], 3, vec![9]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    assert_eq!(code(&verifier, &token(&KEY, 1)).await, Ok(TokenId::from_u128(1)));
    assert_eq!(code(&verifier, &token(&KEY, 9)).await, Err(ErrorCode::Unauthorized), "revoked before start");
    assert_eq!((verifier.epoch(), verifier.jwks_fetches(), verifier.revocation_fetches()), (3, 1, 1));
}

#[tokio::test(start_paused = true)]
async fn a_verifier_does_not_start_without_auth() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    lock(&auth.inner).down = true;
    let refused = LiveVerifier::start(&auth, config()).await.unwrap_err();
    assert!(matches!(refused, StartError::Fetch { what: "the JWKS", .. }), "{refused}");
}

#[tokio::test(start_paused = true)]
async fn a_revocation_event_revokes_at_once_and_a_gap_fetches_the_whole_set() {
    let auth = Auth::with(vec![KEY], 1, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    assert!(code(&verifier, &token(&KEY, 2)).await.is_ok(), "verified and cached");
    auth.revoke(2, 2).await;
    assert_eq!(code(&verifier, &token(&KEY, 2)).await, Err(ErrorCode::Unauthorized), "revoked, though cached");
    assert_eq!((verifier.epoch(), verifier.revocation_fetches()), (2, 1), "the next epoch needs no fetch");
    // Epoch 3 was missed: auth's set has it.
    lock(&auth.inner).revoked = vec![2, 3, 4];
    lock(&auth.inner).epoch = 4;
    auth.revoke(4, 4).await;
    assert_eq!(verifier.revocation_fetches(), 2, "a gap of one fetches the set");
    for jti in [3, 4] {
        assert_eq!(code(&verifier, &token(&KEY, jti)).await, Err(ErrorCode::Unauthorized), "{jti}");
    }
    // A child of a revoked token is refused through its chain.
    let child = Claims { chain: vec![TokenId::from_u128(2)], depth: 1, ..toka_contract::testing::claims(7, NOW) };
    assert_eq!(verifier.verify_at(&KEY.sign(&child), NOW).await.unwrap_err().code, ErrorCode::Unauthorized);
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_ahead_of_the_epoch_fetches_the_set() {
    let auth = Auth::with(vec![KEY], 2, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    auth.beat(2).await;
    auth.beat(1).await;
    assert_eq!(verifier.revocation_fetches(), 1, "not behind: nothing fetched");
    lock(&auth.inner).revoked = vec![6];
    lock(&auth.inner).epoch = 3;
    auth.beat(3).await;
    assert_eq!((verifier.revocation_fetches(), verifier.epoch()), (2, 3));
    assert_eq!(code(&verifier, &token(&KEY, 6)).await, Err(ErrorCode::Unauthorized));
}

#[tokio::test(start_paused = true)]
async fn without_a_heartbeat_tokens_are_refused_until_one_arrives() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    let good = token(&KEY, 1);
    tokio::time::advance(Duration::from_millis(SILENCE_MS)).await;
    assert!(code(&verifier, &good).await.is_ok(), "at the bound, still heard");
    tokio::time::advance(Duration::from_millis(1)).await;
    let refused = verifier.verify_at(&good, NOW).await.unwrap_err();
    assert_eq!((refused.code, refused.retry_after_ms), (ErrorCode::Unavailable, Some(1_000)));
    auth.beat(0).await;
    assert!(code(&verifier, &good).await.is_ok(), "heard again");
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_the_verifier_cannot_catch_up_with_does_not_count() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    tokio::time::advance(Duration::from_millis(SILENCE_MS - 100)).await;
    lock(&auth.inner).down = true;
    auth.beat(4).await;
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(code(&verifier, &token(&KEY, 1)).await, Err(ErrorCode::Unavailable), "behind and silent");
    lock(&auth.inner).down = false;
    auth.beat(4).await;
    assert!(code(&verifier, &token(&KEY, 1)).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn an_unknown_key_fetches_the_jwks_at_most_once_an_interval() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    let (k2, k3) = (Key { kid: "k2", seed: [2; 32] }, Key { kid: "k3", seed: [3; 32] });
    lock(&auth.inner).jwks = vec![KEY, Key { kid: "k2", seed: [2; 32] }];
    assert!(code(&verifier, &token(&k2, 1)).await.is_ok(), "k2 learnt by refetching");
    assert_eq!(verifier.jwks_fetches(), 2);
    lock(&auth.inner).jwks.push(Key { kid: "k3", seed: [3; 32] });
    tokio::time::advance(Duration::from_millis(999)).await;
    auth.beat(0).await;
    assert_eq!(code(&verifier, &token(&k3, 1)).await, Err(ErrorCode::Unauthorized), "too soon to fetch again");
    assert_eq!(verifier.jwks_fetches(), 2);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(code(&verifier, &token(&k3, 1)).await.is_ok(), "a second later it may");
    assert_eq!(verifier.jwks_fetches(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_rotation_fetches_the_jwks_at_once() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    let k2 = Key { kid: "k2", seed: [2; 32] };
    lock(&auth.inner).jwks = vec![Key { kid: "k2", seed: [2; 32] }];
    auth.publish(Notice::Event(Event::KeyRotated { kid: "k2".into(), previous_kid: None, retire_at_us: None })).await;
    assert_eq!(verifier.jwks_fetches(), 2);
    assert!(code(&verifier, &token(&k2, 1)).await.is_ok());
    // Other events change nothing.
    auth.publish(Notice::Event(Event::AgentResumed { agent: toka_contract::AgentId::mint(1, 1, 0) })).await;
    assert_eq!((verifier.jwks_fetches(), verifier.revocation_fetches()), (2, 1));
    // The retired key is gone: its tokens are refused, after one more look at the JWKS.
    assert_eq!(code(&verifier, &token(&KEY, 1)).await, Err(ErrorCode::Unauthorized));
    assert_eq!(verifier.jwks_fetches(), 3);
}

#[tokio::test(start_paused = true)]
async fn verify_checks_time_against_the_system_clock() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    let now = now_s();
    let current = KEY.sign(&toka_contract::testing::claims(1, now));
    assert!(verifier.verify(&current).await.is_ok(), "valid now");
    let expired = KEY.sign(&toka_contract::testing::claims(2, now - 3_600));
    assert_eq!(verifier.verify(&expired).await.unwrap_err().code, ErrorCode::Unauthorized, "expired an hour ago");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_verifier_stops_it_following_auth() {
    let auth = Auth::with(vec![KEY], 0, vec![]);
    let verifier = LiveVerifier::start(&auth, config()).await.unwrap();
    auth.beat(0).await;
    drop(verifier);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    let sender = lock(&auth.inner).notices.clone().unwrap();
    assert!(sender.is_closed(), "its task, and with it the subscription, is gone");
}
