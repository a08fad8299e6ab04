//! The worker loop: claim tasks from a queue, heartbeat while working, complete or fail them,
//! all through `toka.kernel.v1.submit` with the worker's token.
//!
//! [`Worker::run`] is the loop most workers want: claim (backing off while the queue is
//! empty), run the handler with heartbeats at the interval given, complete on `Ok`, fail on
//! `Err` (retryable or not, as the handler says), until the stop future resolves. The pieces
//! ([`Worker::claim`], [`Worker::heartbeat`], [`Worker::complete`], [`Worker::fail`]) are
//! there for workers that need another shape.

use std::future::Future;
use std::time::Duration;

use toka_contract::api::kernel::SubmitReply;
use toka_contract::event::Event;
use toka_contract::spec::QueueName;
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Operation, TaskId};

use crate::Client;

/// A claimed task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The task.
    pub task: TaskId,
    /// The attempt this claim is for (pass it back on heartbeat, complete and fail).
    pub attempt: u32,
    /// What to do.
    pub payload: String,
}

/// Why a handler could not finish a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What went wrong.
    pub error: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
}

/// A worker on one queue.
#[derive(Debug, Clone)]
pub struct Worker {
    client: Client,
    queue: QueueName,
    label: String,
}

impl Worker {
    /// A worker claiming from `queue` as `client`, whose token needs `claim`, `heartbeat`,
    /// `complete` and `fail` on `task:<queue>`; `label` names the process for humans.
    pub fn new(client: Client, queue: QueueName, label: String) -> Worker {
        Worker { client, queue, label }
    }

    async fn submit(&self, op: Operation) -> Result<SubmitReply, WireError> {
        self.client.submit(op).await
    }

    /// Claims the next ready task, or `None` when the queue has none.
    pub async fn claim(&self) -> Result<Option<Claimed>, WireError> {
        let op = Operation::ClaimTask { queue: self.queue.clone(), worker: self.label.clone() };
        match self.submit(op).await {
            Ok(reply) => match reply.events.first() {
                Some(Event::TaskClaimed { task, attempt, .. }) => Ok(Some(Claimed {
                    task: *task,
                    attempt: *attempt,
                    payload: reply.task_payload.unwrap_or_default(),
                })),
                other => Err(WireError::new(ErrorCode::Internal, format!("a claim produced {other:?}"))),
            },
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Tells the kernel the claim's worker is alive.
    pub async fn heartbeat(&self, claimed: &Claimed) -> Result<(), WireError> {
        self.submit(Operation::HeartbeatTask { task: claimed.task, attempt: claimed.attempt }).await.map(|_| ())
    }

    /// Completes the task with `result`.
    pub async fn complete(&self, claimed: &Claimed, result: String) -> Result<(), WireError> {
        self.submit(Operation::CompleteTask { task: claimed.task, attempt: claimed.attempt, result }).await.map(|_| ())
    }

    /// Fails the attempt.
    pub async fn fail(&self, claimed: &Claimed, failure: Failure) -> Result<(), WireError> {
        let op = Operation::FailTask {
            task: claimed.task,
            attempt: claimed.attempt,
            error: failure.error,
            retryable: failure.retryable,
        };
        self.submit(op).await.map(|_| ())
    }

    /// Claims and handles tasks until `stop` resolves; heartbeats every `heartbeat` while a
    /// handler runs. Returns how many tasks it finished (completed or failed).
    pub async fn run<F, Fut>(&self, heartbeat: Duration, handler: F, stop: impl Future<Output = ()>) -> u64
    where
        F: Fn(Claimed) -> Fut,
        Fut: Future<Output = Result<String, Failure>>,
    {
        let mut stop = std::pin::pin!(stop);
        let mut idle = Duration::from_millis(20);
        let mut finished = 0;
        loop {
            let claimed = tokio::select! {
                _ = stop.as_mut() => return finished,
                claimed = self.claim() => claimed,
            };
            let claimed = match claimed {
                Ok(Some(claimed)) => claimed,
                Ok(None) | Err(_) => {
                    if let Err(e) = &claimed {
                        tracing::warn!(error = %e, "claim failed");
                    }
                    tokio::select! {
                        _ = stop.as_mut() => return finished,
                        _ = tokio::time::sleep(idle) => {}
                    }
                    idle = (idle * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            idle = Duration::from_millis(20);
            let work = handler(claimed.clone());
            let mut work = std::pin::pin!(work);
            let mut beat = tokio::time::interval(heartbeat);
            beat.tick().await;
            let outcome = loop {
                tokio::select! {
                    outcome = work.as_mut() => break outcome,
                    _ = beat.tick() => {
                        if let Err(e) = self.heartbeat(&claimed).await {
                            tracing::warn!(task = %claimed.task, error = %e, "heartbeat refused");
                        }
                    }
                }
            };
            let reported = match outcome {
                Ok(result) => self.complete(&claimed, result).await,
                Err(failure) => self.fail(&claimed, failure).await,
            };
            match reported {
                Ok(()) => finished += 1,
                Err(e) => tracing::warn!(task = %claimed.task, error = %e, "outcome refused"),
            }
        }
    }
}
