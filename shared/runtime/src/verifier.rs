//! The token verifier every service that accepts tokens runs: a [`Verifier`] kept current
//! from auth.
//!
//! - Keys: the JWKS is fetched at start, again when a `auth.key_rotated` event announces a
//!   rotation, and on an unknown `kid` at most once per `jwks_refetch_ms`.
//! - Revocations: the full set is fetched at start; each `auth.token_revoked` event adds one;
//!   auth's heartbeat carries the revocation epoch, and a verifier that finds itself behind (or
//!   sees a gap in the events' epochs) fetches the full set again.
//! - Fail closed: when no heartbeat has arrived for `max_silence_ms`, every token is refused
//!   with `unavailable` until one does: a verifier that cannot hear revocations does not
//!   accept tokens.
//!
//! What auth says reaches the verifier through [`AuthSource`]: [`Bus`] asks auth and listens
//! on NATS; unit tests speak for auth from memory, on Tokio's paused clock.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use toka_contract::api::auth::{Claims, Heartbeat, JwksReply, JwksRequest, RevocationsReply, RevocationsRequest};
use toka_contract::envelope::Envelope;
use toka_contract::event::Event;
use toka_contract::subject;
use toka_contract::wire::{ErrorCode, WireError};
use tokio::time::Instant;

use crate::bus::{Bus, RequestError};
use crate::token::{self, Verifier};

/// How a service checks tokens (the `[verifier]` section of its configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VerifierConfig {
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// The shortest time between two JWKS fetches caused by unknown `kid`s, in milliseconds.
    pub jwks_refetch_ms: u64,
    /// Tokens are refused once auth's heartbeat has been missing this long, in milliseconds.
    pub max_silence_ms: u64,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        VerifierConfig { leeway_s: 5, jwks_refetch_ms: 1_000, max_silence_ms: 5_000 }
    }
}

/// Why the verifier could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Auth did not answer.
    #[error("fetching {what} from auth: {source}")]
    Fetch {
        /// The JWKS or the revocations.
        what: &'static str,
        /// Why.
        source: RequestError,
    },
    /// The JWKS holds a key that is not an Ed25519 signing key.
    #[error(transparent)]
    Keys(#[from] token::Error),
    /// A subscription failed.
    #[error("subscribing to {subject}: {reason}")]
    Subscribe {
        /// The subject.
        subject: &'static str,
        /// Why.
        reason: String,
    },
}

/// Something auth publishes that a verifier follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// The revocation heartbeat.
    Heartbeat(Heartbeat),
    /// A committed event of the audit log (a revocation, a key rotation, …).
    Event(Event),
}

/// Where a verifier hears from auth.
pub trait AuthSource: Clone + Send + Sync + 'static {
    /// The JWKS.
    fn jwks(&self) -> impl Future<Output = Result<JwksReply, RequestError>> + Send;
    /// Every revocation in force, with the epoch.
    fn revocations(&self) -> impl Future<Output = Result<RevocationsReply, RequestError>> + Send;
    /// What auth publishes from now on: heartbeats and audit events.
    fn notices(&self) -> impl Future<Output = Result<BoxStream<'static, Notice>, StartError>> + Send;
}

impl AuthSource for Bus {
    async fn jwks(&self) -> Result<JwksReply, RequestError> {
        self.request(subject::AUTH_SERVICE_JWKS.subject, &JwksRequest::default()).await
    }

    /// Every page, one after the other. The epoch is the first page's: a revocation made while
    /// the pages are read comes as an event (the notices are followed before the set is
    /// fetched), and a later epoch in a heartbeat makes the verifier fetch again.
    async fn revocations(&self) -> Result<RevocationsReply, RequestError> {
        let subject = subject::AUTH_SERVICE_REVOCATIONS.subject;
        let mut all: RevocationsReply = self.request(subject, &RevocationsRequest::default()).await?;
        while let Some(after) = all.next.take() {
            let page: RevocationsReply = self
                .request(subject, &RevocationsRequest { after: Some(after), ..RevocationsRequest::default() })
                .await?;
            all.revoked.extend(page.revoked);
            all.next = page.next;
        }
        Ok(all)
    }

