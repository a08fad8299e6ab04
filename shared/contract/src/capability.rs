//! Capabilities: what a token allows, and the rules that check it.
//!
//! A capability is a resource [`Pattern`] plus an [`ActionSet`]. The grammar (also in
//! `ARCHITECTURE.md` and `schemas/common/defs.v1.json`):
//!
//! ```text
//! pattern := "agent:*"            every agent, and creating root agents
//!          | "agent:" ID          that agent only
//!          | "agent:" ID "/**"    that agent and all its descendants
//!          | "task:*"             every task queue
//!          | "task:" QUEUE        that queue
//!          | "token:*"            the token service (issue, revoke, rotate)
//! ```
//!
//! Matching is by prefix only: there is no wildcard inside a pattern. Whether an agent descends
//! from another is a fact of the kernel's state, not of the token, so checks take a [`Lineage`]
//! that answers it; auth, which has no agent tree, uses [`NoLineage`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::AgentId;
use crate::spec::QueueName;

/// Why a capability does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The resource pattern is not in the grammar.
    #[error(
        "invalid resource pattern {0:?}: expected agent:*, agent:<id>, agent:<id>/**, task:*, task:<queue> or token:*"
    )]
    Pattern(String),
    /// The action is not one Toka knows.
    #[error("unknown action {0:?}")]
    Action(String),
    /// An action is listed twice.
    #[error("action {0:?} listed twice")]
    DuplicateAction(&'static str),
    /// A capability with no action allows nothing and is refused rather than ignored.
    #[error("a capability needs at least one action")]
    NoAction,
}

macro_rules! actions {
    ($($variant:ident = $bit:literal, $name:literal, $doc:literal;)*) => {
        /// Something a principal may do to a resource.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        #[repr(u8)]
        pub enum Action {
            $(#[doc = $doc] $variant = $bit,)*
        }

        impl Action {
            /// Every action, in canonical order.
            pub const ALL: &'static [Action] = &[$(Action::$variant,)*];

            /// The wire name.
            pub const fn as_str(self) -> &'static str {
                match self { $(Action::$variant => $name,)* }
            }
        }

        impl FromStr for Action {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                match s { $($name => Ok(Action::$variant),)* _ => Err(Error::Action(s.chars().take(64).collect())) }
            }
        }
    };
}

actions! {
    Spawn = 0, "spawn", "Spawn a child of the agent (or a root agent, on `agent:*`).";
    Suspend = 1, "suspend", "Suspend the agent.";
    Resume = 2, "resume", "Resume the agent.";
    Terminate = 3, "terminate", "Terminate the agent and its subtree.";
    Schedule = 4, "schedule", "Schedule a task owned by the agent.";
    Cancel = 5, "cancel", "Cancel a task owned by the agent.";
    Observe = 6, "observe", "Emit an observation for the agent.";
    Report = 7, "report", "Report the agent's resource usage.";
    Read = 8, "read", "Read the agent, its tasks or a queue.";
    Claim = 9, "claim", "Claim a task from the queue.";
    Heartbeat = 10, "heartbeat", "Heartbeat a task claimed from the queue.";
    Complete = 11, "complete", "Complete a task claimed from the queue.";
    Fail = 12, "fail", "Fail a task claimed from the queue.";
    Issue = 13, "issue", "Issue tokens.";
    Revoke = 14, "revoke", "Revoke any token.";
    Rotate = 15, "rotate", "Rotate the signing keys now.";
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of actions, a bit each; on the wire a non-empty array of names in canonical order.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ActionSet(u32);

impl ActionSet {
    /// The empty set.
    pub const EMPTY: ActionSet = ActionSet(0);

    /// The set holding `actions`.
    pub fn of(actions: &[Action]) -> Self {
        actions.iter().fold(Self::EMPTY, |set, &a| set.with(a))
    }

    /// This set plus `action`.
    pub const fn with(self, action: Action) -> Self {
        ActionSet(self.0 | 1 << action as u8)
    }

    /// Whether `action` is in the set.
    pub const fn contains(self, action: Action) -> bool {
        self.0 & (1 << action as u8) != 0
    }

    /// Whether every action of `self` is in `other`.
    pub const fn is_subset(self, other: ActionSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The actions, in canonical order.
    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.iter().copied().filter(move |&a| self.contains(a))
    }
}

impl fmt::Debug for ActionSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Action::as_str)).finish()
    }
}

