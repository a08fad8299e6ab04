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

#[cfg(test)]
mod tests {
    use toka_contract::api::kernel::TaskState;
    use toka_contract::spec::{AgentSpec, TaskSpec};
    use toka_contract::{AgentId, OpId, Operation, Pattern, TaskId};

    use super::*;
    use crate::machine::{Authority, Ctx, Outcome};

    /// A root agent with two children, each child with a task on its own queue.
    fn state() -> (State, AgentId, [AgentId; 2], [TaskId; 2]) {
        let mut state = State::new(100);
        let operator = "operator".parse().unwrap();
        let mut apply = |op: Operation| {
            let seq = state.last_seq() + 1;
            let ctx = Ctx {
                seq,
                time_us: 1_000 + seq,
                op_id: OpId::from_u128(seq.into()),
                principal: &operator,
                authority: Authority::Replay,
            };
            match state.apply(&op, &ctx).unwrap() {
                Outcome::Applied(events) => events[0].entity().unwrap(),
                other => panic!("{other:?}"),
            }
        };
        let spawn = |parent| {
            Operation::SpawnAgent(AgentSpec { name: "a".parse().unwrap(), parent, limits: Default::default() })
        };
        let root: AgentId = apply(spawn(None)).parse().unwrap();
        let children: [AgentId; 2] =
            [apply(spawn(Some(root))).parse().unwrap(), apply(spawn(Some(root))).parse().unwrap()];
        let task = |agent, queue: &str| {
            let spec = TaskSpec {
                agent,
                queue: queue.parse().unwrap(),
                payload: String::new(),
                priority: 1,
                timeouts: Default::default(),
                retry: Default::default(),
            };
            Operation::ScheduleTask(spec)
        };
        let tasks =
            [apply(task(children[0], "red")).parse().unwrap(), apply(task(children[1], "blue")).parse().unwrap()];
        (state, root, children, tasks)
    }

    fn read(pattern: Pattern) -> Vec<Capability> {
        vec![Capability::new(pattern, &[Action::Read])]
    }

    fn list(state: &State, caps: &[Capability], after: Option<AgentId>, limit: u32) -> (Vec<AgentId>, Option<AgentId>) {
        let req = AgentListRequest { token: String::new(), parent: None, state: None, after, limit };
        let reply = agent_list(state, caps, &req);
        (reply.agents.iter().map(|a| a.agent).collect(), reply.next_after)
    }

    #[test]
    fn lists_page_in_id_order_and_say_where_the_next_page_starts() {
        let (state, root, children, _) = state();
        let all = read(Pattern::AnyAgent);
        assert_eq!(list(&state, &all, None, 2), (vec![root, children[0]], Some(children[0])));
        assert_eq!(list(&state, &all, Some(children[0]), 2), (vec![children[1]], None));
        assert_eq!(
            list(&state, &all, None, 3),
            (vec![root, children[0], children[1]], None),
            "an exact page has no next"
        );
        assert_eq!(list(&state, &all, None, 0).0.len(), 1, "a page holds at least one");
    }

    #[test]
    fn a_caller_sees_only_what_it_may_read() {
        let (state, root, children, tasks) = state();
        let subtree = read(Pattern::Subtree(children[0]));
        assert_eq!(list(&state, &subtree, None, 10).0, [children[0]], "its subtree only");
        let get = |agent| agent_get(&state, &subtree, &AgentGetRequest { token: String::new(), agent });
        assert_eq!(get(root).unwrap_err().code, ErrorCode::Forbidden);
        assert_eq!(get(AgentId::mint(1, 99, 0)).unwrap_err().code, ErrorCode::NotFound, "unknown before forbidden");
        assert_eq!(get(children[0]).unwrap().agent, children[0]);
        // A task is readable through its agent or its queue.
        let task = |caps: &[Capability], id| {
            task_get(&state, caps, &TaskGetRequest { token: String::new(), task: id }).map(|v| v.task)
        };
        assert_eq!(task(&subtree, tasks[0]), Ok(tasks[0]));
        assert_eq!(task(&subtree, tasks[1]).unwrap_err().code, ErrorCode::Forbidden);
        let blue = read(Pattern::Queue("blue".parse().unwrap()));
        assert_eq!(task(&blue, tasks[1]), Ok(tasks[1]));
        let by_queue = TaskListRequest {
            token: String::new(),
            agent: None,
            queue: None,
            state: Some(TaskState::Scheduled),
            after: None,
            limit: 10,
        };
        assert_eq!(task_list(&state, &blue, &by_queue).tasks.iter().map(|t| t.task).collect::<Vec<_>>(), [tasks[1]]);
        let of_child =
            AgentListRequest { token: String::new(), parent: Some(root), state: None, after: None, limit: 10 };
        assert_eq!(agent_list(&state, &read(Pattern::AnyAgent), &of_child).agents.len(), 2, "filtered by parent");
    }
}