    async fn notices(&self) -> Result<BoxStream<'static, Notice>, StartError> {
        let subscribe = |subject: &'static str| async move {
            self.client().subscribe(subject).await.map_err(|e| StartError::Subscribe { subject, reason: e.to_string() })
        };
        let heartbeats = subscribe(subject::AUTH_HEARTBEAT).await?.filter_map(|message| async move {
            let beat = serde_json::from_slice::<Heartbeat>(&message.payload);
            if beat.is_err() {
                tracing::warn!("an auth heartbeat that does not parse; ignored");
            }
            beat.ok().map(Notice::Heartbeat)
        });
        let events = subscribe(subject::AUTH_EVENTS).await?.filter_map(|message| async move {
            serde_json::from_slice::<Envelope>(&message.payload).ok().map(|envelope| Notice::Event(envelope.data))
        });
        Ok(futures::stream::select(heartbeats, events).boxed())
    }
}

struct Shared<S> {
    source: S,
    config: VerifierConfig,
    verifier: RwLock<Verifier>,
    epoch: AtomicU64,
    last_heard: Mutex<Instant>,
    last_refetch: Mutex<Option<Instant>>,
    jwks_fetches: AtomicU64,
    revocation_fetches: AtomicU64,
}

/// A verifier fed by auth (over NATS, as [`Bus`]); dropping it stops its background task.
pub struct LiveVerifier<S = Bus> {
    shared: Arc<Shared<S>>,
    task: tokio::task::JoinHandle<()>,
}

impl<S> std::fmt::Debug for LiveVerifier<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveVerifier").field("epoch", &self.shared.epoch.load(Ordering::SeqCst)).finish_non_exhaustive()
    }
}

impl<S> Drop for LiveVerifier<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What an event asks of the verifier.
enum Applied {
    Done,
    Gap,
    KeysChanged,
}

impl<S: AuthSource> Shared<S> {
    async fn fetch_keys(&self) -> Result<(), StartError> {
        let jwks = self.source.jwks().await.map_err(|source| StartError::Fetch { what: "the JWKS", source })?;
        self.verifier.write().unwrap_or_else(std::sync::PoisonError::into_inner).set_keys(&jwks)?;
        self.jwks_fetches.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn fetch_revocations(&self) -> Result<(), StartError> {
        let reply =
            self.source.revocations().await.map_err(|source| StartError::Fetch { what: "the revocations", source })?;
        self.revocation_fetches.fetch_add(1, Ordering::Relaxed);
        let mut verifier = self.verifier.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Revocations only accumulate: add the full set rather than replace what events may
        // have brought in while the request was in flight.
        for r in &reply.revoked {
            verifier.revoke(r.jti);
        }
        self.epoch.fetch_max(reply.epoch, Ordering::SeqCst);
        *lock(&self.last_heard) = Instant::now();
        Ok(())
    }

    fn heard(&self) {
        *lock(&self.last_heard) = Instant::now();
    }

    /// Applies one auth event; whether the full revocation set must be fetched (a gap).
    fn apply(&self, event: &Event) -> Applied {
        match event {
            Event::TokenRevoked { jti, epoch, .. } => {
                self.verifier.write().unwrap_or_else(std::sync::PoisonError::into_inner).revoke(*jti);
                let before = self.epoch.fetch_max(*epoch, Ordering::SeqCst);
                if *epoch > before + 1 { Applied::Gap } else { Applied::Done }
            }
            Event::KeyRotated { .. } => Applied::KeysChanged,
            _ => Applied::Done,
        }
    }

    /// Follows one notice from auth.
    async fn follow(&self, notice: Notice) {
        match notice {
            Notice::Heartbeat(beat) => {
                if beat.epoch > self.epoch.load(Ordering::SeqCst)
                    && let Err(e) = self.fetch_revocations().await
                {
                    // Not heard: behind the epoch, the verifier must not count as current.
                    return tracing::warn!(error = %e, "behind auth's revocation epoch and cannot catch up");
                }
                self.heard();
            }
            Notice::Event(event) => {
                let result = match self.apply(&event) {
                    Applied::Done => Ok(()),
                    Applied::Gap => self.fetch_revocations().await,
                    Applied::KeysChanged => self.fetch_keys().await,
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "cannot follow auth");
                }
            }
        }
    }
}

