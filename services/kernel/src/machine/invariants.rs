//! The state's internal invariants, checked by the tests after every operation (a walk of the
//! whole state: the service does not run it).

use toka_contract::api::kernel::{AgentState, TaskState};

use super::State;

impl State {
    /// Checks every internal invariant; `Err` names the first that fails. Tests run it after
    /// every operation; it walks the whole state, so the service does not.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut indexed_ready = 0;
        for (queue, ready) in &self.ready {
            if ready.is_empty() {
                return Err(format!("empty ready set kept for {queue}"));
            }
            for key in ready {
                let t = self.tasks.get(&key.task).ok_or(format!("ready task {} unknown", key.task))?;
                if t.state != TaskState::Scheduled || &t.queue != queue || t.ready_at_us != key.ready_at_us {
                    return Err(format!("ready index wrong for task {}", key.task));
                }
                indexed_ready += 1;
            }
        }
        let mut expected_ready = 0;
        let mut deadlines = 0;
        for (id, t) in &self.tasks {
            let owner = self.agents.get(&t.agent).ok_or(format!("task {id} has no owner"))?;
            let open = matches!(t.state, TaskState::Scheduled | TaskState::Claimed);
            if open != owner.open_tasks.contains(id) {
                return Err(format!("open-task index wrong for task {id} ({:?})", t.state));
            }
            if open && owner.state == AgentState::Terminated {
                return Err(format!("task {id} open under terminated agent {}", t.agent));
            }
            if t.state == TaskState::Scheduled && owner.state == AgentState::Running {
                expected_ready += 1;
            }
            if t.attempt > t.max_attempts {
                return Err(format!("task {id} on attempt {} of {}", t.attempt, t.max_attempts));
            }
            if (t.state == TaskState::Claimed && t.claimed_by.is_none())
                || (t.state == TaskState::Scheduled && t.claimed_by.is_some())
            {
                return Err(format!("task {id} claim holder does not match its state"));
            }
            if !open && !t.deadlines.is_empty() {
                return Err(format!("finished task {id} keeps deadlines"));
            }
            for (which, due) in &t.deadlines {
                if !self.deadlines.contains(&(*due, *id, *which)) {
                    return Err(format!("deadline of task {id} missing from the index"));
                }
                deadlines += 1;
            }
        }
        if indexed_ready != expected_ready {
            return Err(format!("{indexed_ready} tasks ready, {expected_ready} expected"));
        }
        if deadlines != self.deadlines.len() {
            return Err("deadline index holds unknown deadlines".into());
        }
        for (id, a) in &self.agents {
            if let Some(parent) = a.parent {
                let p = self.agents.get(&parent).ok_or(format!("agent {id} has unknown parent"))?;
                if !p.children.contains(id) {
                    return Err(format!("agent {id} missing from its parent's children"));
                }
                if p.state == AgentState::Terminated && a.state != AgentState::Terminated {
                    return Err(format!("agent {id} is {:?} under terminated parent {parent}", a.state));
                }
            }
        }
        if self.recent.len() != self.recent_order.len() {
            return Err("idempotency index out of step".into());
        }
        Ok(())
    }
}
