//! The fleet as the kernel log's committed events describe it: agents and tasks by state, queue
//! depths, how long tasks wait and run, retries and timeouts.
//!
//! [`Views::apply`] folds one event; it does no I/O, reads no clock and iterates only ordered
//! maps, so the same events in the same order always give the same views. Events are taken in
//! log order, each once: an event at or before the last one applied (a redelivery) is skipped,
//! which makes the views exact under at-least-once delivery. Time comes from the events (the
//! sequencer's time); only [`Views::oldest_ready_seconds`] compares it with a caller's `now`.

use std::collections::BTreeMap;

use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::spec::QueueName;
use toka_contract::{AgentId, Event, TaskId};

/// Upper bounds (seconds) of the wait and run histograms' buckets.
pub const SECONDS_BUCKETS: [f64; 12] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0];

/// A histogram of durations in seconds, with the buckets of [`SECONDS_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative).
    pub buckets: [u64; SECONDS_BUCKETS.len()],
    /// Every observation.
    pub count: u64,
    /// Their sum, in seconds.
    pub sum: f64,
}

impl Histogram {
    fn observe(&mut self, micros: u64) {
        let seconds = micros as f64 / 1e6;
        if let Some(i) = SECONDS_BUCKETS.iter().position(|bound| seconds <= *bound) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum += seconds;
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Task {
    agent: AgentId,
    queue: QueueName,
    state: TaskState,
    /// When it became claimable: scheduled, or set back after a failed attempt.
    waiting_since_us: u64,
    /// When its current attempt was claimed.
    claimed_at_us: u64,
}

/// The folded views.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Views {
    /// The last event applied: (record seq, index in the record).
    last: Option<(u64, u16)>,
    agents: BTreeMap<AgentId, AgentState>,
    tasks: BTreeMap<TaskId, Task>,
    retries: u64,
    timeouts: u64,
    schedule_to_claim: Histogram,
    claim_to_complete: Histogram,
}

impl Views {
    /// Folds event `idx` of record `seq`, recorded at `time_us`; `false` when it was applied
    /// before (at or before the last one), which changes nothing.
    pub fn apply(&mut self, seq: u64, idx: u16, time_us: u64, event: &Event) -> bool {
        if self.last.is_some_and(|last| (seq, idx) <= last) {
            return false;
        }
        self.last = Some((seq, idx));
        match event {
            Event::AgentSpawned { agent, .. } | Event::AgentResumed { agent } => {
                self.agents.insert(*agent, AgentState::Running);
            }
            Event::AgentSuspended { agent, .. } => {
                self.agents.insert(*agent, AgentState::Suspended);
            }
            Event::AgentTerminated { agent, .. } => {
                self.agents.insert(*agent, AgentState::Terminated);
            }
            Event::TaskScheduled { task, agent, queue, .. } => {
                let task_view = Task {
                    agent: *agent,
                    queue: queue.clone(),
                    state: TaskState::Scheduled,
                    waiting_since_us: time_us,
                    claimed_at_us: 0,
                };
                self.tasks.insert(*task, task_view);
            }
            Event::TaskClaimed { task, .. } => {
                if let Some(t) = self.tasks.get_mut(task) {
                    t.state = TaskState::Claimed;
                    t.claimed_at_us = time_us;
                    self.schedule_to_claim.observe(time_us.saturating_sub(t.waiting_since_us));
                }
            }
            Event::TaskCompleted { task, .. } => {
                if let Some(t) = self.tasks.get_mut(task) {
                    t.state = TaskState::Completed;
                    self.claim_to_complete.observe(time_us.saturating_sub(t.claimed_at_us));
                }
            }
            Event::TaskFailed { task, retry_at_us, .. } => self.after_attempt(*task, *retry_at_us, TaskState::Failed),
            Event::TaskTimedOut { task, retry_at_us, .. } => {
                self.timeouts += 1;
                self.after_attempt(*task, *retry_at_us, TaskState::TimedOut);
            }
            Event::TaskCancelled { task, .. } => self.set_task_state(*task, TaskState::Cancelled),
            Event::TaskParked { task, .. } => self.set_task_state(*task, TaskState::Parked),
            _ => {}
        }
        true
    }

    /// A failed or timed-out attempt: back to its queue when it is retried (it waits from the
    /// retry time), else `final_state` (a `task.parked` that follows sets it aside).
    fn after_attempt(&mut self, task: TaskId, retry_at_us: Option<u64>, final_state: TaskState) {
        let Some(t) = self.tasks.get_mut(&task) else { return };
        match retry_at_us {
            Some(at) => {
                self.retries += 1;
                t.state = TaskState::Scheduled;
                t.waiting_since_us = at;
            }
            None => t.state = final_state,
        }
    }

    fn set_task_state(&mut self, task: TaskId, state: TaskState) {
        if let Some(t) = self.tasks.get_mut(&task) {
            t.state = state;
        }
    }

    /// The last event applied, as (record seq, index), if any.
    pub fn last(&self) -> Option<(u64, u16)> {
        self.last
    }

