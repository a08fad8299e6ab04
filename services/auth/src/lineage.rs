//! What auth reads from the logs to decide a delegation or a revocation: where an agent sits in
//! the tree (the kernel log's `agent.spawned`), and which token a token was delegated from (the
//! audit log's `auth.token_delegated`). Only durable facts count, so a caller cannot claim a
//! descent the kernel never recorded, nor an ancestry auth never delegated.
//!
//! Both are walks up a tree, one lookup a step, bounded in steps. The lookups go through
//! [`Lookups`]: [`Bus`] asks storage; tests answer from memory.

use std::collections::BTreeMap;
use std::future::Future;

use toka_contract::api::storage::{QueryReply, QueryRequest};
use toka_contract::capability::{Capability, Lineage, Pattern};
use toka_contract::record::LogName;
use toka_contract::wire::WireError;
use toka_contract::{AgentId, Event, TokenId, subject};
use toka_runtime::bus::Bus;

/// The deepest agent tree walked when checking a delegation's descent.
pub const MAX_LINEAGE_DEPTH: usize = 64;

/// The facts auth looks up.
pub trait Lookups: Send + Sync + 'static {
    /// The parent of `agent` as its `agent.spawned` event recorded it; `None` for a root or an
    /// agent whose spawn is not in the log.
    fn parent_agent(&self, agent: AgentId) -> impl Future<Output = Result<Option<AgentId>, WireError>> + Send;

    /// The token `jti` was delegated from, as its `auth.token_delegated` event recorded it;
    /// `None` for an issued token or one auth never made.
    fn parent_token(&self, jti: TokenId) -> impl Future<Output = Result<Option<TokenId>, WireError>> + Send;
}

/// The first event of `event_type` about `entity` in `log`.
async fn first_event(bus: &Bus, log: LogName, event_type: &str, entity: String) -> Result<Option<Event>, WireError> {
    let query = QueryRequest {
        log,
        entity: Some(entity),
        event_type: Some(event_type.to_owned()),
        from_time_us: None,
        to_time_us: None,
        after: None,
        limit: 1,
    };
    let page: QueryReply = bus.request(subject::STORAGE_QUERY.subject, &query).await.map_err(|e| e.to_wire())?;
    Ok(page.hits.into_iter().next().map(|h| h.event))
}

impl Lookups for Bus {
    async fn parent_agent(&self, agent: AgentId) -> Result<Option<AgentId>, WireError> {
        Ok(match first_event(self, LogName::Kernel, "agent.spawned", agent.to_string()).await? {
            Some(Event::AgentSpawned { agent: spawned, parent, .. }) if spawned == agent => parent,
            _ => None,
        })
    }

    async fn parent_token(&self, jti: TokenId) -> Result<Option<TokenId>, WireError> {
        Ok(match first_event(self, LogName::Audit, "auth.token_delegated", jti.to_string()).await? {
            Some(Event::TokenDelegated { jti: delegated, parent, .. }) if delegated == jti => Some(parent),
            _ => None,
        })
    }
}

/// When the token `jti` expires, as its `auth.token_delegated` or `auth.token_issued` event
/// recorded it; `None` for a token auth never made (or whose record was compacted away).
pub async fn token_expiry(bus: &Bus, jti: TokenId) -> Result<Option<u64>, WireError> {
    if let Some(Event::TokenDelegated { jti: found, expires_at_us, .. }) =
        first_event(bus, LogName::Audit, "auth.token_delegated", jti.to_string()).await?
        && found == jti
    {
        return Ok(Some(expires_at_us));
    }
    Ok(match first_event(bus, LogName::Audit, "auth.token_issued", jti.to_string()).await? {
        Some(Event::TokenIssued { jti: found, expires_at_us, .. }) if found == jti => Some(expires_at_us),
        _ => None,
    })
}

/// Parent links found so far: a node maps to its parent, or to `None` at a root.
type Links<T> = BTreeMap<T, Option<T>>;

/// Follows parents from `start`, at most `max_steps` lookups, stopping at a root or at a node
/// already in `links`; each lookup's answer goes into `links`.
async fn walk_up<T, Fut>(
    start: T,
    max_steps: usize,
    links: &mut Links<T>,
    parent_of: impl Fn(T) -> Fut,
) -> Result<(), WireError>
where
    T: Copy + Ord,
    Fut: Future<Output = Result<Option<T>, WireError>>,
{
    let mut at = start;
    for _ in 0..max_steps {
        if links.contains_key(&at) {
            return Ok(());
        }
        let parent = parent_of(at).await?;
        links.insert(at, parent);
        match parent {
            Some(p) => at = p,
            None => return Ok(()),
        }
    }
    Ok(())
}

/// The part of the agent tree above some agents, as the kernel log recorded it.
#[derive(Debug, Default)]
pub struct LogLineage {
    parents: Links<AgentId>,
}

impl Lineage for LogLineage {
    fn is_descendant(&self, agent: AgentId, ancestor: AgentId) -> bool {
        let mut at = self.parents.get(&agent).copied().flatten();
        for _ in 0..MAX_LINEAGE_DEPTH {
            match at {
                Some(p) if p == ancestor => return true,
                Some(p) => at = self.parents.get(&p).copied().flatten(),
                None => return false,
            }
        }
        false
    }
}

/// The tree above every agent that `caps` name (`agent:<id>` or `agent:<id>/**`).
pub async fn lineage_of(lookups: &impl Lookups, caps: &[Capability]) -> Result<LogLineage, WireError> {
    let mut lineage = LogLineage::default();
    for cap in caps {
        if let Pattern::Agent(start) | Pattern::Subtree(start) = cap.resource {
            walk_up(start, MAX_LINEAGE_DEPTH, &mut lineage.parents, |a| lookups.parent_agent(a)).await?;
        }
    }
    Ok(lineage)
}

