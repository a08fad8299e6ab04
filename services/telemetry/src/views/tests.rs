//! The views folded from a real kernel log (the kernel's replay fixture, written by its
//! sequencer) and from small hand-made sequences.

use toka_contract::api::kernel::{AgentState, TaskState};
use toka_contract::spec::QueueName;
use toka_contract::{AgentId, Event, KernelRecord, TaskId};

use super::Views;

fn fixture() -> Vec<KernelRecord> {
    include_str!("../../../kernel/fixtures/kernel-log-v1.jsonl")
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn fold(records: &[KernelRecord]) -> Views {
    let mut views = Views::default();
    for record in records {
        for (idx, event) in record.events.iter().enumerate() {
            assert!(views.apply(record.seq, idx as u16, record.time_us, event));
        }
    }
    views
}

fn q(name: &str) -> QueueName {
    name.parse().unwrap()
}

#[test]
fn a_kernel_log_folds_to_the_fleet_it_describes() {
    let views = fold(&fixture());
    // root runs; planner and helper were terminated by the cascade.
    assert_eq!(
        views.agents_by_state().into_iter().collect::<Vec<_>>(),
        [(AgentState::Running, 1), (AgentState::Suspended, 0), (AgentState::Terminated, 2)]
    );
    let tasks: Vec<_> = views.tasks_by_queue_and_state().into_iter().collect();
    assert_eq!(
        tasks,
        [
            ((q("beat"), TaskState::Parked), 1),
            ((q("later"), TaskState::Cancelled), 2),
            ((q("slow"), TaskState::Parked), 1),
            ((q("unclaimed"), TaskState::TimedOut), 1),
            ((q("work"), TaskState::Completed), 2),
            ((q("work"), TaskState::Cancelled), 1),
        ]
    );
    assert!(views.ready_by_queue().values().all(|n| *n == 0));
    // Timeouts: schedule-to-start once, start-to-close twice, heartbeat once; retried: the
    // first start-to-close timeout and the retryable failure.
    assert_eq!((views.timeouts(), views.retries()), (4, 2));
    assert_eq!((views.schedule_to_claim().count, views.claim_to_complete().count), (6, 2));
    assert_eq!(views.last(), Some((33, 3)));
}

#[test]
fn redelivered_events_change_nothing() {
    let records = fixture();
    let once = fold(&records);
    let mut twice = fold(&records);
    for record in &records[10..] {
        for (idx, event) in record.events.iter().enumerate() {
            assert!(!twice.apply(record.seq, idx as u16, record.time_us, event), "{} {idx}", record.seq);
        }
    }
    assert_eq!(twice, once);
    // Folding in two halves, as after a restart that resumes from the last event, agrees.
    let mut halves = fold(&records[..17]);
    for record in &records[12..] {
        for (idx, event) in record.events.iter().enumerate() {
            halves.apply(record.seq, idx as u16, record.time_us, event);
        }
    }
    assert_eq!(halves, once);
}

#[test]
fn ready_tasks_follow_their_owner_and_the_oldest_wait_is_measured_from_when_they_became_ready() {
    let agent = AgentId::mint(1_000, 1, 0);
    let (t1, t2) = (TaskId::mint(1_000_000, 2, 0), TaskId::mint(2_000_000, 3, 0));
    let mut views = Views::default();
    let mut seq = 0;
    let mut apply = |views: &mut Views, time_us: u64, event: Event| {
        seq += 1;
        assert!(views.apply(seq, 0, time_us, &event));
    };
    apply(
        &mut views,
        0,
        Event::AgentSpawned { agent, name: "a".parse().unwrap(), parent: None, limits: Default::default() },
    );
    for (task, at) in [(t1, 1_000_000), (t2, 2_000_000)] {
        apply(&mut views, at, Event::TaskScheduled { task, agent, queue: q("jobs"), priority: 0 });
    }
    assert_eq!(views.ready_by_queue()[&q("jobs")], 2);
    assert_eq!(views.oldest_ready_seconds(5_000_000)[&q("jobs")], 4.0);
    apply(&mut views, 3_000_000, Event::AgentSuspended { agent, reason: String::new() });
    assert_eq!((views.ready_by_queue()[&q("jobs")], views.oldest_ready_seconds(5_000_000)[&q("jobs")]), (0, 0.0));
    apply(&mut views, 4_000_000, Event::AgentResumed { agent });
    let claim = Event::TaskClaimed { task: t1, attempt: 1, principal: "w".parse().unwrap(), worker: "w".into() };
    apply(&mut views, 4_500_000, claim);
    assert_eq!(views.ready_by_queue()[&q("jobs")], 1);
    assert_eq!(views.oldest_ready_seconds(5_000_000)[&q("jobs")], 3.0);
    // Waited 3.5 s: counted in the 5-s bucket and every bucket above it.
    let h = views.schedule_to_claim();
    assert_eq!((h.count, h.sum), (1, 3.5));
    let five = super::SECONDS_BUCKETS.iter().position(|bound| *bound == 5.0).unwrap();
    let mut only_five = [0; super::SECONDS_BUCKETS.len()];
    only_five[five] = 1;
    assert_eq!(h.buckets, only_five);
    // A failed attempt retried: scheduled again, waiting from the retry time.
    apply(
        &mut views,
        5_000_000,
        Event::TaskFailed { task: t1, attempt: 1, error: "x".into(), retry_at_us: Some(6_000_000) },
    );
    assert_eq!((views.retries(), views.ready_by_queue()[&q("jobs")]), (1, 2));
    assert_eq!(views.oldest_ready_seconds(7_000_000)[&q("jobs")], 5.0, "t2, ready since 2 s");
}

#[test]
fn the_audit_log_folds_to_tokens_by_kind_and_denials_by_action_once_each() {
    use super::{AuditViews, Fold as _};
    let denied = |action: &str, count| Event::AccessDenied {
        principal: "unverified".parse().unwrap(),
        action: action.into(),
        resource: "token".into(),
        reason: "bad signature".into(),
        count,
    };
    let jti = toka_contract::TokenId::from_u128(7);
    let events = [
        Event::KeyRotated { kid: "k1".into(), previous_kid: None, retire_at_us: None },
        Event::TokenIssued { jti, sub: "op".parse().unwrap(), capabilities: vec![], expires_at_us: 9 },
        denied("kernel.submit", 3),
        denied("token.delegate", 2),
        denied("kernel.submit", 1),
        Event::TokenRevoked { jti, epoch: 1, reason: String::new(), expires_at_us: Some(9) },
    ];
    let mut audit = AuditViews::default();
    for (seq, event) in events.iter().enumerate() {
        assert!(audit.fold(seq as u64 + 1, 0, 1_000 * seq as u64, event));
    }
    // Redelivered: nothing changes.
    assert!(!audit.fold(3, 0, 2_000, &events[2]));
    assert_eq!(audit.tokens(), [("issued", 1), ("delegated", 0), ("revoked", 1)]);
    assert_eq!(
        audit.denials().iter().map(|(a, n)| (a.as_str(), *n)).collect::<Vec<_>>(),
        [("kernel.submit", 4), ("token.delegate", 2)]
    );
    assert_eq!((audit.last_rotation_us(), audit.last()), (Some(0), Some((6, 0))));
}
