//! The ledger against an in-memory log, on Tokio's paused clock: conflicts with other writers,
//! appends lost or landed unacknowledged, giving up, aggregated denials, and events sealed
//! from the fold.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};

use toka_contract::TokenId;

use super::memory::{Fault, MemoryAuditLog};
use super::*;

/// Folds revocation epochs, as auth does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Epoch(u64);

impl Fold for Epoch {
    const REPLAY: Option<&'static str> = Some("auth.token_revoked");

    fn apply(&mut self, event: &Event, _: u64) {
        if let Event::TokenRevoked { epoch, .. } = event {
            self.0 = self.0.max(*epoch);
        }
    }
}

fn settings() -> Settings {
    Settings { interval: Duration::from_millis(100), commit_timeout: Duration::from_secs(2) }
}

fn quiet() -> Observer {
    Arc::new(|_: &Event| {})
}

fn issued(n: u128) -> Event {
    Event::TokenIssued {
        jti: TokenId::from_u128(n),
        sub: "alice".parse().unwrap(),
        capabilities: Vec::new(),
        expires_at_us: 1,
    }
}

fn allowed<F>(n: u128) -> Entry<F> {
    Entry {
        principal: "admin".parse().unwrap(),
        action: "token.issue",
        resource: format!("token:{}", TokenId::from_u128(n)),
        events: Events::Fixed(vec![issued(n)]),
    }
}

fn revoke(n: u128) -> Entry<Epoch> {
    let jti = TokenId::from_u128(n);
    Entry {
        principal: "admin".parse().unwrap(),
        action: "token.revoke",
        resource: format!("token:{jti}"),
        events: Events::Sealed(Arc::new(move |fold: &Epoch| {
            vec![Event::TokenRevoked { jti, epoch: fold.0 + 1, reason: String::new(), expires_at_us: None }]
        })),
    }
}

fn revoked(jti: u128, epoch: u64) -> Event {
    Event::TokenRevoked { jti: TokenId::from_u128(jti), epoch, reason: String::new(), expires_at_us: None }
}

fn epochs(log: &MemoryAuditLog) -> Vec<u64> {
    log.records()
        .iter()
        .flat_map(|r| &r.events)
        .filter_map(|e| match e {
            Event::TokenRevoked { epoch, .. } => Some(*epoch),
            _ => None,
        })
        .collect()
}

fn assert_chained(log: &MemoryAuditLog) {
    toka_contract::record::verify_chain(&log.records(), 0, toka_contract::Hash::ZERO).unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_entry_is_answered_once_it_is_in_the_log() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), (), quiet()).await.unwrap();
    let committed = ledger.record(allowed(1)).await.unwrap();
    assert_eq!(committed, Committed { seq: 1, events: vec![issued(1)] });
    let records = log.records();
    assert_eq!(records.len(), 1);
    assert_eq!((records[0].op.action.as_str(), records[0].op.decision), ("token.issue", Decision::Allow));
    assert_eq!(ledger.head_seq(), 1);
    assert_chained(&log);
}

#[tokio::test(start_paused = true)]
async fn a_conflict_folds_in_what_another_writer_appended_and_seals_again_on_its_head() {
    let log = MemoryAuditLog::new();
    let seen = Arc::new(AtomicUsize::new(0));
    let observer: Observer = {
        let seen = seen.clone();
        Arc::new(move |_: &Event| {
            seen.fetch_add(1, Ordering::SeqCst);
        })
    };
    let ledger = Ledger::start(log.clone(), settings(), Epoch::default(), observer).await.unwrap();
    // Another replica revokes after this writer read the head.
    log.append_foreign(OpId::from_u128(77), vec![revoked(9, 1)]);
    let committed = ledger.record(revoke(1)).await.unwrap();
    assert_eq!(committed.seq, 2, "sealed again after the foreign record");
    assert_eq!(committed.events, vec![revoked(1, 2)], "its epoch counts the foreign revocation");
    assert_eq!(log.appends(), 2, "one refused append, one that landed");
    assert_eq!(epochs(&log), [1, 2]);
    assert_eq!(ledger.fold(|f| f.clone()), Epoch(2));
    assert_eq!(seen.load(Ordering::SeqCst), 2, "the observer saw the foreign event and ours");
    assert_chained(&log);
}

#[tokio::test(start_paused = true)]
async fn an_append_that_landed_without_an_answer_is_found_and_not_written_again() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), (), quiet()).await.unwrap();
    log.fail_next(&[Fault::Unacknowledged]);
    let committed = ledger.record(allowed(1)).await.unwrap();
    assert_eq!(committed, Committed { seq: 1, events: vec![issued(1)] });
    assert_eq!(log.records().len(), 1, "written once");
    assert_eq!(log.appends(), 1, "found by reading, not appended again");
    // The writer goes on from the record it found.
    assert_eq!(ledger.record(allowed(2)).await.unwrap().seq, 2);
    assert_chained(&log);
}