impl Serialize for ActionSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Action::as_str))
    }
}

impl<'de> Deserialize<'de> for ActionSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = <Vec<std::borrow::Cow<'de, str>>>::deserialize(d)?;
        let mut set = ActionSet::EMPTY;
        for name in names {
            let action: Action = name.parse().map_err(serde::de::Error::custom)?;
            if set.contains(action) {
                return Err(serde::de::Error::custom(Error::DuplicateAction(action.as_str())));
            }
            set = set.with(action);
        }
        if set.is_empty() {
            return Err(serde::de::Error::custom(Error::NoAction));
        }
        Ok(set)
    }
}

/// A resource pattern (see the module docs for the grammar).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pattern {
    /// `agent:*`
    AnyAgent,
    /// `agent:<id>`
    Agent(AgentId),
    /// `agent:<id>/**`
    Subtree(AgentId),
    /// `task:*`
    AnyQueue,
    /// `task:<queue>`
    Queue(QueueName),
    /// `token:*`
    Tokens,
}

impl FromStr for Pattern {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = || Error::Pattern(s.chars().take(128).collect());
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match (kind, rest) {
            ("agent", "*") => Ok(Pattern::AnyAgent),
            ("agent", rest) => match rest.strip_suffix("/**") {
                Some(id) => id.parse().map(Pattern::Subtree).map_err(|_| bad()),
                None => rest.parse().map(Pattern::Agent).map_err(|_| bad()),
            },
            ("task", "*") => Ok(Pattern::AnyQueue),
            ("task", queue) => queue.parse().map(Pattern::Queue).map_err(|_| bad()),
            ("token", "*") => Ok(Pattern::Tokens),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pattern::AnyAgent => f.write_str("agent:*"),
            Pattern::Agent(id) => write!(f, "agent:{id}"),
            Pattern::Subtree(id) => write!(f, "agent:{id}/**"),
            Pattern::AnyQueue => f.write_str("task:*"),
            Pattern::Queue(q) => write!(f, "task:{q}"),
            Pattern::Tokens => f.write_str("token:*"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A concrete resource an operation acts on, as a check sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The top of the agent tree: spawning a root agent.
    Root,
    /// One agent.
    Agent(AgentId),
    /// One task queue.
    Queue(&'a QueueName),
    /// The token service.
    Tokens,
}

impl fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Root => f.write_str("agent:*"),
            Target::Agent(id) => write!(f, "agent:{id}"),
            Target::Queue(q) => write!(f, "task:{q}"),
            Target::Tokens => f.write_str("token:*"),
        }
    }
}

/// Answers whether one agent descends from another; the kernel implements it over its tree.
pub trait Lineage {
    /// Whether `agent` is a strict descendant of `ancestor`.
    fn is_descendant(&self, agent: AgentId, ancestor: AgentId) -> bool;
}

/// A lineage that knows no tree: `agent:<id>/**` then matches only `<id>` itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLineage;

impl Lineage for NoLineage {
    fn is_descendant(&self, _: AgentId, _: AgentId) -> bool {
        false
    }
}

impl Pattern {
    /// Whether the pattern names `target`.
    pub fn matches(&self, target: Target<'_>, lineage: &impl Lineage) -> bool {
        match (self, target) {
            (Pattern::AnyAgent, Target::Root | Target::Agent(_)) => true,
            (Pattern::Agent(id), Target::Agent(t)) => *id == t,
            (Pattern::Subtree(id), Target::Agent(t)) => *id == t || lineage.is_descendant(t, *id),
            (Pattern::AnyQueue, Target::Queue(_)) => true,
            (Pattern::Queue(q), Target::Queue(t)) => q == t,
            (Pattern::Tokens, Target::Tokens) => true,
            _ => false,
        }
    }

