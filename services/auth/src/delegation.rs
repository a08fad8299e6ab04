//! The delegation rule: the claims of a child token, derived from its parent's.

use toka_contract::TokenId;
use toka_contract::api::auth::Claims;
use toka_contract::spec::Principal;

/// Why a delegation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A requested capability is not covered by any single capability of the parent.
    #[error("capability {0} is not covered by the parent token")]
    Widened(String),
    /// The chain would grow past the depth cap.
    #[error("delegation depth {depth} exceeds the cap of {cap}")]
    TooDeep {
        /// The child's depth.
        depth: usize,
        /// The cap.
        cap: u8,
    },
    /// Nothing requested.
    #[error("a delegated token needs at least one capability")]
    Empty,
    /// The lifetime asked for is zero.
    #[error("a delegated token needs a lifetime")]
    NoLifetime,
    /// The child would outlive its parent.
    #[error("the child would expire at {child_exp}, after its parent at {parent_exp}")]
    Outlives {
        /// When the child would expire (seconds since the epoch).
        child_exp: u64,
        /// When the parent expires.
        parent_exp: u64,
    },
    /// The child would be named outside its parent's name.
    #[error("a child is named {parent} or {parent}/<suffix>, not {asked}")]
    ForeignName {
        /// The parent's subject.
        parent: String,
        /// The name asked for.
        asked: String,
    },
}

/// The subject a client may give a child of `parent`: the parent's own (when `asked` is none)
/// or a name under it, `<parent's sub>/<suffix>`. Any other name would let a holder act as
/// another principal (complete another worker's claim, appear as someone else in the audit
/// log); agents' names are given by the kernel alone.
pub fn child_name(parent: &Claims, asked: Option<Principal>) -> Result<Principal, Error> {
    let Some(asked) = asked else { return Ok(parent.sub.clone()) };
    let under = asked
        .as_str()
        .strip_prefix(parent.sub.as_str())
        .is_some_and(|rest| rest.is_empty() || (rest.len() > 1 && rest.starts_with('/')));
    if under { Ok(asked) } else { Err(Error::ForeignName { parent: parent.sub.to_string(), asked: asked.to_string() }) }
}

/// The claims of a child of `parent` named `sub`: a subset of its capabilities, a lifetime that ends no
/// later than the parent's (a longer one is refused, not shortened), one more link in the
/// chain, under the depth cap, one-time if asked or if the parent is, with the parent's root.
/// `lineage` answers
/// descent between agents where the caller knows the tree (the kernel); auth, which does not,
/// passes [`toka_contract::capability::NoLineage`].
#[allow(clippy::too_many_arguments)]
pub fn delegate(
    parent: &Claims,
    sub: Principal,
    caps: Vec<toka_contract::capability::Capability>,
    ttl_s: u64,
    once: bool,
    jti: TokenId,
    now_s: u64,
    max_depth: u8,
    lineage: &impl toka_contract::capability::Lineage,
) -> Result<Claims, Error> {
    if caps.is_empty() {
        return Err(Error::Empty);
    }
    if ttl_s == 0 {
        return Err(Error::NoLifetime);
    }
    if let Some(wider) = toka_contract::capability::first_uncovered(&caps, &parent.caps, lineage) {
        return Err(Error::Widened(format!("{} {:?}", wider.resource, wider.actions)));
    }
    let depth = parent.chain.len() + 1;
    if depth > usize::from(max_depth) {
        return Err(Error::TooDeep { depth, cap: max_depth });
    }
    let exp = now_s.saturating_add(ttl_s);
    if exp > parent.exp {
        return Err(Error::Outlives { child_exp: exp, parent_exp: parent.exp });
    }
    let mut chain = parent.chain.clone();
    chain.push(parent.jti);
    Ok(Claims {
        iss: parent.iss.clone(),
        sub,
        aud: parent.aud.clone(),
        exp,
        nbf: now_s.max(parent.nbf),
        iat: now_s,
        jti,
        caps,
        chain,
        depth: depth as u8,
        // A one-time token's children are one-time: none launders it into a reusable one.
        once: once || parent.once,
        root: Some(parent.root().clone()),
    })
}

#[cfg(test)]
mod tests {
    use toka_contract::capability::{Action, Capability, NoLineage, Pattern};
    use toka_contract::{AgentId, TokenId};

    use super::*;

    const NOW: u64 = 1_764_150_000;

    fn parent() -> Claims {
        Claims {
            caps: vec![
                Capability::new(Pattern::AnyAgent, &[Action::Spawn, Action::Read]),
                Capability::new(Pattern::AnyQueue, &[Action::Claim]),
            ],
            ..toka_contract::testing::claims(1, NOW)
        }
    }

    fn read_one() -> Vec<Capability> {
        vec![Capability::new(Pattern::Agent(AgentId::mint(1, 1, 0)), &[Action::Read])]
    }

