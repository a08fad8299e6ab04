//! What clients ask for: agent and task specifications, resource quantities, and the small
//! validated names (queues, principals, agent names) that appear in subjects and capabilities.
//!
//! Quantities are integers in fixed units (bytes, millicores, microseconds, percent): nothing
//! that is hashed or replayed is ever a float.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a string is not a valid name of its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {input:?}: must match {pattern}")]
pub struct Error {
    kind: &'static str,
    pattern: &'static str,
    input: String,
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $pattern:literal, max = $max:literal, first = $first:expr, rest = $rest:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The regex this name matches; the schemas spell the same one.
            pub const PATTERN: &'static str = $pattern;

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(s: String) -> Result<Self, Error> {
                let first: fn(u8) -> bool = $first;
                let rest: fn(u8) -> bool = $rest;
                let b = s.as_bytes();
                if !b.is_empty() && b.len() <= $max && first(b[0]) && b[1..].iter().all(|&c| rest(c)) {
                    Ok(Self(s))
                } else {
                    Err(Error { kind: $kind, pattern: $pattern, input: s.chars().take(160).collect() })
                }
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                Self::try_from(s.to_owned())
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

fn lower_alnum(c: u8) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

name_type!(
    /// A task queue: one NATS subject token, also used in `task:<queue>` capabilities.
    QueueName, "queue name", "^[a-z0-9][a-z0-9_-]{0,63}$", max = 64,
    first = lower_alnum, rest = |c| lower_alnum(c) || c == b'_' || c == b'-'
);
name_type!(
    /// A human-readable agent name (not unique; the id is).
    AgentName, "agent name", "^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$", max = 64,
    first = |c| c.is_ascii_alphanumeric(), rest = |c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'-')
);
name_type!(
    /// Who acted: a token's `sub` (for example `agent:<id>`, `admin`, `svc:kernel`).
    Principal, "principal", "^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$", max = 128,
    first = |c| c.is_ascii_alphanumeric(), rest = |c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'@' | b'/' | b'-')
);
name_type!(
    /// The kind of an observation an agent emits (`tool.call`, `llm.response`, ...).
    ObservationKind, "observation kind", "^[a-z0-9][a-z0-9._-]{0,63}$", max = 64,
    first = lower_alnum, rest = |c| lower_alnum(c) || matches!(c, b'.' | b'_' | b'-')
);

/// The most characters an opaque text field (task payload and result, observation body) holds.
pub const MAX_TEXT_CHARS: usize = 65_536;

/// Resource limits of an agent; an absent limit is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceLimits {
    /// Most memory the agent may hold at once, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Most CPU the agent may use, in millicores (1000 = one core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u64>,
    /// Most bytes the agent may read and write over its lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_bytes: Option<u64>,
}

/// The deadlines of a task, each measured from the event that starts it; absent means none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// From scheduling (or becoming retryable) to being claimed, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_to_start_us: Option<u64>,
    /// From being claimed to completing, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_to_close_us: Option<u64>,
    /// Longest silence between a claim or heartbeat and the next, in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_us: Option<u64>,
}

/// How a failed or timed-out task is retried: exponential backoff, then parked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = never retry). 1..=100.
    pub max_attempts: u32,
    /// Wait before the second attempt, in microseconds.
    pub initial_backoff_us: u64,
    /// Growth of the wait per further attempt, in percent (200 doubles it). 100..=1000.
    pub backoff_multiplier_pct: u32,
    /// Upper bound of the wait, in microseconds.
    pub max_backoff_us: u64,
}

impl Default for RetryPolicy {
    /// Three attempts, waiting 1 s then 2 s, never more than 60 s.
    fn default() -> Self {
        Self { max_attempts: 3, initial_backoff_us: 1_000_000, backoff_multiplier_pct: 200, max_backoff_us: 60_000_000 }
    }
}

impl RetryPolicy {
    /// Wait before the attempt that follows failed attempt `failed_attempt` (1-based), in
    /// integer arithmetic so replay computes the same deadline everywhere.
    pub fn backoff_us(&self, failed_attempt: u32) -> u64 {
        let mut wait = u128::from(self.initial_backoff_us);
        for _ in 1..failed_attempt {
            wait = wait * u128::from(self.backoff_multiplier_pct) / 100;
            if wait >= u128::from(self.max_backoff_us) {
                break;
            }
        }
        u64::try_from(wait.min(u128::from(self.max_backoff_us))).unwrap_or(u64::MAX)
    }
}

/// Everything needed to spawn an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSpec {
    /// Human-readable name.
    pub name: AgentName,
    /// The parent in the agent tree; absent for a root agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<crate::AgentId>,
    /// Resource limits; absent fields are unlimited.
    #[serde(default, skip_serializing_if = "is_default")]
    pub limits: ResourceLimits,
}

/// Everything needed to schedule a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// The agent that owns the task; terminating it cancels the task.
    pub agent: crate::AgentId,
    /// The queue workers claim it from.
    pub queue: QueueName,
    /// Opaque input for the worker (often JSON text), at most [`MAX_TEXT_CHARS`] characters.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub payload: String,
    /// Higher is claimed first; ties go to the oldest.
    #[serde(default, skip_serializing_if = "is_default")]
    pub priority: u8,
    /// Deadlines.
    #[serde(default, skip_serializing_if = "is_default")]
    pub timeouts: Timeouts,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "is_default")]
    pub retry: RetryPolicy,
}

pub(crate) fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_enforce_their_patterns() {
        assert!("gpu-jobs_2".parse::<QueueName>().is_ok());
        for bad in ["", "Gpu", "-x", "a.b", "a b", &"q".repeat(65)] {
            assert!(bad.parse::<QueueName>().is_err(), "{bad:?}");
        }
        assert!("agent:01h00000000000000000000000".parse::<Principal>().is_ok());
        assert!("svc/kernel@prod".parse::<Principal>().is_ok());
        assert!(":x".parse::<Principal>().is_err());
        assert!("planner-1".parse::<AgentName>().is_ok());
        assert!("planner 1".parse::<AgentName>().is_err());
        assert!("tool.call".parse::<ObservationKind>().is_ok());
        assert!("Tool".parse::<ObservationKind>().is_err());
    }

    #[test]
    fn backoff_grows_then_caps() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff_us: 100,
            backoff_multiplier_pct: 300,
            max_backoff_us: 2_000,
        };
        let waits: Vec<u64> = (1..=5).map(|a| p.backoff_us(a)).collect();
        assert_eq!(waits, [100, 300, 900, 2_000, 2_000]);
        let huge = RetryPolicy {
            max_attempts: 100,
            initial_backoff_us: u64::MAX,
            backoff_multiplier_pct: 1000,
            max_backoff_us: u64::MAX,
        };
        assert_eq!(huge.backoff_us(100), u64::MAX);
    }

    #[test]
    fn defaults_are_omitted_from_the_wire() {
        let spec = TaskSpec {
            agent: crate::AgentId::mint(0, 1, 0),
            queue: "q".parse().unwrap(),
            payload: String::new(),
            priority: 0,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json, serde_json::json!({"agent": spec.agent.to_string(), "queue": "q"}));
        assert_eq!(serde_json::from_value::<TaskSpec>(json).unwrap(), spec);
    }
}