#[tokio::test(start_paused = true)]
async fn a_lost_append_is_retried_with_backoff_until_it_lands() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), (), quiet()).await.unwrap();
    log.fail_next(&[Fault::Lost, Fault::Lost, Fault::Lost]);
    let started = tokio::time::Instant::now();
    assert_eq!(ledger.record(allowed(1)).await.unwrap().seq, 1);
    assert_eq!(log.appends(), 4);
    // Backing off 20, 40 and 80 ms.
    assert_eq!(started.elapsed(), Duration::from_millis(140));
    assert_eq!(log.records().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_append_that_keeps_failing_is_given_up_at_the_commit_timeout() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), (), quiet()).await.unwrap();
    log.fail_next(&[Fault::Lost; 20]);
    let started = tokio::time::Instant::now();
    let refused = ledger.record(allowed(1)).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable, "{refused:?}");
    assert!(refused.message.starts_with("the audit log: "), "{}", refused.message);
    let waited = started.elapsed();
    assert!(waited <= settings().commit_timeout, "gave up after {waited:?}");
    assert!(waited >= Duration::from_millis(1_000), "kept trying for {waited:?}");
    assert!(log.records().is_empty());
    // Once storage is back, the next entry lands.
    log.fail_next(&[]);
    assert_eq!(ledger.record(allowed(2)).await.unwrap().seq, 1);
}

#[tokio::test(start_paused = true)]
async fn sealed_events_see_the_fold_after_every_record_before_them() {
    let log = MemoryAuditLog::new();
    log.append_foreign(OpId::from_u128(1), vec![revoked(100, 1)]);
    log.append_foreign(OpId::from_u128(2), vec![issued(5)]);
    // The fold starts from what the log holds.
    let ledger = Ledger::start(log.clone(), settings(), Epoch::default(), quiet()).await.unwrap();
    assert_eq!(ledger.fold(|f| f.0), 1);
    // Three revocations and an issue in one batch: each revocation counts the ones before it.
    let (a, b, c, d) = tokio::join!(
        ledger.record(revoke(1)),
        ledger.record(allowed(2)),
        ledger.record(revoke(3)),
        ledger.record(revoke(4))
    );
    assert_eq!((a.unwrap().seq, b.unwrap().seq, c.unwrap().seq, d.unwrap().seq), (3, 4, 5, 6));
    assert_eq!(log.appends(), 1, "one batch");
    assert_eq!(epochs(&log), [1, 2, 3, 4]);
    assert_eq!(ledger.fold(|f| f.0), 4);
    assert_chained(&log);
}

#[tokio::test(start_paused = true)]
async fn denials_are_written_once_an_interval_counted_per_principal_and_action() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), (), quiet()).await.unwrap();
    for _ in 0..50 {
        ledger.deny("mallory", "token.issue", "token:*", "bad signature");
    }
    for _ in 0..3 {
        ledger.deny("eve", "token.issue", "token:*", "expired");
    }
    ledger.deny("eve", "kernel.submit", "agent:*", "forbidden");
    tokio::time::sleep(settings().interval * 2).await;
    let records = log.records();
    let counts: Vec<(String, String, u32, Decision)> =
        records.iter().map(|r| (r.principal.to_string(), r.op.action.clone(), r.op.count, r.op.decision)).collect();
    assert_eq!(
        counts,
        [
            ("eve".into(), "kernel.submit".into(), 1, Decision::Deny),
            ("eve".into(), "token.issue".into(), 3, Decision::Deny),
            ("mallory".into(), "token.issue".into(), 50, Decision::Deny),
        ]
    );
    assert!(matches!(&records[2].events[..], [Event::AccessDenied { count: 50, .. }]));
    // A quiet interval writes nothing.
    tokio::time::sleep(settings().interval * 3).await;
    assert_eq!(log.records().len(), 3);
}

#[tokio::test(start_paused = true)]
async fn past_the_bucket_limit_new_principals_are_counted_as_overflow() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), (), quiet()).await.unwrap();
    for i in 0..MAX_DENIAL_BUCKETS + 5 {
        ledger.deny(&format!("p{i}"), "token.issue", "token:*", "expired");
    }
    ledger.close().await;
    let records = log.records();
    assert_eq!(records.len(), MAX_DENIAL_BUCKETS + 1);
    let overflow = records.iter().find(|r| r.principal.as_str() == "overflow").unwrap();
    assert_eq!(overflow.op.count, 5);
}

#[tokio::test(start_paused = true)]
async fn closing_writes_the_denials_still_owed() {
    let log = MemoryAuditLog::new();
    let ledger =
        Ledger::start(log.clone(), Settings { interval: Duration::from_secs(3_600), ..settings() }, (), quiet())
            .await
            .unwrap();
    ledger.deny("mallory", "token.issue", "token:*", "bad signature");
    ledger.close().await;
    assert_eq!(log.records().len(), 1);
    let refused = ledger.record(allowed(1)).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unavailable, "a closed writer takes nothing");
}

#[tokio::test(start_paused = true)]
async fn a_tail_reads_what_others_appended() {
    let log = MemoryAuditLog::new();
    let ledger = Ledger::start(log.clone(), settings(), Epoch::default(), quiet()).await.unwrap();
    for i in 0..3 {
        log.append_foreign(OpId::from_u128(i + 10), vec![revoked(i, i as u64 + 1)]);
    }
    ledger.tail();
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!((ledger.head_seq(), ledger.fold(|f| f.0)), (3, 3));
}
