//! `toka-client`: a client of Toka, for programs that drive agents and tasks.
//!
//! - [`Client`]: a connection with a token: submit operations (retried with the same operation
//!   id while the kernel cannot take them, so an operation is applied at most once), query
//!   agents and tasks, ask auth for tokens; with [`Client::connect_renewing`] it connects again
//!   with a fresh token from a [`TokenSource`] (such as [`token_file`]) before each expires.
//! - [`worker`]: the worker loop: claim tasks from a queue, heartbeat while working, complete or
//!   fail them.
//! - [`events`]: committed events from a log's stream (`TOKA_EVENTS` for the kernel log), in
//!   log order, history first, then as they are stored.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use toka_client::{Client, NatsConfig};
//! use toka_contract::Operation;
//! use toka_contract::spec::AgentSpec;
//!
//! let nats = NatsConfig { url: "nats://127.0.0.1:4222".into(), ..NatsConfig::default() };
//! let client = Client::connect(&nats, "my-program", std::env::var("TOKA_TOKEN")?).await?;
//! let spec = AgentSpec { name: "planner".parse()?, parent: None, limits: Default::default() };
//! let reply = client.submit(Operation::SpawnAgent(spec)).await?;
//! println!("spawned at seq {}: {:?}", reply.seq, reply.events);
//! # Ok(())
//! # }
//! ```
//!
//! The client builds on `toka-contract` (the types) and `toka-runtime`'s bus (the connection);
//! it never links a service.

pub mod events;
pub mod worker;

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::future::BoxFuture;
use toka_contract::api::auth::{Credential, IssueRequest, TokenReply};
use toka_contract::api::kernel::{
    AgentGetRequest, AgentListReply, AgentListRequest, AgentState, AgentView, BatchItem, StatusReply, StatusRequest,
    SubmitBatchReply, SubmitBatchRequest, SubmitReply, SubmitRequest, TaskGetRequest, TaskListReply, TaskListRequest,
    TaskState, TaskView,
};
use toka_contract::capability::Capability;
use toka_contract::schema::{Contract, ReplyContract};
use toka_contract::spec::{Principal, QueueName};
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{AgentId, OpId, Operation, TaskId, subject};
pub use toka_runtime::bus::Bus;
pub use toka_runtime::config::NatsConfig;

/// How long and how often a call is retried when the kernel cannot take it now
/// (`unavailable`, `rate_limited`, or no answer in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all, the first included (1: never retried).
    pub attempts: u32,
    /// The first wait when the error names none; doubled each time.
    pub first_wait: Duration,
    /// The longest wait between two tries.
    pub max_wait: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry { attempts: 8, first_wait: Duration::from_millis(50), max_wait: Duration::from_secs(2) }
    }
}

impl Retry {
    /// How long to wait before try `attempt + 1` after `error` on try `attempt` (from 1), or
    /// `None` when the error is final or the tries are used up.
    pub fn wait(&self, error: &WireError, attempt: u32) -> Option<Duration> {
        if attempt >= self.attempts || !matches!(error.code, ErrorCode::Unavailable | ErrorCode::RateLimited) {
            return None;
        }
        let doubled = self.first_wait.saturating_mul(1 << attempt.saturating_sub(1).min(16));
        let wait = error.retry_after_ms.map_or(doubled, Duration::from_millis);
        Some(wait.min(self.max_wait))
    }
}

/// A fresh operation id: the time in milliseconds, then 80 random bits.
pub fn fresh_op_id() -> Result<OpId, WireError> {
    toka_runtime::fresh_id(toka_runtime::now_us())
        .map(OpId::from_u128)
        .map_err(|e| WireError::new(ErrorCode::Internal, format!("no random source: {e}")))
}

/// Which agents a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFilter {
    /// Only children of this agent.
    pub parent: Option<AgentId>,
    /// Only agents in this state.
    pub state: Option<AgentState>,
}

/// Which tasks a listing returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TaskFilter {
    /// Only tasks of this agent.
    pub agent: Option<AgentId>,
    /// Only tasks of this queue.
    pub queue: Option<QueueName>,
    /// Only tasks in this state.
    pub state: Option<TaskState>,
}

/// Where a renewing client gets a fresh token (a new `jti`) before the one it acts with expires:
/// [`token_file`], a closure that asks auth (with an admin key or an `issue` token), or
/// anything else.
pub type TokenSource = Arc<dyn Fn() -> BoxFuture<'static, Result<String, WireError>> + Send + Sync>;