/// The ancestors of a delegated token, nearest first, at most `max` of them.
pub async fn ancestors(lookups: &impl Lookups, jti: TokenId, max: usize) -> Result<Vec<TokenId>, WireError> {
    let mut links = Links::new();
    walk_up(jti, max, &mut links, |t| lookups.parent_token(t)).await?;
    let mut chain = Vec::new();
    let mut at = jti;
    while let Some(Some(parent)) = links.get(&at) {
        if chain.len() == max {
            break;
        }
        chain.push(*parent);
        at = *parent;
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use toka_contract::capability::Action;
    use toka_contract::wire::ErrorCode;

    use super::*;

    /// Parent links in memory, counting lookups.
    #[derive(Default)]
    struct Memory {
        agents: BTreeMap<AgentId, AgentId>,
        tokens: BTreeMap<TokenId, TokenId>,
        lookups: Mutex<u32>,
        fail: bool,
    }

    impl Memory {
        fn looked_up(&self) -> u32 {
            *self.lookups.lock().unwrap()
        }

        fn count(&self) -> Result<(), WireError> {
            *self.lookups.lock().unwrap() += 1;
            if self.fail { Err(WireError::new(ErrorCode::Unavailable, "storage is down")) } else { Ok(()) }
        }
    }

    impl Lookups for Memory {
        async fn parent_agent(&self, agent: AgentId) -> Result<Option<AgentId>, WireError> {
            self.count()?;
            Ok(self.agents.get(&agent).copied())
        }

        async fn parent_token(&self, jti: TokenId) -> Result<Option<TokenId>, WireError> {
            self.count()?;
            Ok(self.tokens.get(&jti).copied())
        }
    }

    fn agent(n: u64) -> AgentId {
        AgentId::mint(1_000, n, 0)
    }

    /// A chain of agents 1 ← 2 ← … ← n (each the parent of the next).
    fn agents(n: u64) -> Memory {
        Memory { agents: (2..=n).map(|i| (agent(i), agent(i - 1))).collect(), ..Memory::default() }
    }

    fn read(pattern: Pattern) -> Capability {
        Capability::new(pattern, &[Action::Read])
    }

    #[tokio::test]
    async fn descent_is_read_up_to_the_root_once() {
        let log = agents(5);
        let caps = [read(Pattern::Subtree(agent(5))), read(Pattern::Agent(agent(4))), read(Pattern::AnyAgent)];
        let lineage = lineage_of(&log, &caps).await.unwrap();
        assert!(lineage.is_descendant(agent(5), agent(1)));
        assert!(lineage.is_descendant(agent(5), agent(4)));
        assert!(!lineage.is_descendant(agent(4), agent(5)), "not upwards");
        assert!(!lineage.is_descendant(agent(3), agent(3)), "not itself");
        assert_eq!(log.looked_up(), 5, "agents 5 to 1, each once; agent 4 was known already");
    }

    #[tokio::test]
    async fn an_unrecorded_agent_descends_from_nobody() {
        let log = agents(3);
        let stranger = agent(99);
        let lineage = lineage_of(&log, &[read(Pattern::Subtree(stranger))]).await.unwrap();
        assert!(!lineage.is_descendant(stranger, agent(1)));
        assert_eq!(log.looked_up(), 1);
    }

    #[tokio::test]
    async fn the_walk_is_bounded_in_depth() {
        let deep = MAX_LINEAGE_DEPTH as u64 + 10;
        let log = agents(deep);
        let lineage = lineage_of(&log, &[read(Pattern::Subtree(agent(deep)))]).await.unwrap();
        assert_eq!(log.looked_up(), MAX_LINEAGE_DEPTH as u32);
        assert!(lineage.is_descendant(agent(deep), agent(deep - MAX_LINEAGE_DEPTH as u64 + 1)));
        assert!(!lineage.is_descendant(agent(deep), agent(1)), "beyond what was read");
        // A loop in the links (a damaged log) ends too.
        let looped =
            Memory { agents: BTreeMap::from([(agent(1), agent(2)), (agent(2), agent(1))]), ..Memory::default() };
        let lineage = lineage_of(&looped, &[read(Pattern::Agent(agent(1)))]).await.unwrap();
        assert_eq!(looped.looked_up(), 2);
        assert!(!lineage.is_descendant(agent(1), agent(3)));
    }

    #[tokio::test]
    async fn ancestors_come_nearest_first_and_bounded() {
        let t = TokenId::from_u128;
        let log = Memory { tokens: (2..=6).map(|i| (t(i), t(i - 1))).collect(), ..Memory::default() };
        assert_eq!(ancestors(&log, t(4), 5).await.unwrap(), [t(3), t(2), t(1)]);
        assert_eq!(ancestors(&log, t(6), 2).await.unwrap(), [t(5), t(4)]);
        assert_eq!(ancestors(&log, t(1), 5).await.unwrap(), []);
        assert_eq!(ancestors(&log, t(6), 0).await.unwrap(), []);
    }

    #[tokio::test]
    async fn a_failed_lookup_is_the_callers_error() {
        let log = Memory { fail: true, ..agents(3) };
        let e = lineage_of(&log, &[read(Pattern::Agent(agent(3)))]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        assert!(ancestors(&log, TokenId::from_u128(1), 3).await.is_err());
    }
}
