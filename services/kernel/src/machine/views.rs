//! What queries and the sequencer read from the state: views of agents and tasks, payloads,
//! capability checks with descent resolved against the tree, ids in order.

use toka_contract::api::kernel::{AgentView, ResourceUsage, TaskView};
use toka_contract::capability::Target;
use toka_contract::{AgentId, Capability, TaskId};

use super::{State, Tree};

impl State {
    /// The agent as queries show it.
    pub fn agent_view(&self, id: AgentId) -> Option<AgentView> {
        let a = self.agents.get(&id)?;
        Some(AgentView {
            agent: id,
            name: a.name.clone(),
            parent: a.parent,
            state: a.state,
            children: u32::try_from(a.children.len()).unwrap_or(u32::MAX),
            limits: toka_contract::spec::ResourceLimits {
                memory_bytes: a.memory_limit,
                cpu_millicores: a.cpu_limit,
                io_bytes: a.io_limit,
            },
            usage: ResourceUsage {
                memory_bytes: a.memory_bytes,
                cpu_millicores: a.cpu_millicores,
                io_bytes: a.io_bytes,
            },
            observations: a.observations,
            spawned_seq: a.spawned_seq,
            spawned_at_us: a.spawned_at_us,
        })
    }

    /// The task as queries show it.
    pub fn task_view(&self, id: TaskId) -> Option<TaskView> {
        let t = self.tasks.get(&id)?;
        Some(TaskView {
            task: id,
            agent: t.agent,
            queue: t.queue.clone(),
            priority: t.priority,
            state: t.state,
            attempt: t.attempt,
            max_attempts: t.max_attempts,
            claimed_by: t.claimed_by.clone(),
            deadline_us: t.deadlines.values().min().copied(),
            last_error: t.last_error.clone(),
            scheduled_seq: t.scheduled_seq,
            scheduled_at_us: t.scheduled_at_us,
        })
    }

    /// The opaque payload of a task, for the worker that claims it.
    pub fn task_payload(&self, id: TaskId) -> Option<&str> {
        self.tasks.get(&id).map(|t| t.payload.as_str())
    }

    /// Whether `caps` allow `action` on `target`, descendant patterns resolved against the tree
    /// (queries check reads with it).
    pub fn permits(&self, caps: &[Capability], action: toka_contract::Action, target: Target<'_>) -> bool {
        toka_contract::capability::allows(caps, action, target, &Tree(&self.agents))
    }

    /// Of `caps`, the one that covers `pattern` with the most actions (descent resolved against
    /// the tree): what a spawned agent's token is delegated from.
    pub fn widest_covering<'c>(
        &self,
        caps: &'c [Capability],
        pattern: &toka_contract::capability::Pattern,
    ) -> Option<&'c Capability> {
        caps.iter().filter(|c| c.resource.covers(pattern, &Tree(&self.agents))).max_by_key(|c| c.actions.iter().count())
    }

    /// Every agent id, in order.
    pub fn agent_ids(&self) -> impl Iterator<Item = AgentId> + '_ {
        self.agents.keys().copied()
    }

    /// Every task id, in order.
    pub fn task_ids(&self) -> impl Iterator<Item = TaskId> + '_ {
        self.tasks.keys().copied()
    }
}