/// A token source that reads the token from `path` each time (trimmed): whatever keeps the
/// file current (an operator's `toka token issue`, a secret mounted by the platform) renews
/// the client.
pub fn token_file(path: impl Into<PathBuf>) -> TokenSource {
    let path: PathBuf = path.into();
    Arc::new(move || {
        let path = path.clone();
        Box::pin(async move {
            match tokio::fs::read_to_string(&path).await {
                Ok(token) => Ok(token.trim().to_owned()),
                Err(e) => Err(WireError::new(ErrorCode::Unauthorized, format!("token file {}: {e}", path.display()))),
            }
        })
    })
}

/// A connection admitted with one token, and that token.
#[derive(Debug)]
struct Session {
    bus: Bus,
    token: String,
    /// When to get a fresh token (Unix seconds), for a renewing client.
    renew_at_s: Option<u64>,
    expires_s: Option<u64>,
}

impl Session {
    fn new(bus: Bus, token: String) -> Session {
        let lifetime = toka_runtime::token::unverified_lifetime(&token);
        // A quarter of its life before it expires, at least a second and at most a minute.
        let renew_at_s = lifetime.map(|(iat, exp)| exp.saturating_sub((exp.saturating_sub(iat) / 4).clamp(1, 60)));
        Session { bus, token, renew_at_s, expires_s: lifetime.map(|(_, exp)| exp) }
    }
}

/// What a renewing client connects again with.
struct Renewal {
    nats: NatsConfig,
    name: String,
    source: TokenSource,
    /// One renewal at a time; when one last failed while the token still served.
    busy: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

/// The current session, shared by a client's clones.
struct Shared {
    current: RwLock<Arc<Session>>,
    renewal: Option<Renewal>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("renewing", &self.renewal.is_some()).finish_non_exhaustive()
    }
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorCode::Unavailable, format!("{what}: {e}")).with_retry_after_ms(1_000)
}

fn unix_now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A connection to Toka acting with a token; clones share the connection.
///
/// A client made with [`Client::connect_renewing`] gets a fresh token from its source a quarter
/// of the token's life before it expires (at least a second, at most a minute before) and
/// connects again with it, under the new token's inbox: the server closes a connection whose
/// token expired, and a connection cannot change its token. Calls in flight finish on the old
/// connection.
#[derive(Debug, Clone)]
pub struct Client {
    shared: Arc<Shared>,
    retry: Retry,
}

impl Client {
    /// Connects to NATS as `name` with `token` and acts with it: the connection is admitted by
    /// auth with the token's permissions and receives replies on the token's own inbox
    /// (`nats.nkey_seed_file` is not used). It closes when the token expires or is revoked;
    /// [`Client::connect_renewing`] connects again with a fresh token before then.
    pub async fn connect(
        nats: &NatsConfig,
        name: &str,
        token: impl Into<String>,
    ) -> Result<Client, toka_runtime::bus::Error> {
        let token = token.into();
        Ok(Client::new(Bus::connect_with_token(nats, name, &token).await?, token))
    }

    /// Connects as `name` with a token from `source`, and again with a fresh one from it before
    /// each token expires.
    pub async fn connect_renewing(nats: &NatsConfig, name: &str, source: TokenSource) -> Result<Client, WireError> {
        let token = source().await?;
        let bus = Bus::connect_with_token(nats, name, &token).await.map_err(|e| unavailable("connecting", e))?;
        let renewal =
            Renewal { nats: nats.clone(), name: name.to_owned(), source, busy: tokio::sync::Mutex::new(None) };
        let current = RwLock::new(Arc::new(Session::new(bus, token)));
        Ok(Client { shared: Arc::new(Shared { current, renewal: Some(renewal) }), retry: Retry::default() })
    }

    /// A client on an open connection (one made with this token, or an operator's).
    pub fn new(bus: Bus, token: impl Into<String>) -> Client {
        let current = RwLock::new(Arc::new(Session::new(bus, token.into())));
        Client { shared: Arc::new(Shared { current, renewal: None }), retry: Retry::default() }
    }

