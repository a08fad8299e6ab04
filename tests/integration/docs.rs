//! The documentation states what the code does: every subject, every operation's required
//! capability and every error code appear in `ARCHITECTURE.md` exactly as the code has them.

use std::path::Path;

use toka_contract::op::{Requirement, Resource};
use toka_contract::spec::{AgentSpec, TaskSpec};
use toka_contract::subject;
use toka_contract::wire::ErrorCode;
use toka_contract::{AgentId, Operation, TaskId};

fn read(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name)).unwrap()
}

#[test]
fn architecture_lists_every_subject() {
    let doc = read("ARCHITECTURE.md");
    for e in subject::ENDPOINTS {
        let row = format!("| `{}` |", e.subject);
        assert!(doc.contains(&row), "ARCHITECTURE.md has no row for {}", e.subject);
    }
    assert!(doc.contains(&format!("| `{}` |", subject::AUTH_HEARTBEAT)));
    let forwarded = subject::auth_rotate_at("<instance>");
    assert!(doc.contains(&format!("| `{forwarded}` |")));
    assert!(doc.contains(&format!("`{}`", subject::AUTH_EVENTS)));
    assert!(doc.contains(&format!("| `{}.<log>.<category>.<name>.<entity>` |", subject::EVENTS_ROOT)));
    assert!(doc.contains(&format!("| `{}.<log>.<category>.<name>.<entity>` |", subject::LIVE_ROOT)));
    assert!(doc.contains(subject::EVENTS_STREAM) && doc.contains(subject::AUDIT_STREAM));
    // And no subject row that the code does not know.
    let events = |l: &str| l.starts_with("| `toka.evt.") || l.starts_with("| `toka.live.");
    let rows = doc.lines().filter(|l| l.starts_with("| `toka.") && !events(l));
    for row in rows {
        let s = row.split('`').nth(1).unwrap();
        assert!(
            subject::ENDPOINTS.iter().any(|e| e.subject == s) || s == subject::AUTH_HEARTBEAT || s == forwarded,
            "ARCHITECTURE.md lists unknown subject {s}"
        );
    }
}

/// One sample of each operation type (two for spawn: root and child).
fn samples() -> Vec<(String, Operation)> {
    let agent = AgentId::mint(1_000, 1, 0);
    let task = TaskId::mint(1_000, 2, 0);
    let queue = "q".parse().unwrap();
    let spec = |parent| AgentSpec { name: "a".parse().unwrap(), parent, limits: Default::default() };
    let ops = vec![
        Operation::SpawnAgent(spec(None)),
        Operation::SpawnAgent(spec(Some(agent))),
        Operation::SuspendAgent { agent, reason: String::new() },
        Operation::ResumeAgent { agent },
        Operation::TerminateAgent { agent, reason: String::new() },
        Operation::ScheduleTask(TaskSpec {
            agent,
            queue: "q".parse().unwrap(),
            payload: String::new(),
            priority: 0,
            timeouts: Default::default(),
            retry: Default::default(),
        }),
        Operation::ClaimTask { queue, worker: "w".into() },
        Operation::HeartbeatTask { task, attempt: 1 },
        Operation::CompleteTask { task, attempt: 1, result: String::new() },
        Operation::FailTask { task, attempt: 1, error: "e".into(), retryable: true },
        Operation::CancelTask { task, reason: String::new() },
        Operation::EmitObservation { agent, kind: "k".parse().unwrap(), body: String::new() },
        Operation::ReportMemory { agent, bytes: 1 },
        Operation::ReportCpu { agent, millicores: 1 },
        Operation::ReportIo { agent, read_bytes: 1, write_bytes: 1, ops: 1 },
        Operation::Tick { max_fired: None },
    ];
    ops.into_iter()
        .map(|op| {
            let key = match &op {
                Operation::SpawnAgent(s) if s.parent.is_none() => "`agent.spawn` (root)".to_owned(),
                Operation::SpawnAgent(_) => "`agent.spawn` (child)".to_owned(),
                other => format!("`{}`", other.type_name()),
            };
            (key, op)
        })
        .collect()
}

#[test]
fn architecture_capability_table_matches_operation_requirements() {
    let doc = read("ARCHITECTURE.md");
    let samples = samples();
    let mut types: Vec<&str> = samples.iter().map(|(_, op)| op.type_name()).collect();
    types.dedup();
    assert_eq!(types, Operation::TYPES, "a sample per operation type, in order");
    for (key, op) in &samples {
        let (action, on) = match op.requirement() {
            Requirement::SequencerOnly => ("sequencer only".to_owned(), "refused from every client"),
            Requirement::Capability(action, resource) => {
                let on = match resource {
                    Resource::Root => "`agent:*`",
                    Resource::Agent(_) if matches!(op, Operation::SpawnAgent(_)) => "`agent:<parent>`",
                    Resource::Agent(_) => "`agent:<agent>`",
                    Resource::Queue(_) => "`task:<queue>`",
                    Resource::QueueOf(_) => "`task:<queue of the task>`",
                    Resource::OwnerOf(_) => "`agent:<owner of the task>`",
                };
                (format!("`{action}`"), on)
            }
        };
        let row = format!("| {key} | {action} | {on} |");
        assert!(doc.contains(&row), "ARCHITECTURE.md lacks the row\n{row}");
    }
}

#[test]
fn architecture_error_table_matches_the_codes() {
    let doc = read("ARCHITECTURE.md");
    for code in ErrorCode::ALL {
        let row = format!("| `{}` | {} |", code.as_str(), code.status());
        assert!(doc.contains(&row), "ARCHITECTURE.md lacks the error row starting {row}");
    }
}

#[test]
fn architecture_lists_every_action_in_the_grammar() {
    let doc = read("ARCHITECTURE.md");
    let grammar = doc.split("action  :=").nth(1).unwrap().split("```").next().unwrap();
    let listed: Vec<&str> = grammar.split(['|', ' ', '\n']).filter(|w| !w.is_empty()).collect();
    let actions: Vec<&str> = toka_contract::Action::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(listed, actions);
}

#[test]
fn architecture_lists_every_nats_user() {
    let doc = read("ARCHITECTURE.md");
    for role in toka_contract::access::Role::ALL {
        assert!(
            doc.contains(&format!("\n| {} |", role.name())),
            "ARCHITECTURE.md has no row for the {} user",
            role.name()
        );
    }
}
