//! The endpoints' logic: a submitted operation is verified, rate-limited and handed to the
//! sequencer, and answered once it is durable; a query runs on the state.

use std::sync::Arc;
use std::time::Duration;
use toka_contract::api::auth::{AgentTokenRequest, Claims, TokenReply};
use toka_contract::api::kernel::{
    StatusReply, StatusRequest, SubmitBatchReply, SubmitBatchRequest, SubmitReply, SubmitRequest,
};
use toka_contract::capability::{self, NoLineage, Target};
use toka_contract::wire::{ErrorCode, Reply, WireError};
use toka_contract::{AgentId, Capability, Event, OpId, Operation, subject};
use toka_runtime::audit::Ledger;
use toka_runtime::bus::Bus;
use toka_runtime::lease::Lease;
use toka_runtime::limit::Limits;
use toka_runtime::verifier::LiveVerifier;
use tokio::sync::{mpsc, oneshot};

use crate::machine::State;
use crate::sequencer::{self, Input};

/// What the endpoints share.
pub(crate) struct Kernel {
    pub(crate) bus: Bus,
    pub(crate) audit: Ledger<()>,
    pub(crate) verifier: LiveVerifier,
    pub(crate) limits: Limits,
    pub(crate) inputs: mpsc::Sender<Input>,
    pub(crate) agent_token_ttl_ms: u64,
    /// This instance's name in the lease.
    pub(crate) instance: String,
    /// The sequencer lease, shared with the task that renews it.
    pub(crate) lease: Arc<tokio::sync::Mutex<Lease>>,
}

fn unavailable(message: &str) -> WireError {
    WireError::new(ErrorCode::Unavailable, message).with_retry_after_ms(100)
}