impl<S: AuthSource> LiveVerifier<S> {
    /// Subscribes to auth's heartbeat and events, then fetches the JWKS and the revocations
    /// (in that order, so nothing published in between is missed).
    pub async fn start(source: &S, config: VerifierConfig) -> Result<LiveVerifier<S>, StartError> {
        let mut notices = source.notices().await?;
        let shared = Arc::new(Shared {
            source: source.clone(),
            verifier: RwLock::new(Verifier::new(&JwksReply { keys: Vec::new() }, config.leeway_s)?),
            config,
            epoch: AtomicU64::new(0),
            last_heard: Mutex::new(Instant::now()),
            last_refetch: Mutex::new(None),
            jwks_fetches: AtomicU64::new(0),
            revocation_fetches: AtomicU64::new(0),
        });
        shared.fetch_keys().await?;
        shared.fetch_revocations().await?;
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            while let Some(notice) = notices.next().await {
                task_shared.follow(notice).await;
            }
        });
        Ok(LiveVerifier { shared, task })
    }

    /// The claims of `token` now, or why it is refused.
    pub async fn verify(&self, token: &str) -> Result<Claims, WireError> {
        self.verify_at(token, now_s()).await
    }

    /// The claims of `token` at `now_s` (seconds since the epoch), or why it is refused:
    /// `unauthorized` for a bad token, `unavailable` while auth's heartbeat is missing.
    pub async fn verify_at(&self, token: &str, now_s: u64) -> Result<Claims, WireError> {
        let silence = lock(&self.shared.last_heard).elapsed();
        if silence > Duration::from_millis(self.shared.config.max_silence_ms) {
            return Err(WireError::new(
                ErrorCode::Unavailable,
                format!(
                    "no heartbeat from auth for {} ms (bound {} ms): tokens are refused until revocations can be heard",
                    silence.as_millis(),
                    self.shared.config.max_silence_ms
                ),
            )
            .with_retry_after_ms(1_000));
        }
        let first = self.check(token, now_s);
        match first {
            Err(token::Error::UnknownKey(_)) if self.may_refetch() => {
                if let Err(e) = self.shared.fetch_keys().await {
                    tracing::warn!(error = %e, "JWKS refetch failed");
                }
                self.check(token, now_s).map_err(|e| WireError::from(&e))
            }
            other => other.map_err(|e| WireError::from(&e)),
        }
    }

    fn check(&self, token: &str, now_s: u64) -> Result<Claims, token::Error> {
        self.shared.verifier.read().unwrap_or_else(std::sync::PoisonError::into_inner).verify(token, now_s)
    }

    /// Whether an unknown `kid` may trigger a JWKS fetch now (at most one such fetch per
    /// interval; fetches for announced rotations do not count).
    fn may_refetch(&self) -> bool {
        let mut last = lock(&self.shared.last_refetch);
        let interval = Duration::from_millis(self.shared.config.jwks_refetch_ms);
        if last.is_some_and(|t| t.elapsed() < interval) {
            return false;
        }
        *last = Some(Instant::now());
        true
    }

    /// How many times the JWKS was fetched (at start, on rotations, on unknown `kid`s).
    pub fn jwks_fetches(&self) -> u64 {
        self.shared.jwks_fetches.load(Ordering::Relaxed)
    }

    /// How many times the full revocation set was fetched (at start, when behind).
    pub fn revocation_fetches(&self) -> u64 {
        self.shared.revocation_fetches.load(Ordering::Relaxed)
    }

    /// The revocation epoch this verifier has caught up to.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests;