    fn child_of(parent: &Claims, ttl_s: u64, max_depth: u8) -> Result<Claims, Error> {
        delegate(
            parent,
            parent.sub.clone(),
            read_one(),
            ttl_s,
            false,
            TokenId::from_u128(2),
            NOW,
            max_depth,
            &NoLineage,
        )
    }

    #[test]
    fn a_child_is_one_link_deeper_and_keeps_the_parents_identity() {
        let parent = parent();
        let child = child_of(&parent, 60, 5).unwrap();
        assert_eq!(
            child,
            Claims {
                iss: parent.iss.clone(),
                sub: parent.sub.clone(),
                aud: parent.aud.clone(),
                exp: NOW + 60,
                nbf: NOW,
                iat: NOW,
                jti: TokenId::from_u128(2),
                caps: read_one(),
                chain: vec![parent.jti],
                depth: 1,
                once: false,
                root: Some(parent.sub.clone()),
            }
        );
        let grandchild =
            delegate(&child, child.sub.clone(), read_one(), 30, true, TokenId::from_u128(3), NOW, 5, &NoLineage)
                .unwrap();
        assert_eq!(
            (grandchild.depth, grandchild.chain, grandchild.exp, grandchild.once),
            (2, vec![parent.jti, child.jti], NOW + 30, true)
        );
        let named = delegate(
            &parent,
            "agent-7".parse().unwrap(),
            read_one(),
            60,
            false,
            TokenId::from_u128(4),
            NOW,
            5,
            &NoLineage,
        )
        .unwrap();
        assert_eq!(named.sub.as_str(), "agent-7");
    }

    #[test]
    fn a_child_is_named_as_its_parent_or_under_it_and_keeps_the_root() {
        let parent = parent();
        let name = |asked: &str| child_name(&parent, Some(asked.parse().unwrap()));
        assert_eq!(child_name(&parent, None).unwrap(), parent.sub);
        let sub = parent.sub.to_string();
        for ok in [sub.clone(), format!("{sub}/a"), format!("{sub}/a/b")] {
            assert_eq!(name(&ok).unwrap().as_str(), ok);
        }
        for refused in ["admin".to_owned(), format!("{sub}x"), format!("{sub}-2"), format!("x{sub}")] {
            assert!(matches!(name(&refused), Err(Error::ForeignName { .. })), "{refused}");
        }
        let child = child_of(&parent, 60, 5).unwrap();
        let renamed = Claims { sub: format!("{sub}/a").parse().unwrap(), ..child };
        let grandchild = child_of(&renamed, 30, 5).unwrap();
        assert_eq!((grandchild.root(), parent.root()), (&parent.sub, &parent.sub), "the root stays the top's");
    }

    #[test]
    fn a_one_time_parent_has_one_time_children_only() {
        let once = Claims { once: true, ..parent() };
        assert!(child_of(&once, 60, 5).unwrap().once, "asked for without one_time");
        assert!(!child_of(&parent(), 60, 5).unwrap().once);
    }

    #[test]
    fn a_child_is_not_valid_before_its_parent() {
        let later = Claims { nbf: NOW + 30, ..parent() };
        assert_eq!(child_of(&later, 60, 5).unwrap().nbf, NOW + 30);
    }

    #[test]
    fn a_child_never_outlives_its_parent() {
        let parent = parent();
        assert_eq!(child_of(&parent, 600, 5).unwrap().exp, parent.exp, "up to the parent's expiry");
        assert_eq!(
            child_of(&parent, 601, 5),
            Err(Error::Outlives { child_exp: NOW + 601, parent_exp: parent.exp }),
            "a second later is refused, not shortened"
        );
        assert_eq!(child_of(&parent, 0, 5), Err(Error::NoLifetime));
    }

    #[test]
    fn the_depth_cap_is_reached_not_passed() {
        let parent = parent();
        let at_cap = child_of(&parent, 60, 1).unwrap();
        assert_eq!(at_cap.depth, 1);
        assert_eq!(child_of(&at_cap, 30, 1), Err(Error::TooDeep { depth: 2, cap: 1 }));
        assert_eq!(child_of(&parent, 60, 0), Err(Error::TooDeep { depth: 1, cap: 0 }));
    }

    #[test]
    fn a_child_holds_no_more_than_its_parent() {
        let parent = parent();
        let wider = vec![Capability::new(Pattern::AnyAgent, &[Action::Terminate])];
        assert!(matches!(
            delegate(&parent, parent.sub.clone(), wider, 60, false, TokenId::from_u128(4), NOW, 5, &NoLineage),
            Err(Error::Widened(_))
        ));
        assert_eq!(
            delegate(&parent, parent.sub.clone(), Vec::new(), 60, false, TokenId::from_u128(6), NOW, 5, &NoLineage),
            Err(Error::Empty)
        );
    }
}