    /// Whether every resource `other` names is also named by `self` (the delegation rule).
    pub fn covers(&self, other: &Pattern, lineage: &impl Lineage) -> bool {
        match (self, other) {
            (Pattern::AnyAgent, Pattern::AnyAgent | Pattern::Agent(_) | Pattern::Subtree(_)) => true,
            (Pattern::Subtree(a), Pattern::Agent(b) | Pattern::Subtree(b)) => a == b || lineage.is_descendant(*b, *a),
            (Pattern::Agent(a), Pattern::Agent(b)) => a == b,
            (Pattern::AnyQueue, Pattern::AnyQueue | Pattern::Queue(_)) => true,
            (Pattern::Queue(a), Pattern::Queue(b)) => a == b,
            (Pattern::Tokens, Pattern::Tokens) => true,
            _ => false,
        }
    }
}

/// A resource pattern plus the actions allowed on what it names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capability {
    /// What the capability is about.
    pub resource: Pattern,
    /// What it allows there.
    pub actions: ActionSet,
}

impl Capability {
    /// A capability on `resource` for `actions`.
    pub fn new(resource: Pattern, actions: &[Action]) -> Self {
        Self { resource, actions: ActionSet::of(actions) }
    }

    /// Whether this capability allows `action` on `target`.
    pub fn allows(&self, action: Action, target: Target<'_>, lineage: &impl Lineage) -> bool {
        self.actions.contains(action) && self.resource.matches(target, lineage)
    }

    /// Whether this capability allows at least everything `child` allows.
    pub fn covers(&self, child: &Capability, lineage: &impl Lineage) -> bool {
        child.actions.is_subset(self.actions) && self.resource.covers(&child.resource, lineage)
    }
}

/// Whether any of `caps` allows `action` on `target`.
pub fn allows(caps: &[Capability], action: Action, target: Target<'_>, lineage: &impl Lineage) -> bool {
    caps.iter().any(|c| c.allows(action, target, lineage))
}

