//! The revocations, folded out of the audit log: every replica that has read the same log holds
//! the same set and the same epoch (how many revocations ever), and a revocation written by one
//! reaches the others by reading.
//!
//! A revocation stays in force until the revoked token has expired (and the leeway passed), when
//! auth knew its expiry, else until the longest token lifetime has passed since it was made: by
//! then every token it could concern has expired. Revoking a `jti` revokes its descendants,
//! because verifiers check every `jti` of a token's chain.

use std::collections::BTreeMap;
use std::sync::Arc;

use toka_contract::api::auth::{Revocation, RevocationsReply};
use toka_contract::spec::Principal;
use toka_contract::{Event, TokenId};
use toka_runtime::audit::{Entry, Events, Fold};

/// The revocation set and its epoch.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    epoch: u64,
    /// Each revoked token: when it was first revoked, and until when the revocation holds.
    revoked: BTreeMap<TokenId, (u64, u64)>,
    /// How long a revocation of a token of unknown expiry stays in force, in microseconds.
    ttl_us: u64,
    /// How long past a token's expiry verifiers still take it, in microseconds.
    leeway_us: u64,
}

impl Fold for Revocations {
    const REPLAY: Option<&'static str> = Some("auth.token_revoked");

    fn apply(&mut self, event: &Event, time_us: u64) {
        if let Event::TokenRevoked { jti, epoch, expires_at_us, .. } = event {
            self.epoch = self.epoch.max(*epoch);
            let until = match expires_at_us {
                Some(exp) => exp.saturating_add(self.leeway_us),
                None => time_us.saturating_add(self.ttl_us),
            };
            // A token revoked again keeps the time of its first revocation.
            self.revoked.entry(*jti).or_insert((time_us, until));
        }
    }
}

impl Revocations {
    /// No revocations; each will stay in force until its token's expiry and `leeway_us`, or
    /// for `ttl_us` (the longest token lifetime and the leeway) when that is unknown.
    pub fn new(ttl_us: u64, leeway_us: u64) -> Self {
        Revocations { epoch: 0, revoked: BTreeMap::new(), ttl_us, leeway_us }
    }

    /// Revocations ever made.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether `jti` itself is revoked (callers check every link of a chain).
    pub fn is_revoked(&self, jti: &TokenId) -> bool {
        self.revoked.contains_key(jti)
    }

    /// The revocations in force at `now_us` after `after` in `jti` order, at most `limit`, with
    /// the epoch and where the next page starts; forgets the ones past their time.
    pub fn in_force(&mut self, now_us: u64, after: Option<TokenId>, limit: usize) -> RevocationsReply {
        self.revoked.retain(|_, (_, until)| *until > now_us);
        let from = match after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut page = self.revoked.range((from, std::ops::Bound::Unbounded));
        let revoked: Vec<Revocation> = page
            .by_ref()
            .take(limit.max(1))
            .map(|(jti, (at, until))| Revocation { jti: *jti, revoked_at_us: *at, expires_at_us: *until })
            .collect();
        let next = page.next().and(revoked.last().map(|r| r.jti));
        RevocationsReply { epoch: self.epoch, revoked, next }
    }
}

/// The audit entry revoking `jti`, which expires at `expires_at_us` where that is known: its
/// event's epoch is the one after the log's, fixed when the record is sealed.
pub fn entry(principal: Principal, jti: TokenId, reason: String, expires_at_us: Option<u64>) -> Entry<Revocations> {
    Entry {
        principal,
        action: "token.revoke",
        resource: format!("token:{jti}"),
        events: Events::Sealed(Arc::new(move |revocations: &Revocations| {
            vec![Event::TokenRevoked { jti, epoch: revocations.epoch + 1, reason: reason.clone(), expires_at_us }]
        })),
    }
}

