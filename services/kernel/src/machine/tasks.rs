//! Tasks: schedule into a queue, claim (highest priority, then earliest ready, then oldest),
//! heartbeat, complete, fail (retry after the backoff or park when the attempts are used up),
//! cancel, and the deadlines a tick fires in `(due, task, kind)` order.

use std::collections::BTreeMap;

use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::spec::{QueueName, TaskSpec};
use toka_contract::{Event, TaskId};

use super::{Ctx, Deadline, Error, ReadyKey, State, Task};

impl State {
    pub(super) fn schedule(&mut self, spec: &TaskSpec, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        self.running_agent(spec.agent)?;
        let id = TaskId::mint(ctx.time_us, ctx.seq, 0);
        let (t, r) = (spec.timeouts, spec.retry);
        self.tasks.insert(
            id,
            Task {
                agent: spec.agent,
                queue: spec.queue.clone(),
                priority: spec.priority,
                payload: spec.payload.clone(),
                schedule_to_start_us: t.schedule_to_start_us,
                start_to_close_us: t.start_to_close_us,
                heartbeat_us: t.heartbeat_us,
                max_attempts: r.max_attempts.max(1),
                initial_backoff_us: r.initial_backoff_us,
                backoff_multiplier_pct: r.backoff_multiplier_pct,
                max_backoff_us: r.max_backoff_us,
                state: TaskState::Scheduled,
                attempt: 0,
                ready_at_us: ctx.time_us,
                claimed_by: None,
                worker: String::new(),
                deadlines: BTreeMap::new(),
                last_error: String::new(),
                result: String::new(),
                scheduled_seq: ctx.seq,
                scheduled_at_us: ctx.time_us,
            },
        );
        if let Some(agent) = self.agents.get_mut(&spec.agent) {
            agent.open_tasks.insert(id);
        }
        if let Some(d) = t.schedule_to_start_us {
            self.set_deadline(id, Deadline::ScheduleToStart, ctx.time_us.saturating_add(d));
        }
        self.make_ready(id);
        Ok(vec![Event::TaskScheduled {
            task: id,
            agent: spec.agent,
            queue: spec.queue.clone(),
            priority: spec.priority,
        }])
    }

    pub(super) fn claim(&mut self, queue: &QueueName, worker: &str, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        let now = ctx.time_us;
        let key = self
            .ready
            .get(queue)
            .and_then(|ready| ready.iter().find(|k| k.ready_at_us <= now).copied())
            .ok_or_else(|| Error::EmptyQueue(queue.clone()))?;
        let id = key.task;
        self.unready(id);
        self.clear_deadline(id, Deadline::ScheduleToStart);
        let Some(task) = self.tasks.get_mut(&id) else { return Err(Error::TaskNotFound(id)) };
        task.state = TaskState::Claimed;
        task.attempt += 1;
        task.claimed_by = Some(ctx.principal.clone());
        task.worker = worker.to_owned();
        let (attempt, s2c, hb) = (task.attempt, task.start_to_close_us, task.heartbeat_us);
        if let Some(d) = s2c {
            self.set_deadline(id, Deadline::StartToClose, now.saturating_add(d));
        }
        if let Some(d) = hb {
            self.set_deadline(id, Deadline::Heartbeat, now.saturating_add(d));
        }
        Ok(vec![Event::TaskClaimed { task: id, attempt, principal: ctx.principal.clone(), worker: worker.to_owned() }])
    }

    /// The task, which `ctx.principal` must hold claimed at `attempt`.
    pub(super) fn held_task(&self, id: TaskId, attempt: u32, ctx: &Ctx<'_>) -> Result<&Task, Error> {
        let task = self.task(id)?;
        if task.state != TaskState::Claimed {
            return Err(Error::TaskNotClaimed { task: id, state: task.state });
        }
        if task.claimed_by.as_ref() != Some(ctx.principal) {
            return Err(Error::ClaimedBySomeoneElse(id));
        }
        if task.attempt != attempt {
            return Err(Error::StaleAttempt { task: id, given: attempt, current: task.attempt });
        }
        Ok(task)
    }

    pub(super) fn heartbeat(&mut self, id: TaskId, attempt: u32, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        if let Some(d) = self.held_task(id, attempt, ctx)?.heartbeat_us {
            self.set_deadline(id, Deadline::Heartbeat, ctx.time_us.saturating_add(d));
        }
        Ok(Vec::new())
    }