    /// The same connection acting with another token (the connection keeps the permissions it
    /// was admitted with), not renewed.
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client { retry: self.retry, ..Client::new(self.bus(), token) }
    }

    /// This client with another retry policy.
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = retry;
        self
    }

    fn current(&self) -> Arc<Session> {
        self.shared.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The connection now.
    pub fn bus(&self) -> Bus {
        self.current().bus.clone()
    }

    /// The token the client acts with now.
    pub fn token(&self) -> String {
        self.current().token.clone()
    }

    /// The connection and token to use for a call now, renewed first when the token is due.
    pub async fn connection(&self) -> Result<(Bus, String), WireError> {
        let session = self.session().await?;
        Ok((session.bus.clone(), session.token.clone()))
    }

    /// The current session, renewed first when its token is due.
    async fn session(&self) -> Result<Arc<Session>, WireError> {
        let current = self.current();
        match (&self.shared.renewal, current.renew_at_s) {
            (Some(renewal), Some(at)) if unix_now_s() >= at => self.renew(renewal, current).await,
            _ => Ok(current),
        }
    }

    /// Replaces `stale` with a session on a fresh token, unless another call did already. If no
    /// fresh token can be had, the stale one serves until it expires, and the source is asked
    /// again a second later at the soonest.
    async fn renew(&self, renewal: &Renewal, stale: Arc<Session>) -> Result<Arc<Session>, WireError> {
        let mut failed_at = renewal.busy.lock().await;
        let current = self.current();
        if !Arc::ptr_eq(&current, &stale) {
            return Ok(current);
        }
        let still_valid = stale.expires_s.is_some_and(|exp| unix_now_s() < exp);
        if still_valid && failed_at.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
            return Ok(stale);
        }
        let fresh = match (renewal.source)().await {
            Ok(token) if token == stale.token => Err(WireError::new(
                ErrorCode::Unauthorized,
                "the token source gave the expiring token again; renew it there",
            )),
            Ok(token) => match Bus::connect_with_token(&renewal.nats, &renewal.name, &token).await {
                Ok(bus) => Ok(Arc::new(Session::new(bus, token))),
                Err(e) => Err(unavailable("connecting with a fresh token", e)),
            },
            Err(e) => Err(e),
        };
        match fresh {
            Ok(fresh) => {
                *failed_at = None;
                let jti = toka_runtime::token::unverified_jti(&fresh.token).unwrap_or_default();
                tracing::info!(%jti, "connected again with a fresh token");
                *self.shared.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = fresh.clone();
                Ok(fresh)
            }
            Err(e) if still_valid => {
                *failed_at = Some(tokio::time::Instant::now());
                tracing::warn!(error = %e, "no fresh token yet; the current one serves until it expires");
                Ok(stale)
            }
            Err(e) => Err(e),
        }
    }

    /// Sends the request `body` makes with the current token to `subject`, retrying as the
    /// policy says (each attempt with the token current then).
    async fn call<Req: Contract, Rep: ReplyContract>(
        &self,
        subject: &str,
        body: impl Fn(String) -> Req,
    ) -> Result<Rep, WireError> {
        let mut attempt = 1;
        loop {
            let session = self.session().await?;
            let error = match session.bus.request(subject, &body(session.token.clone())).await {
                Ok(reply) => return Ok(reply),
                Err(e) => e.to_wire(),
            };
            let Some(wait) = self.retry.wait(&error, attempt) else { return Err(error) };
            tracing::debug!(%subject, attempt, code = %error.code, ?wait, "retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }

    /// Submits `op` under a fresh operation id; the reply once it is durable.
    pub async fn submit(&self, op: Operation) -> Result<SubmitReply, WireError> {
        self.submit_with_id(fresh_op_id()?, op).await
    }

    /// Submits `op` under `op_id`. Retries carry the same id, so however often it is sent the
    /// kernel applies it once, and every reply is the first result.
    pub async fn submit_with_id(&self, op_id: OpId, op: Operation) -> Result<SubmitReply, WireError> {
        self.call(subject::KERNEL_SUBMIT.subject, |token| SubmitRequest { op_id, token, op: op.clone() }).await
    }

    /// Submits `ops` in one request, each under a fresh operation id; each one's outcome, in
    /// order. Operations the kernel could not take are sent again with their ids.
    pub async fn submit_batch(&self, ops: Vec<Operation>) -> Result<Vec<Result<SubmitReply, WireError>>, WireError> {
        let mut items = Vec::with_capacity(ops.len());
        for op in ops {
            items.push(BatchItem { op_id: fresh_op_id()?, op });
        }
        let mut results: Vec<Option<Result<SubmitReply, WireError>>> = vec![None; items.len()];
        let mut attempt = 1;
        loop {
            let todo: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_none()).collect();
            let ops: Vec<BatchItem> = todo.iter().map(|&i| items[i].clone()).collect();
            let request = |token| SubmitBatchRequest { token, ops: ops.clone() };
            let reply: SubmitBatchReply = self.call(subject::KERNEL_SUBMIT_BATCH.subject, request).await?;
            let mut wait = None;
            for (&i, result) in todo.iter().zip(reply.results) {
                match result.into_result() {
                    Err(e) => match self.retry.wait(&e, attempt) {
                        Some(w) => wait = wait.max(Some(w)),
                        None => results[i] = Some(Err(e)),
                    },
                    ok => results[i] = Some(ok),
                }
            }
            let Some(wait) = wait else { break };
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(WireError::new(ErrorCode::Internal, "no result"))))
            .collect())
    }

    /// One agent.
    pub async fn agent(&self, agent: AgentId) -> Result<AgentView, WireError> {
        self.call(subject::KERNEL_AGENT_GET.subject, |token| AgentGetRequest { token, agent }).await
    }

    /// A page of agents (`limit` at most 1000), after `after`.
    pub async fn agents(
        &self,
        filter: &AgentFilter,
        after: Option<AgentId>,
        limit: u32,
    ) -> Result<AgentListReply, WireError> {
        let request = |token| AgentListRequest { token, parent: filter.parent, state: filter.state, after, limit };
        self.call(subject::KERNEL_AGENT_LIST.subject, request).await
    }

    /// Where the sequencer stands: lease holder, log head, state hash, standbys (the token
    /// needs `read` on `agent:*`).
    pub async fn status(&self) -> Result<StatusReply, WireError> {
        self.call(subject::KERNEL_STATUS.subject, |token| StatusRequest { token }).await
    }

    /// One task.
    pub async fn task(&self, task: TaskId) -> Result<TaskView, WireError> {
        self.call(subject::KERNEL_TASK_GET.subject, |token| TaskGetRequest { token, task }).await
    }

    /// A page of tasks (`limit` at most 1000), after `after`.
    pub async fn tasks(
        &self,
        filter: &TaskFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<TaskListReply, WireError> {
        let request = |token| TaskListRequest {
            token,
            agent: filter.agent,
            queue: filter.queue.clone(),
            state: filter.state,
            after,
            limit,
        };
        self.call(subject::KERNEL_TASK_LIST.subject, request).await
    }

    /// A token from auth, asked for with the deployment's admin key (how the first tokens are
    /// made).
    pub async fn issue_token(
        bus: &Bus,
        admin_key: &str,
        sub: Principal,
        capabilities: Vec<Capability>,
        ttl: Duration,
        one_time: bool,
    ) -> Result<TokenReply, WireError> {
        let request = IssueRequest {
            credential: Credential::AdminKey(admin_key.trim().to_owned()),
            sub,
            capabilities,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            one_time,
        };
        bus.request(subject::AUTH_ISSUE.subject, &request).await.map_err(|e| e.to_wire())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(code: ErrorCode, retry_after_ms: Option<u64>) -> WireError {
        let e = WireError::new(code, "x");
        match retry_after_ms {
            Some(ms) => e.with_retry_after_ms(ms),
            None => e,
        }
    }

    #[test]
    fn only_what_the_kernel_could_not_take_now_is_retried() {
        let retry = Retry::default();
        for code in ErrorCode::ALL {
            let retried = retry.wait(&error(code, None), 1).is_some();
            assert_eq!(retried, matches!(code, ErrorCode::Unavailable | ErrorCode::RateLimited), "{code:?}");
        }
    }

    #[test]
    fn the_wait_is_the_one_asked_for_or_doubles_and_is_bounded() {
        let retry = Retry { attempts: 5, first_wait: Duration::from_millis(50), max_wait: Duration::from_millis(300) };
        let busy = error(ErrorCode::Unavailable, None);
        let waits: Vec<_> = (1..=5).map(|a| retry.wait(&busy, a)).collect();
        assert_eq!(
            waits,
            [
                Some(Duration::from_millis(50)),
                Some(Duration::from_millis(100)),
                Some(Duration::from_millis(200)),
                Some(Duration::from_millis(300)),
                None
            ],
            "doubling, capped, and no fifth retry after five tries"
        );
        assert_eq!(retry.wait(&error(ErrorCode::RateLimited, Some(120)), 1), Some(Duration::from_millis(120)));
        assert_eq!(retry.wait(&error(ErrorCode::RateLimited, Some(9_000)), 1), Some(Duration::from_millis(300)));
        let never = Retry { attempts: 1, ..retry };
        assert_eq!(never.wait(&busy, 1), None);
    }

    #[test]
    fn fresh_operation_ids_differ_and_print_as_lower_case_ulids() {
        let (a, b) = (fresh_op_id().unwrap(), fresh_op_id().unwrap());
        assert_ne!(a, b);
        let text = a.to_string();
        assert_eq!((text.len(), text.to_lowercase()), (26, text.clone()));
        assert_eq!(text.parse::<OpId>().unwrap(), a);
    }
}