    /// Agents in each state (every state listed, zeros included).
    pub fn agents_by_state(&self) -> BTreeMap<AgentState, u64> {
        let mut counts: BTreeMap<AgentState, u64> =
            [AgentState::Running, AgentState::Suspended, AgentState::Terminated].into_iter().map(|s| (s, 0)).collect();
        for state in self.agents.values() {
            *counts.entry(*state).or_default() += 1;
        }
        counts
    }

    /// Tasks in each (queue, state), for the queues that have tasks.
    pub fn tasks_by_queue_and_state(&self) -> BTreeMap<(QueueName, TaskState), u64> {
        let mut counts = BTreeMap::new();
        for t in self.tasks.values() {
            *counts.entry((t.queue.clone(), t.state)).or_default() += 1;
        }
        counts
    }

    /// Tasks a worker could claim, per queue: scheduled, with a running owner (every queue
    /// that has tasks is listed).
    pub fn ready_by_queue(&self) -> BTreeMap<QueueName, u64> {
        let mut ready: BTreeMap<QueueName, u64> = BTreeMap::new();
        for t in self.tasks.values() {
            let n = ready.entry(t.queue.clone()).or_default();
            if self.is_ready(t) {
                *n += 1;
            }
        }
        ready
    }

    /// How long the oldest ready task of each queue has waited at `now_us` (0 without one).
    pub fn oldest_ready_seconds(&self, now_us: u64) -> BTreeMap<QueueName, f64> {
        let mut oldest: BTreeMap<QueueName, Option<u64>> = BTreeMap::new();
        for t in self.tasks.values() {
            let since = oldest.entry(t.queue.clone()).or_default();
            if self.is_ready(t) {
                *since = Some(since.map_or(t.waiting_since_us, |s| s.min(t.waiting_since_us)));
            }
        }
        oldest
            .into_iter()
            .map(|(queue, since)| (queue, since.map_or(0.0, |s| now_us.saturating_sub(s) as f64 / 1e6)))
            .collect()
    }

    fn is_ready(&self, t: &Task) -> bool {
        t.state == TaskState::Scheduled && self.agents.get(&t.agent) == Some(&AgentState::Running)
    }

    /// Attempts that failed or timed out and were retried.
    pub fn retries(&self) -> u64 {
        self.retries
    }

    /// Deadlines that fired (schedule-to-start, start-to-close, heartbeat).
    pub fn timeouts(&self) -> u64 {
        self.timeouts
    }

    /// From becoming claimable to being claimed.
    pub fn schedule_to_claim(&self) -> &Histogram {
        &self.schedule_to_claim
    }

    /// From being claimed to completing.
    pub fn claim_to_complete(&self) -> &Histogram {
        &self.claim_to_complete
    }
}

/// What a log's events fold into: [`Views`] for the kernel log, [`AuditViews`] for the audit log.
pub trait Fold: Send + 'static {
    /// Folds event `idx` of record `seq`, recorded at `time_us`; `false` when it was applied
    /// before, which changes nothing.
    fn fold(&mut self, seq: u64, idx: u16, time_us: u64, event: &Event) -> bool;
}

impl Fold for Views {
    fn fold(&mut self, seq: u64, idx: u16, time_us: u64, event: &Event) -> bool {
        self.apply(seq, idx, time_us, event)
    }
}

/// What the audit log says: tokens issued, delegated and revoked, denials by action, the last
/// key rotation. Deterministic and exact under redelivery, as [`Views`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuditViews {
    last: Option<(u64, u16)>,
    issued: u64,
    delegated: u64,
    revoked: u64,
    denials: BTreeMap<String, u64>,
    last_rotation_us: Option<u64>,
}

impl AuditViews {
    /// The last event applied, as (record seq, index), if any.
    pub fn last(&self) -> Option<(u64, u16)> {
        self.last
    }

    /// Tokens by kind: `issued`, `delegated`, `revoked`.
    pub fn tokens(&self) -> [(&'static str, u64); 3] {
        [("issued", self.issued), ("delegated", self.delegated), ("revoked", self.revoked)]
    }

    /// Refusals by action (`kernel.submit`, `token.delegate`, `connect`, ...), as the audit log
    /// aggregates them.
    pub fn denials(&self) -> &BTreeMap<String, u64> {
        &self.denials
    }

    /// When the signing key last changed (its first creation included), if the log says.
    pub fn last_rotation_us(&self) -> Option<u64> {
        self.last_rotation_us
    }
}

impl Fold for AuditViews {
    fn fold(&mut self, seq: u64, idx: u16, time_us: u64, event: &Event) -> bool {
        if self.last.is_some_and(|last| (seq, idx) <= last) {
            return false;
        }
        self.last = Some((seq, idx));
        match event {
            Event::TokenIssued { .. } => self.issued += 1,
            Event::TokenDelegated { .. } => self.delegated += 1,
            Event::TokenRevoked { .. } => self.revoked += 1,
            Event::AccessDenied { action, count, .. } => {
                *self.denials.entry(action.clone()).or_default() += u64::from(*count)
            }
            Event::KeyRotated { .. } => self.last_rotation_us = Some(time_us),
            _ => {}
        }
        true
    }
}

#[cfg(test)]
mod tests;