    pub(super) fn complete(
        &mut self,
        id: TaskId,
        attempt: u32,
        result: &str,
        ctx: &Ctx<'_>,
    ) -> Result<Vec<Event>, Error> {
        self.held_task(id, attempt, ctx)?;
        self.finish(id, TaskState::Completed);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.result = result.to_owned();
        }
        Ok(vec![Event::TaskCompleted { task: id, attempt }])
    }

    pub(super) fn fail(
        &mut self,
        id: TaskId,
        attempt: u32,
        error: &str,
        retryable: bool,
        ctx: &Ctx<'_>,
    ) -> Result<Vec<Event>, Error> {
        self.held_task(id, attempt, ctx)?;
        if let Some(task) = self.tasks.get_mut(&id) {
            task.last_error = error.to_owned();
        }
        if !retryable {
            self.finish(id, TaskState::Failed);
            return Ok(vec![Event::TaskFailed { task: id, attempt, error: error.to_owned(), retry_at_us: None }]);
        }
        Ok(self.after_failed_attempt(id, ctx.time_us, |retry_at_us| Event::TaskFailed {
            task: id,
            attempt,
            error: error.to_owned(),
            retry_at_us,
        }))
    }

    /// A claimed attempt failed or timed out: retry after the backoff, or park the task when
    /// it has used its attempts. `event` builds the failure event given the retry time.
    pub(super) fn after_failed_attempt(
        &mut self,
        id: TaskId,
        now: u64,
        event: impl FnOnce(Option<u64>) -> Event,
    ) -> Vec<Event> {
        let Some(task) = self.tasks.get(&id) else { return Vec::new() };
        let (attempt, reason) = (task.attempt, task.last_error.clone());
        if attempt >= task.max_attempts {
            self.finish(id, TaskState::Parked);
            return vec![event(None), Event::TaskParked { task: id, attempts: attempt, reason }];
        }
        let policy = toka_contract::spec::RetryPolicy {
            max_attempts: task.max_attempts,
            initial_backoff_us: task.initial_backoff_us,
            backoff_multiplier_pct: task.backoff_multiplier_pct,
            max_backoff_us: task.max_backoff_us,
        };
        let retry_at = now.saturating_add(policy.backoff_us(attempt));
        let s2s = task.schedule_to_start_us;
        self.clear_deadline(id, Deadline::StartToClose);
        self.clear_deadline(id, Deadline::Heartbeat);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.state = TaskState::Scheduled;
            task.claimed_by = None;
            task.worker.clear();
            task.ready_at_us = retry_at;
        }
        if let Some(d) = s2s {
            self.set_deadline(id, Deadline::ScheduleToStart, retry_at.saturating_add(d));
        }
        self.make_ready(id);
        vec![event(Some(retry_at))]
    }

    pub(super) fn cancel(&mut self, id: TaskId, reason: &str) -> Result<Vec<Event>, Error> {
        let task = self.task(id)?;
        if !matches!(task.state, TaskState::Scheduled | TaskState::Claimed) {
            return Err(Error::TaskFinished { task: id, state: task.state });
        }
        self.finish(id, TaskState::Cancelled);
        Ok(vec![Event::TaskCancelled { task: id, reason: reason.to_owned() }])
    }

    /// Fires the deadlines due by `now`, in firing order, at most `max_fired` of them.
    pub(super) fn tick(&mut self, now: u64, max_fired: Option<u32>) -> Vec<Event> {
        let mut events = Vec::new();
        let mut left = max_fired.unwrap_or(u32::MAX);
        while let Some(&(due, id, which)) = self.deadlines.get_min() {
            if due > now || left == 0 {
                break;
            }
            left -= 1;
            self.clear_deadline(id, which);
            let Some(task) = self.tasks.get(&id) else { continue };
            let attempt = task.attempt;
            let timeout = which.kind();
            if let Some(task) = self.tasks.get_mut(&id) {
                task.last_error = format!("{} timeout", which.kind().as_str());
            }
            match which {
                Deadline::ScheduleToStart => {
                    self.finish(id, TaskState::TimedOut);
                    events.push(Event::TaskTimedOut { task: id, attempt, timeout, retry_at_us: None });
                }
                Deadline::StartToClose | Deadline::Heartbeat => {
                    events.extend(self.after_failed_attempt(id, now, |retry_at_us| Event::TaskTimedOut {
                        task: id,
                        attempt,
                        timeout,
                        retry_at_us,
                    }));
                }
            }
        }
        events
    }

    /// Moves a task to a final state and out of every index.
    pub(super) fn finish(&mut self, id: TaskId, state: TaskState) {
        self.unready(id);
        let Some(task) = self.tasks.get_mut(&id) else { return };
        task.state = state;
        let owner = task.agent;
        let running: Vec<(Deadline, u64)> = std::mem::take(&mut task.deadlines).into_iter().collect();
        for (which, due) in running {
            self.deadlines.remove(&(due, id, which));
        }
        if let Some(agent) = self.agents.get_mut(&owner) {
            agent.open_tasks.remove(&id);
        }
    }

    /// Puts a scheduled task in its queue's ready set if its owner is running.
    pub(super) fn make_ready(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else { return };
        let owner_running = self.agents.get(&task.agent).is_some_and(|a| a.state == AgentState::Running);
        if task.state == TaskState::Scheduled && owner_running {
            let key = ReadyKey { inverse_priority: u8::MAX - task.priority, ready_at_us: task.ready_at_us, task: id };
            self.ready.entry(task.queue.clone()).or_default().insert(key);
        }
    }

    /// Takes a task out of its queue's ready set, if it is there.
    pub(super) fn unready(&mut self, id: TaskId) {
        let Some(task) = self.tasks.get(&id) else { return };
        let key = ReadyKey { inverse_priority: u8::MAX - task.priority, ready_at_us: task.ready_at_us, task: id };
        if let Some(ready) = self.ready.get_mut(&task.queue) {
            ready.remove(&key);
            if ready.is_empty() {
                self.ready.remove(&task.queue);
            }
        }
    }

    pub(super) fn set_deadline(&mut self, id: TaskId, which: Deadline, due: u64) {
        self.clear_deadline(id, which);
        if let Some(task) = self.tasks.get_mut(&id) {
            task.deadlines.insert(which, due);
            self.deadlines.insert((due, id, which));
        }
    }

    pub(super) fn clear_deadline(&mut self, id: TaskId, which: Deadline) {
        if let Some(due) = self.tasks.get_mut(&id).and_then(|t| t.deadlines.remove(&which)) {
            self.deadlines.remove(&(due, id, which));
        }
    }
}