/// The epoch a committed revocation's event carries.
pub fn epoch_of(events: &[Event]) -> Option<u64> {
    events.iter().find_map(|e| match e {
        Event::TokenRevoked { epoch, .. } => Some(*epoch),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use toka_contract::OpId;
    use toka_runtime::audit::memory::MemoryAuditLog;
    use toka_runtime::audit::{Ledger, Observer, Settings};

    use super::*;

    fn revoked(jti: u128, epoch: u64) -> Event {
        Event::TokenRevoked { jti: TokenId::from_u128(jti), epoch, reason: String::new(), expires_at_us: None }
    }

    #[test]
    fn the_epoch_counts_every_revocation_and_the_first_time_counts() {
        let mut r = Revocations::new(100, 5);
        r.apply(&revoked(1, 1), 1_000);
        r.apply(&revoked(2, 2), 1_050);
        r.apply(&revoked(1, 3), 1_060);
        r.apply(&Event::KeyRotated { kid: "k2".into(), previous_kid: None, retire_at_us: None }, 1_070);
        assert_eq!(r.epoch(), 3);
        assert!(r.is_revoked(&TokenId::from_u128(1)) && !r.is_revoked(&TokenId::from_u128(3)));
        let reply = r.in_force(1_099, None, 10);
        assert_eq!(
            reply.revoked,
            [
                Revocation { jti: TokenId::from_u128(1), revoked_at_us: 1_000, expires_at_us: 1_100 },
                Revocation { jti: TokenId::from_u128(2), revoked_at_us: 1_050, expires_at_us: 1_150 },
            ]
        );
        // At its expiry a revocation leaves the set; the epoch stays.
        let reply = r.in_force(1_100, None, 10);
        assert_eq!((reply.epoch, reply.revoked.len()), (3, 1));
        assert!(!r.is_revoked(&TokenId::from_u128(1)));
    }

    #[test]
    fn a_revocation_whose_token_expiry_is_known_is_dropped_after_it() {
        let mut r = Revocations::new(1_000_000, 5);
        let known = Event::TokenRevoked {
            jti: TokenId::from_u128(1),
            epoch: 1,
            reason: String::new(),
            expires_at_us: Some(2_000),
        };
        r.apply(&known, 1_000);
        r.apply(&revoked(2, 2), 1_000);
        let until = |r: &mut Revocations, now| {
            r.in_force(now, None, 10).revoked.iter().map(|x| x.expires_at_us).collect::<Vec<_>>()
        };
        assert_eq!(until(&mut r, 2_004), [2_005, 1_001_000], "the expiry and the leeway; the longest lifetime");
        assert_eq!(until(&mut r, 2_005), [1_001_000], "gone once its token can no longer verify");
        assert_eq!(r.epoch(), 2);
    }

    #[test]
    fn the_set_is_read_in_pages_in_jti_order() {
        let mut r = Revocations::new(1_000, 5);
        for jti in [5, 1, 4, 2, 3] {
            r.apply(&revoked(jti, jti as u64), 10);
        }
        let jtis = |reply: &RevocationsReply| reply.revoked.iter().map(|r| r.jti).collect::<Vec<_>>();
        let ids = |ids: &[u128]| ids.iter().map(|i| TokenId::from_u128(*i)).collect::<Vec<_>>();
        let first = r.in_force(20, None, 2);
        assert_eq!((jtis(&first), first.next, first.epoch), (ids(&[1, 2]), Some(TokenId::from_u128(2)), 5));
        let second = r.in_force(20, first.next, 2);
        assert_eq!((jtis(&second), second.next), (ids(&[3, 4]), Some(TokenId::from_u128(4))));
        let last = r.in_force(20, second.next, 2);
        assert_eq!((jtis(&last), last.next), (ids(&[5]), None), "the last page says there is no next");
        let whole = r.in_force(20, None, 5);
        assert_eq!((whole.revoked.len(), whole.next), (5, None), "a page that ends the set exactly has no next");
    }

    /// Two replicas revoking through one log get consecutive epochs and end with one set.
    #[tokio::test(start_paused = true)]
    async fn replicas_sharing_the_log_fold_the_same_revocations() {
        let log = MemoryAuditLog::new();
        let settings = Settings { interval: Duration::from_millis(100), commit_timeout: Duration::from_secs(2) };
        let quiet: Observer = Arc::new(|_: &Event| {});
        let start = || Ledger::start(log.clone(), settings.clone(), Revocations::new(1_000_000_000, 5), quiet.clone());
        let (a, b) = (start().await.unwrap(), start().await.unwrap());
        let admin: Principal = "admin".parse().unwrap();
        let first = a.record(entry(admin.clone(), TokenId::from_u128(1), "leaked".into(), None)).await.unwrap();
        let second = b.record(entry(admin.clone(), TokenId::from_u128(2), "lost".into(), None)).await.unwrap();
        let third = a.record(entry(admin, TokenId::from_u128(3), String::new(), None)).await.unwrap();
        assert_eq!(
            [epoch_of(&first.events), epoch_of(&second.events), epoch_of(&third.events)],
            [Some(1), Some(2), Some(3)]
        );
        b.tail();
        tokio::time::sleep(Duration::from_millis(1)).await;
        let now = toka_runtime::now_us();
        assert_eq!(a.fold_mut(|r| r.in_force(now, None, 10)), b.fold_mut(|r| r.in_force(now, None, 10)));
        assert_eq!(a.fold(Revocations::epoch), 3);
        // A replica started later reads them back from the log.
        log.append_foreign(OpId::from_u128(9), vec![revoked(4, 4)]);
        let c = start().await.unwrap();
        assert_eq!(c.fold(|r| (r.epoch(), r.is_revoked(&TokenId::from_u128(2)))), (4, true));
    }
}