impl Kernel {
    pub(crate) fn enqueue(&self, input: Input) -> Result<(), WireError> {
        self.inputs.try_send(input).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => unavailable("the kernel is at its queue limit"),
            mpsc::error::TrySendError::Closed(_) => unavailable("the kernel is stopping"),
        })
    }

    /// The claims of `token`. A token that does not verify is audited, and refused within the
    /// small `unverified` budget of the endpoint class, shared by every such request and apart
    /// from every root's: past it, `rate_limited`.
    pub(crate) async fn verified(&self, token: &str, class: &str) -> Result<Claims, WireError> {
        self.verifier.verify(token).await.map_err(|e| {
            if e.code != ErrorCode::Unauthorized {
                return e;
            }
            let endpoint = format!("kernel.{class}");
            self.audit.deny(UNVERIFIED, &endpoint, "token", &e.message);
            self.limits.refuse_within("unverified", &endpoint, e)
        })
    }

    /// The claims of `token`, within the rate limit of `class`.
    pub(crate) async fn caller(&self, token: &str, class: &str) -> Result<Claims, WireError> {
        let claims = self.verified(token, class).await?;
        self.limits.check(class, claims.root().as_str())?;
        Ok(claims)
    }

    /// Records a refused operation in the audit log (aggregated per principal and interval).
    pub(crate) fn audit_refusal(&self, claims: &Claims, op_type: &str, e: &WireError) {
        if e.code == ErrorCode::Forbidden {
            let resource = e.details.get("resource").and_then(|r| r.as_str()).unwrap_or("");
            self.audit.deny(claims.sub.as_str(), op_type, resource, &e.message);
        }
    }

    pub(crate) async fn submit_one(
        &self,
        claims: &Claims,
        op_id: OpId,
        op: Operation,
    ) -> Result<oneshot::Receiver<Result<sequencer::Applied, WireError>>, WireError> {
        let (reply, wait) = oneshot::channel();
        self.enqueue(Input::Submit { op_id, principal: claims.sub.clone(), caps: claims.caps.clone(), op, reply })?;
        Ok(wait)
    }

    pub(crate) async fn submit(&self, req: SubmitRequest) -> Result<SubmitReply, WireError> {
        let claims = self.caller(&req.token, "submit").await?;
        let op_type = req.op.type_name();
        let wait = self.submit_one(&claims, req.op_id, req.op).await?;
        let outcome = wait.await.map_err(|_| unavailable("the kernel is stopping"))?;
        self.reply(&req.token, &claims, op_type, outcome).await
    }

    /// The reply to a sequenced operation: a refusal is audited; a spawn gets the new agent's
    /// token, a claim the task's payload.
    pub(crate) async fn reply(
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
            (Some(Event::AgentSpawned { agent, .. }), Some(grant)) => Some((*agent, grant)),
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
    pub(crate) async fn agent_token(
        &self,
        token: &str,
        claims: &Claims,
        agent: AgentId,
        capability: Capability,
    ) -> Option<String> {
        let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        let left_ms = claims.exp.saturating_sub(now_s + 1).saturating_mul(1_000);
        let ttl_ms = left_ms.min(self.agent_token_ttl_ms);
        if ttl_ms < 1_000 {
            return None;
        }
        let request = AgentTokenRequest { token: token.to_owned(), agent, capabilities: vec![capability], ttl_ms };
        match self.bus.request::<_, TokenReply>(subject::AUTH_AGENT_TOKEN.subject, &request).await {
            Ok(reply) => Some(reply.token),
            Err(e) => {
                tracing::warn!(%agent, error = %e, "no token for the spawned agent");
                None
            }
        }
    }

    pub(crate) async fn submit_batch(&self, req: SubmitBatchRequest) -> Result<SubmitBatchReply, WireError> {
        // Verified once; each operation then takes its own place under the submit limit.
        let claims = self.verified(&req.token, "submit").await?;
        let mut waits = Vec::with_capacity(req.ops.len());
        for item in req.ops {
            let op_type = item.op.type_name();
            let queued = match self.limits.check("submit", claims.root().as_str()) {
                Ok(()) => self.submit_one(&claims, item.op_id, item.op).await,
                Err(e) => Err(e),
            };
            waits.push((op_type, queued));
        }
        // Answered together: the spawns' tokens are asked for at once, not one after another.
        let replies = waits.into_iter().map(|(op_type, wait)| async {
            let result = match wait {
                Ok(wait) => {
                    let outcome = wait.await.unwrap_or_else(|_| Err(unavailable("the kernel is stopping")));
                    self.reply(&req.token, &claims, op_type, outcome).await
                }
                Err(e) => Err(e),
            };
            Reply::from(result)
        });
        Ok(SubmitBatchReply { results: futures::future::join_all(replies).await })
    }

    /// Runs `f` on the state; the answer is released once what was applied before is durable.
    pub(crate) async fn query<T: Send + 'static>(
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

/// How long the status waits for kernel instances to answer the services API's ping.
const STANDBY_PING: Duration = Duration::from_millis(250);

impl Kernel {
    /// Where the sequencer stands: this instance, the lease holder, the durable head and the
    /// state hash there, the standbys (for tokens with `read` on `agent:*`).
    pub(crate) async fn status(&self, req: StatusRequest) -> Result<StatusReply, WireError> {
        let claims = self.caller(&req.token, "query").await?;
        if !capability::allows(&claims.caps, toka_contract::Action::Read, Target::Root, &NoLineage) {
            let e =
                WireError::new(ErrorCode::Forbidden, format!("token {} does not allow read on agent:*", claims.jti));
            self.audit.deny(claims.sub.as_str(), "kernel.status", "agent:*", &e.message);
            return Err(e);
        }
        // The state as of everything applied before this query, once that is durable; copied
        // in constant time and hashed off the sequencer's task.
        let (reply, wait) = oneshot::channel();
        self.enqueue(Input::Query(Box::new(move |state: &State| {
            let copy = state.clone();
            Box::new(move || {
                let _ = reply.send(copy);
            })
        })))?;
        let state = wait.await.map_err(|_| unavailable("the kernel is rebuilding its state"))?;
        let head_seq = state.last_seq();
        let state_hash = tokio::task::spawn_blocking(move || state.hash())
            .await
            .map_err(|e| WireError::new(ErrorCode::Internal, e.to_string()))?
            .map_err(|e| WireError::new(ErrorCode::Internal, format!("the state does not hash: {e}")))?;
        let lease_holder = self.lease.lock().await.holder().await;
        Ok(StatusReply {
            instance: self.instance.clone(),
            lease_holder,
            head_seq,
            state_hash,
            standbys: self.standbys().await,
        })
    }

    /// Kernel instances besides this one that answer the services API's ping.
    async fn standbys(&self) -> u32 {
        use futures::StreamExt as _;
        let client = self.bus.client();
        let inbox = client.new_inbox();
        let Ok(mut answers) = client.subscribe(inbox.clone()).await else { return 0 };
        let ping = format!("$SRV.PING.{}", toka_contract::subject::service::KERNEL);
        if client.publish_with_reply(ping, inbox, "".into()).await.is_err() {
            return 0;
        }
        let deadline = tokio::time::Instant::now() + STANDBY_PING;
        let mut instances = 0u32;
        while let Ok(Some(_)) = tokio::time::timeout_at(deadline, answers.next()).await {
            instances += 1;
        }
        instances.saturating_sub(1)
    }
}
