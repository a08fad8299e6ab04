//! Agents: spawn into the tree, suspend and resume (their tasks leave and rejoin their queues),
//! terminate (the subtree in pre-order, each agent's open tasks cancelled first), observations
//! and resource reports (a crossed limit raises `resource.error`).

use imbl::OrdSet;
use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::event::ResourceKind;
use toka_contract::spec::{AgentSpec, ObservationKind};
use toka_contract::{AgentId, Event, TaskId};

use super::{Agent, Ctx, Error, State};

/// The agents a terminate reaches, in pre-order, each with its open tasks.
pub(super) type Cascade = Vec<(AgentId, Vec<TaskId>)>;

impl State {
    pub(super) fn spawn(&mut self, spec: &AgentSpec, ctx: &Ctx<'_>) -> Result<Vec<Event>, Error> {
        if let Some(parent) = spec.parent {
            self.running_agent(parent)?;
        }
        let id = AgentId::mint(ctx.time_us, ctx.seq, 0);
        let limits = spec.limits;
        self.agents.insert(
            id,
            Agent {
                name: spec.name.clone(),
                parent: spec.parent,
                children: OrdSet::new(),
                state: AgentState::Running,
                memory_limit: limits.memory_bytes,
                cpu_limit: limits.cpu_millicores,
                io_limit: limits.io_bytes,
                memory_bytes: 0,
                cpu_millicores: 0,
                io_bytes: 0,
                observations: 0,
                open_tasks: OrdSet::new(),
                spawned_seq: ctx.seq,
                spawned_at_us: ctx.time_us,
            },
        );
        if let Some(parent) = spec.parent.and_then(|p| self.agents.get_mut(&p)) {
            parent.children.insert(id);
        }
        Ok(vec![Event::AgentSpawned { agent: id, name: spec.name.clone(), parent: spec.parent, limits }])
    }

    pub(super) fn suspend(&mut self, id: AgentId, reason: &str) -> Result<Vec<Event>, Error> {
        let open: Vec<TaskId> = self.running_agent(id)?.open_tasks.iter().copied().collect();
        self.set_agent_state(id, AgentState::Suspended);
        for task in open {
            self.unready(task);
        }
        Ok(vec![Event::AgentSuspended { agent: id, reason: reason.to_owned() }])
    }

    pub(super) fn resume(&mut self, id: AgentId) -> Result<Vec<Event>, Error> {
        let agent = self.live_agent(id)?;
        if agent.state != AgentState::Suspended {
            return Err(Error::AgentNotSuspended(id));
        }
        let open: Vec<TaskId> = agent.open_tasks.iter().copied().collect();
        self.set_agent_state(id, AgentState::Running);
        for task in open {
            self.make_ready(task);
        }
        Ok(vec![Event::AgentResumed { agent: id }])
    }

    pub(super) fn terminate(&mut self, id: AgentId, reason: &str) -> Result<Vec<Event>, Error> {
        let (cascade, events) = self.terminate_plan(id, reason)?;
        for (agent, open) in cascade {
            for task in open {
                self.finish(task, TaskState::Cancelled);
            }
            self.set_agent_state(agent, AgentState::Terminated);
        }
        Ok(events)
    }

    /// What terminating `id` does, computed without changing anything: each agent of the
    /// subtree still alive, in pre-order, with its open tasks; and the events.
    pub(super) fn terminate_plan(&self, id: AgentId, reason: &str) -> Result<(Cascade, Vec<Event>), Error> {
        self.live_agent(id)?;
        // The subtree in pre-order; terminated descendants have terminated subtrees already.
        let mut order = Vec::new();
        let mut stack = vec![id];
        while let Some(at) = stack.pop() {
            let Some(agent) = self.agents.get(&at) else { continue };
            if agent.state == AgentState::Terminated {
                continue;
            }
            order.push(at);
            stack.extend(agent.children.iter().rev().copied());
        }
        let mut events = Vec::new();
        let mut cascade = Vec::with_capacity(order.len());
        for agent in order {
            let open: Vec<TaskId> =
                self.agents.get(&agent).map(|a| a.open_tasks.iter().copied().collect()).unwrap_or_default();
            for &task in &open {
                events.push(Event::TaskCancelled { task, reason: format!("owner {agent} terminated") });
            }
            let cascade_from = (agent != id).then_some(id);
            events.push(Event::AgentTerminated { agent, cascade_from, reason: reason.to_owned() });
            cascade.push((agent, open));
        }
        Ok((cascade, events))
    }

    pub(super) fn set_agent_state(&mut self, id: AgentId, state: AgentState) {
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.state = state;
        }
    }

    pub(super) fn observe(&mut self, id: AgentId, kind: &ObservationKind, body: &str) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        if let Some(agent) = self.agents.get_mut(&id) {
            agent.observations += 1;
        }
        Ok(vec![Event::ObservationEmitted { agent: id, kind: kind.clone(), body: body.to_owned() }])
    }

    /// A gauge report (memory held, CPU in use): set the usage, flag a crossed limit.
    pub(super) fn report(&mut self, id: AgentId, resource: ResourceKind, amount: u64) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        let Some(agent) = self.agents.get_mut(&id) else { return Err(Error::AgentNotFound(id)) };
        let (event, limit) = if resource == ResourceKind::Memory {
            agent.memory_bytes = amount;
            (Event::MemoryAllocated { agent: id, bytes: amount }, agent.memory_limit)
        } else {
            agent.cpu_millicores = amount;
            (Event::CpuUtilization { agent: id, millicores: amount }, agent.cpu_limit)
        };
        let mut events = vec![event];
        if let Some(limit) = limit.filter(|&l| amount > l) {
            events.push(Event::ResourceError { agent: id, resource, used: amount, limit });
        }
        Ok(events)
    }

    pub(super) fn report_io(
        &mut self,
        id: AgentId,
        read_bytes: u64,
        write_bytes: u64,
        ops: u64,
    ) -> Result<Vec<Event>, Error> {
        self.live_agent(id)?;
        let Some(agent) = self.agents.get_mut(&id) else { return Err(Error::AgentNotFound(id)) };
        agent.io_bytes = agent.io_bytes.saturating_add(read_bytes).saturating_add(write_bytes);
        let total_bytes = agent.io_bytes;
        let mut events = vec![Event::IoOperation { agent: id, read_bytes, write_bytes, ops, total_bytes }];
        if let Some(limit) = agent.io_limit.filter(|&l| total_bytes > l) {
            events.push(Event::ResourceError { agent: id, resource: ResourceKind::Io, used: total_bytes, limit });
        }
        Ok(events)
    }
}
