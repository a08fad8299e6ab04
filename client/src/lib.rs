//! `toka-client`: a client of Toka, for programs that drive agents and tasks.
//!
//! - [`Client`]: a connection with a token: submit operations (retried with the same operation
//!   id while the kernel cannot take them, so an operation is applied at most once), query
//!   agents and tasks, ask auth for tokens.
//! - [`worker`]: the worker loop: claim tasks from a queue, heartbeat while working, complete or
//!   fail them.
//! - [`events`]: committed events from the `TOKA_EVENTS` stream, in log order, history first.
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

use std::time::Duration;

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

/// A connection to Toka acting with one token.
#[derive(Debug, Clone)]
pub struct Client {
    bus: Bus,
    token: String,
    retry: Retry,
}

impl Client {
    /// Connects to NATS as `name` with `token` and acts with it: the connection is admitted by
    /// auth with the token's permissions and receives replies on the token's own inbox
    /// (`nats.nkey_seed_file` is not used). It closes when the token expires or is revoked;
    /// connect again with a fresh token.
    pub async fn connect(
        nats: &NatsConfig,
        name: &str,
        token: impl Into<String>,
    ) -> Result<Client, toka_runtime::bus::Error> {
        let token = token.into();
        Ok(Client::new(Bus::connect_with_token(nats, name, &token).await?, token))
    }

    /// A client on an open connection (one made with this token, or an operator's).
    pub fn new(bus: Bus, token: impl Into<String>) -> Client {
        Client { bus, token: token.into(), retry: Retry::default() }
    }

    /// The same connection acting with another token (the connection keeps the permissions it
    /// was admitted with).
    pub fn with_token(&self, token: impl Into<String>) -> Client {
        Client { bus: self.bus.clone(), token: token.into(), retry: self.retry }
    }

    /// This client with another retry policy.
    pub fn with_retry(mut self, retry: Retry) -> Client {
        self.retry = retry;
        self
    }

    /// The connection.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The token the client acts with.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Sends `body` to `subject`, retrying as the policy says.
    async fn call<Req: Contract, Rep: ReplyContract>(&self, subject: &str, body: &Req) -> Result<Rep, WireError> {
        let mut attempt = 1;
        loop {
            let error = match self.bus.request(subject, body).await {
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
        let request = SubmitRequest { op_id, token: self.token.clone(), op };
        self.call(subject::KERNEL_SUBMIT.subject, &request).await
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
            let request =
                SubmitBatchRequest { token: self.token.clone(), ops: todo.iter().map(|&i| items[i].clone()).collect() };
            let reply: SubmitBatchReply = self.call(subject::KERNEL_SUBMIT_BATCH.subject, &request).await?;
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
        self.call(subject::KERNEL_AGENT_GET.subject, &AgentGetRequest { token: self.token.clone(), agent }).await
    }

    /// A page of agents (`limit` at most 1000), after `after`.
    pub async fn agents(
        &self,
        filter: &AgentFilter,
        after: Option<AgentId>,
        limit: u32,
    ) -> Result<AgentListReply, WireError> {
        let request =
            AgentListRequest { token: self.token.clone(), parent: filter.parent, state: filter.state, after, limit };
        self.call(subject::KERNEL_AGENT_LIST.subject, &request).await
    }

    /// Where the sequencer stands: lease holder, log head, state hash, standbys (the token
    /// needs `read` on `agent:*`).
    pub async fn status(&self) -> Result<StatusReply, WireError> {
        self.call(subject::KERNEL_STATUS.subject, &StatusRequest { token: self.token.clone() }).await
    }

    /// One task.
    pub async fn task(&self, task: TaskId) -> Result<TaskView, WireError> {
        self.call(subject::KERNEL_TASK_GET.subject, &TaskGetRequest { token: self.token.clone(), task }).await
    }

    /// A page of tasks (`limit` at most 1000), after `after`.
    pub async fn tasks(
        &self,
        filter: &TaskFilter,
        after: Option<TaskId>,
        limit: u32,
    ) -> Result<TaskListReply, WireError> {
        let request = TaskListRequest {
            token: self.token.clone(),
            agent: filter.agent,
            queue: filter.queue.clone(),
            state: filter.state,
            after,
            limit,
        };
        self.call(subject::KERNEL_TASK_LIST.subject, &request).await
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