/// The delegation rule: every capability of `child` is covered by some single capability of
/// `parent`. Returns the first capability that is not, if any.
pub fn first_uncovered<'c>(
    child: &'c [Capability],
    parent: &[Capability],
    lineage: &impl Lineage,
) -> Option<&'c Capability> {
    child.iter().find(|c| !parent.iter().any(|p| p.covers(c, lineage)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-level tree: `root` → `child` → `grandchild`.
    struct Tree {
        root: AgentId,
        child: AgentId,
        grandchild: AgentId,
    }

    impl Lineage for Tree {
        fn is_descendant(&self, agent: AgentId, ancestor: AgentId) -> bool {
            (agent == self.child && ancestor == self.root)
                || (agent == self.grandchild && (ancestor == self.child || ancestor == self.root))
        }
    }

    fn tree() -> Tree {
        Tree { root: AgentId::mint(0, 1, 0), child: AgentId::mint(0, 2, 0), grandchild: AgentId::mint(0, 3, 0) }
    }

    #[test]
    fn patterns_parse_and_print_the_grammar() {
        let t = tree();
        for text in [
            "agent:*".to_owned(),
            format!("agent:{}", t.root),
            format!("agent:{}/**", t.root),
            "task:*".into(),
            "task:gpu".into(),
            "token:*".into(),
        ] {
            let pattern: Pattern = text.parse().unwrap();
            assert_eq!(pattern.to_string(), text);
        }
        for bad in [
            "agent:",
            "agent:**",
            "agent:x/**",
            &format!("agent:{}/*", t.root),
            "task:",
            "task:GPU",
            "token:abc",
            "tokens:*",
            "*",
            "queue:x",
        ] {
            assert!(bad.parse::<Pattern>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn subtree_matches_descendants_only_through_lineage() {
        let t = tree();
        let sub = Pattern::Subtree(t.child);
        assert!(sub.matches(Target::Agent(t.child), &t));
        assert!(sub.matches(Target::Agent(t.grandchild), &t));
        assert!(!sub.matches(Target::Agent(t.root), &t));
        assert!(!sub.matches(Target::Agent(t.grandchild), &NoLineage));
        assert!(!Pattern::Agent(t.child).matches(Target::Agent(t.grandchild), &t));
        assert!(!sub.matches(Target::Root, &t));
        assert!(Pattern::AnyAgent.matches(Target::Root, &t));
        let q: QueueName = "gpu".parse().unwrap();
        assert!(!Pattern::AnyAgent.matches(Target::Queue(&q), &t));
        assert!(Pattern::AnyQueue.matches(Target::Queue(&q), &t));
        assert!(!Pattern::Queue("cpu".parse().unwrap()).matches(Target::Queue(&q), &t));
        assert!(!Pattern::Tokens.matches(Target::Agent(t.root), &t));
    }

    #[test]
    fn allows_needs_both_action_and_resource() {
        let t = tree();
        let caps = [Capability::new(Pattern::Subtree(t.child), &[Action::Suspend, Action::Resume])];
        assert!(allows(&caps, Action::Suspend, Target::Agent(t.grandchild), &t));
        assert!(!allows(&caps, Action::Terminate, Target::Agent(t.grandchild), &t));
        assert!(!allows(&caps, Action::Suspend, Target::Agent(t.root), &t));
    }

    #[test]
    fn delegation_subset_rule() {
        let t = tree();
        let parent = [
            Capability::new(Pattern::Subtree(t.root), &[Action::Spawn, Action::Read]),
            Capability::new(Pattern::Queue("gpu".parse().unwrap()), &[Action::Claim, Action::Complete]),
        ];
        let narrower = [
            Capability::new(Pattern::Subtree(t.child), &[Action::Read]),
            Capability::new(Pattern::Queue("gpu".parse().unwrap()), &[Action::Claim]),
        ];
        assert_eq!(first_uncovered(&narrower, &parent, &t), None);
        // Without the tree, a different subtree is not provably inside.
        assert_eq!(first_uncovered(&narrower, &parent, &NoLineage), Some(&narrower[0]));
        let wider_action = [Capability::new(Pattern::Subtree(t.child), &[Action::Terminate])];
        assert_eq!(first_uncovered(&wider_action, &parent, &t), Some(&wider_action[0]));
        let wider_resource = [Capability::new(Pattern::AnyQueue, &[Action::Claim])];
        assert_eq!(first_uncovered(&wider_resource, &parent, &t), Some(&wider_resource[0]));
        // An agent pattern never covers its own subtree.
        let single = [Capability::new(Pattern::Agent(t.root), &[Action::Read])];
        let subtree = [Capability::new(Pattern::Subtree(t.root), &[Action::Read])];
        assert_eq!(first_uncovered(&subtree, &single, &t), Some(&subtree[0]));
        // Capabilities split across two parent capabilities are not covered by either alone.
        let split = [Capability::new(Pattern::Subtree(t.root), &[Action::Spawn, Action::Claim])];
        assert!(first_uncovered(&split, &parent, &t).is_some());
    }

    #[test]
    fn action_sets_serialize_canonically_and_reject_duplicates() {
        let set: ActionSet = serde_json::from_str(r#"["read","spawn"]"#).unwrap();
        assert_eq!(serde_json::to_string(&set).unwrap(), r#"["spawn","read"]"#);
        assert!(serde_json::from_str::<ActionSet>(r#"["read","read"]"#).is_err());
        assert!(serde_json::from_str::<ActionSet>(r#"[]"#).is_err());
        assert!(serde_json::from_str::<ActionSet>(r#"["fly"]"#).is_err());
        for a in Action::ALL {
            assert_eq!(a.as_str().parse::<Action>(), Ok(*a));
        }
    }

    #[test]
    fn every_pattern_matches_exactly_its_own_kind_of_target() {
        let t = tree();
        let (gpu, cpu): (QueueName, QueueName) = ("gpu".parse().unwrap(), "cpu".parse().unwrap());
        let targets =
            [Target::Root, Target::Agent(t.root), Target::Agent(t.child), Target::Queue(&gpu), Target::Tokens];
        let expect = |pattern: &Pattern, wanted: &[bool; 5]| {
            let got: Vec<bool> = targets.iter().map(|target| pattern.matches(*target, &NoLineage)).collect();
            assert_eq!(got, wanted, "{pattern}");
        };
        expect(&Pattern::AnyAgent, &[true, true, true, false, false]);
        expect(&Pattern::Agent(t.root), &[false, true, false, false, false]);
        expect(&Pattern::Subtree(t.child), &[false, false, true, false, false]);
        expect(&Pattern::AnyQueue, &[false, false, false, true, false]);
        expect(&Pattern::Queue(gpu.clone()), &[false, false, false, true, false]);
        expect(&Pattern::Queue(cpu), &[false, false, false, false, false]);
        expect(&Pattern::Tokens, &[false, false, false, false, true]);
    }

    #[test]
    fn every_pattern_covers_exactly_what_it_names() {
        let t = tree();
        let gpu: QueueName = "gpu".parse().unwrap();
        let patterns = [
            Pattern::AnyAgent,
            Pattern::Agent(t.root),
            Pattern::Agent(t.child),
            Pattern::Subtree(t.root),
            Pattern::Subtree(t.child),
            Pattern::AnyQueue,
            Pattern::Queue(gpu.clone()),
            Pattern::Queue("cpu".parse().unwrap()),
            Pattern::Tokens,
        ];
        // Row: the parent pattern; column: the child pattern, in the order above.
        let covered: [[u8; 9]; 9] = [
            [1, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 1, 0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0, 0, 0, 0],
            [0, 1, 1, 1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 1],
        ];
        for (parent, row) in patterns.iter().zip(covered) {
            let got: Vec<u8> = patterns.iter().map(|child| u8::from(parent.covers(child, &t))).collect();
            assert_eq!(got, row, "what {parent} covers");
        }
        // Without the tree, a subtree covers only itself and its root agent.
        assert!(!Pattern::Subtree(t.root).covers(&Pattern::Agent(t.child), &NoLineage));
        assert!(Pattern::Subtree(t.root).covers(&Pattern::Agent(t.root), &NoLineage));
    }

    #[test]
    fn an_action_added_twice_stays_in_the_set() {
        let read = ActionSet::EMPTY.with(Action::Read);
        assert_eq!(read.with(Action::Read), read);
        assert!(ActionSet::of(&[Action::Read, Action::Read]).contains(Action::Read));
        assert!(read.is_subset(ActionSet::of(&[Action::Read, Action::Spawn])));
        assert!(!ActionSet::of(&[Action::Read, Action::Spawn]).is_subset(read));
        assert!(ActionSet::EMPTY.is_empty() && !read.is_empty());
        assert_eq!(
            ActionSet::of(&[Action::Rotate, Action::Spawn]).iter().collect::<Vec<_>>(),
            [Action::Spawn, Action::Rotate]
        );
    }

    #[test]
    fn actions_and_targets_print_as_the_grammar_spells_them() {
        let t = tree();
        let gpu: QueueName = "gpu".parse().unwrap();
        assert_eq!(format!("{} {}", Action::Read, Action::Heartbeat), "read heartbeat");
        let printed: Vec<String> = [Target::Root, Target::Agent(t.root), Target::Queue(&gpu), Target::Tokens]
            .iter()
            .map(|t| t.to_string())
            .collect();
        assert_eq!(printed, ["agent:*".to_owned(), format!("agent:{}", t.root), "task:gpu".into(), "token:*".into()]);
    }
}
