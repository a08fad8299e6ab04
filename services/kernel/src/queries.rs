//! The queries (`agent.get`, `agent.list`, `task.get`, `task.list`): answered from the state,
//! paged in id order, filtered to what the caller's capabilities may `read` (an agent, or a
//! task's agent or queue).

use toka_contract::api::kernel::{
    AgentGetRequest, AgentListReply, AgentListRequest, AgentView, TaskGetRequest, TaskListReply, TaskListRequest,
    TaskView,
};
use toka_contract::capability::Target;
use toka_contract::wire::{ErrorCode, WireError};
use toka_contract::{Action, Capability};

use crate::machine::State;

fn not_found(what: String) -> WireError {
    WireError::new(ErrorCode::NotFound, format!("{what} does not exist"))
}

fn forbidden(what: String) -> WireError {
    WireError::new(ErrorCode::Forbidden, format!("no capability allows read on {what}"))
}

fn page_limit(limit: u32) -> usize {
    limit.clamp(1, toka_contract::api::MAX_PAGE) as usize
}

fn readable_task(state: &State, caps: &[Capability], view: &TaskView) -> bool {
    state.permits(caps, Action::Read, Target::Agent(view.agent))
        || state.permits(caps, Action::Read, Target::Queue(&view.queue))
}

pub(crate) fn agent_get(state: &State, caps: &[Capability], req: &AgentGetRequest) -> Result<AgentView, WireError> {
    let view = state.agent_view(req.agent).ok_or_else(|| not_found(format!("agent {}", req.agent)))?;
    if !state.permits(caps, Action::Read, Target::Agent(req.agent)) {
        return Err(forbidden(format!("agent:{}", req.agent)));
    }
    Ok(view)
}

pub(crate) fn agent_list(state: &State, caps: &[Capability], req: &AgentListRequest) -> AgentListReply {
    let limit = page_limit(req.limit);
    let mut agents = Vec::new();
    let mut next_after = None;
    let ids = state.agent_ids().filter(|id| req.after.is_none_or(|after| *id > after));
    for id in ids {
        let Some(view) = state.agent_view(id) else { continue };
        let wanted = req.parent.is_none_or(|p| view.parent == Some(p)) && req.state.is_none_or(|s| view.state == s);
        if !wanted || !state.permits(caps, Action::Read, Target::Agent(id)) {
            continue;
        }
        if agents.len() == limit {
            next_after = agents.last().map(|v: &AgentView| v.agent);
            break;
        }
        agents.push(view);
    }
    AgentListReply { agents, next_after }
}

pub(crate) fn task_get(state: &State, caps: &[Capability], req: &TaskGetRequest) -> Result<TaskView, WireError> {
    let view = state.task_view(req.task).ok_or_else(|| not_found(format!("task {}", req.task)))?;
    if !readable_task(state, caps, &view) {
        return Err(forbidden(format!("task {}", req.task)));
    }
    Ok(view)
}

pub(crate) fn task_list(state: &State, caps: &[Capability], req: &TaskListRequest) -> TaskListReply {
    let limit = page_limit(req.limit);
    let mut tasks = Vec::new();
    let mut next_after = None;
    for id in state.task_ids().filter(|id| req.after.is_none_or(|after| *id > after)) {
        let Some(view) = state.task_view(id) else { continue };
        let wanted = req.agent.is_none_or(|a| view.agent == a)
            && req.queue.as_ref().is_none_or(|q| view.queue == *q)
            && req.state.is_none_or(|s| view.state == s);
        if !wanted || !readable_task(state, caps, &view) {
            continue;
        }
        if tasks.len() == limit {
            next_after = tasks.last().map(|v: &TaskView| v.task);
            break;
        }
        tasks.push(view);
    }
    TaskListReply { tasks, next_after }
}
