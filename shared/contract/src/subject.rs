//! Every NATS subject Toka uses, spelled once.
//!
//! - Requests: `toka.<service>.v1.<endpoint>`, served through the NATS services API.
//! - Committed events: `toka.evt.<log>.<category>.<name>.<entity>`, with `_` where an event
//!   has no entity, published only by storage. No version in event subjects: the CloudEvents
//!   `type` carries it (`toka.task.completed.v1`).
//! - Announcements: [`AUTH_HEARTBEAT`], published only by auth.
//!
//! `ARCHITECTURE.md` lists each with its producer and consumers; a test checks the two agree.

use crate::event::Event;
use crate::record::LogName;

/// The services, by the name they register with the NATS services API.
pub mod service {
    /// The kernel.
    pub const KERNEL: &str = "toka-kernel";
    /// Storage.
    pub const STORAGE: &str = "toka-storage";
    /// Auth.
    pub const AUTH: &str = "toka-auth";
    /// Telemetry.
    pub const TELEMETRY: &str = "toka-telemetry";
    /// Every service.
    pub const ALL: [&str; 4] = [KERNEL, STORAGE, AUTH, TELEMETRY];
}

/// A request/reply endpoint of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    /// The service that serves it (a [`service`] name).
    pub service: &'static str,
    /// The endpoint name within the service (`agent.get`).
    pub name: &'static str,
    /// The full subject.
    pub subject: &'static str,
}

macro_rules! endpoints {
    ($($(#[$doc:meta])* $const:ident = $svc:literal, $name:literal;)*) => {
        $(
            $(#[$doc])*
            pub const $const: Endpoint = Endpoint {
                service: concat!("toka-", $svc),
                name: $name,
                subject: concat!("toka.", $svc, ".v1.", $name),
            };
        )*
        /// Every endpoint.
        pub const ENDPOINTS: &[Endpoint] = &[$($const,)*];
    };
}

endpoints! {
    /// The kernel's health: version, readiness, uptime.
    KERNEL_HEALTH = "kernel", "health";
    /// Storage's health.
    STORAGE_HEALTH = "storage", "health";
    /// Auth's health.
    AUTH_HEALTH = "auth", "health";
    /// Telemetry's health.
    TELEMETRY_HEALTH = "telemetry", "health";
    /// Submit one operation.
    KERNEL_SUBMIT = "kernel", "submit";
    /// Submit several operations under one token.
    KERNEL_SUBMIT_BATCH = "kernel", "submit_batch";
    /// Read one agent.
    KERNEL_AGENT_GET = "kernel", "agent.get";
    /// List agents with filters and paging.
    KERNEL_AGENT_LIST = "kernel", "agent.list";
    /// Read one task.
    KERNEL_TASK_GET = "kernel", "task.get";
    /// List tasks with filters and paging.
    KERNEL_TASK_LIST = "kernel", "task.list";
    /// The sequencer: lease holder, log head, state hash, standbys.
    KERNEL_STATUS = "kernel", "status";
    /// Append to the `kernel` log (only the kernel may).
    STORAGE_APPEND_KERNEL = "storage", "append.kernel";
    /// Append to the `audit` log (only auth and the kernel may).
    STORAGE_APPEND_AUDIT = "storage", "append.audit";
    /// Read a log by sequence range.
    STORAGE_READ = "storage", "read";
    /// Query events by entity, type and time.
    STORAGE_QUERY = "storage", "query";
    /// A log's head: last sequence and hash.
    STORAGE_HEAD = "storage", "head";
    /// Verify a log's hash chain.
    STORAGE_VERIFY = "storage", "verify";
    /// Store one chunk of a snapshot.
    STORAGE_SNAPSHOT_PUT = "storage", "snapshot.put";
    /// Fetch one chunk of a snapshot.
    STORAGE_SNAPSHOT_GET = "storage", "snapshot.get";
    /// Backend, heads and publishing progress.
    STORAGE_STATUS = "storage", "status";
    /// Issue a token (admin credential or `token:*` issue).
    AUTH_ISSUE = "auth", "issue";
    /// Delegate a narrower child token.
    AUTH_DELEGATE = "auth", "delegate";
    /// A token for an agent the kernel spawned (only the kernel may ask).
    AUTH_AGENT_TOKEN = "auth", "agent_token";
    /// Revoke a token and its descendants.
    AUTH_REVOKE = "auth", "revoke";
    /// The public signing keys (JWKS).
    AUTH_JWKS = "auth", "jwks";
    /// Rotate the signing key now.
    AUTH_ROTATE = "auth", "rotate";
    /// Every revocation still in force, with the epoch.
    AUTH_REVOCATIONS = "auth", "revocations";
    /// The JWKS, for the services' verifiers only (a budget no client can spend).
    AUTH_SERVICE_JWKS = "auth", "service.jwks";
    /// The revocations, for the services' verifiers only.
    AUTH_SERVICE_REVOCATIONS = "auth", "service.revocations";
}

/// The endpoint that appends to `log`.
pub const fn append(log: LogName) -> Endpoint {
    match log {
        LogName::Kernel => STORAGE_APPEND_KERNEL,
        LogName::Audit => STORAGE_APPEND_AUDIT,
    }
}

/// The health endpoint of `service` (a [`service`] name).
pub fn health(service: &str) -> Option<Endpoint> {
    ENDPOINTS.iter().copied().find(|e| e.service == service && e.name == "health")
}

/// Auth's periodic heartbeat carrying the revocation epoch.
pub const AUTH_HEARTBEAT: &str = "toka.auth.v1.heartbeat";

/// Every committed auth event (revocations, rotations, issues, denials): what verifiers follow.
pub const AUTH_EVENTS: &str = "toka.evt.audit.auth.>";

/// The subject on which the auth replica `instance` takes forwarded rotation requests (only
/// the holder of the rotation lease rotates; the others forward to it).
pub fn auth_rotate_at(instance: &str) -> String {
    format!("toka.auth.v1.leader.{instance}.rotate")
}

/// The root of every committed-event subject.
pub const EVENTS_ROOT: &str = "toka.evt";

/// Every committed event (the JetStream stream's subject filter).
pub const ALL_EVENTS: &str = "toka.evt.>";

/// The JetStream stream that holds the kernel log's committed events (readers with `read` on
/// every agent may read it).
pub const EVENTS_STREAM: &str = "TOKA_EVENTS";

/// The JetStream stream that holds the audit log's committed events (operators only).
pub const AUDIT_STREAM: &str = "TOKA_AUDIT";

/// The root of the subjects each stream republishes its stored messages on, headers only: a
/// message there says that the stream stored the event of the same subject under `toka.evt`,
/// at the sequence in its `Nats-Sequence` header (followers read it with a direct get).
pub const LIVE_ROOT: &str = "toka.live";

/// Alerts raised about what the logs show (`toka.alert.<kind>`).
pub const ALERTS: &str = "toka.alert.>";

/// The stream that holds the committed events of `log`.
pub const fn stream_of(log: LogName) -> &'static str {
    match log {
        LogName::Kernel => EVENTS_STREAM,
        LogName::Audit => AUDIT_STREAM,
    }
}

/// Every committed event of `log` (its stream's subject filter).
pub fn events_of(log: LogName) -> String {
    format!("{EVENTS_ROOT}.{log}.>")
}

/// The log whose events `filter` (a subject under `toka.evt`, wildcards allowed) selects, when
/// it names one.
pub fn log_of(filter: &str) -> Option<LogName> {
    let log = filter.strip_prefix(EVENTS_ROOT)?.strip_prefix('.')?.split('.').next()?;
    LogName::ALL.into_iter().find(|l| l.as_str() == log)
}

/// Where the stream republishes what it stored on `filter` (a subject under `toka.evt`).
pub fn live(filter: &str) -> Option<String> {
    filter.strip_prefix(EVENTS_ROOT).filter(|rest| rest.starts_with('.')).map(|rest| format!("{LIVE_ROOT}{rest}"))
}

/// The token that stands for "no entity".
pub const NO_ENTITY: &str = "_";

/// The subject a committed event of `log` is published on.
pub fn event(log: LogName, event: &Event) -> String {
    let entity = event.entity();
    format!("{EVENTS_ROOT}.{log}.{}.{}.{}", event.category(), event.name(), entity.as_deref().unwrap_or(NO_ENTITY))
}

/// A filter for every event of `log` about `entity` (an agent, task or token id).
pub fn events_about(log: LogName, entity: &str) -> String {
    format!("{EVENTS_ROOT}.{log}.*.*.{entity}")
}

/// A filter for every event of `log` in `category` (`agent`, `task`, ...).
pub fn events_in(log: LogName, category: &str) -> String {
    format!("{EVENTS_ROOT}.{log}.{category}.>")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::AgentId;

    fn is_token(t: &str) -> bool {
        !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    }

    #[test]
    fn request_subjects_follow_the_scheme_and_are_unique() {
        let mut seen = BTreeSet::new();
        for e in ENDPOINTS {
            let tokens: Vec<&str> = e.subject.split('.').collect();
            assert!(tokens.len() >= 4, "{}", e.subject);
            assert_eq!(tokens[0], "toka");
            assert_eq!(format!("toka-{}", tokens[1]), e.service);
            assert!(service::ALL.contains(&e.service));
            assert_eq!(tokens[2], "v1");
            assert_eq!(tokens[3..].join("."), e.name);
            assert!(tokens.iter().all(|t| is_token(t)), "{}", e.subject);
            assert!(seen.insert(e.subject), "{} twice", e.subject);
        }
        assert!(AUTH_HEARTBEAT.starts_with("toka.auth.v1.") && !seen.contains(AUTH_HEARTBEAT));
        // No endpoint subject is a prefix of another's wildcard space by accident.
        for a in ENDPOINTS {
            for b in ENDPOINTS {
                assert!(
                    a == b || !b.subject.starts_with(&format!("{}.", a.subject)),
                    "{} shadows {}",
                    a.subject,
                    b.subject
                );
            }
        }
    }

    #[test]
    fn event_subjects_have_six_tokens_and_no_version() {
        let agent = AgentId::mint(1_000, 1, 0);
        let with_entity = event(LogName::Kernel, &Event::AgentResumed { agent });
        assert_eq!(with_entity, format!("toka.evt.kernel.agent.resumed.{agent}"));
        let without =
            event(LogName::Audit, &Event::KeyRotated { kid: "k1".into(), previous_kid: None, retire_at_us: None });
        assert_eq!(without, "toka.evt.audit.auth.key_rotated._");
        for s in [&with_entity, &without] {
            let tokens: Vec<&str> = s.split('.').collect();
            assert_eq!(tokens.len(), 6, "{s}");
            assert!(!tokens.iter().any(|t| t.starts_with('v') && t[1..].parse::<u32>().is_ok()), "{s} has a version");
        }
        assert_eq!(events_about(LogName::Kernel, &agent.to_string()), format!("toka.evt.kernel.*.*.{agent}"));
        assert_eq!(events_in(LogName::Kernel, "task"), "toka.evt.kernel.task.>");
        for t in Event::TYPES {
            let (category, name) = t.split_once('.').unwrap();
            assert!(is_token(category) && is_token(name), "{t}");
        }
    }

    #[test]
    fn each_log_has_its_stream_and_a_filter_names_its_log_and_live_subject() {
        assert_eq!(stream_of(LogName::Kernel), EVENTS_STREAM);
        assert_eq!(stream_of(LogName::Audit), AUDIT_STREAM);
        assert_eq!(events_of(LogName::Audit), "toka.evt.audit.>");
        assert_eq!(log_of("toka.evt.kernel.*.*.a1"), Some(LogName::Kernel));
        assert_eq!(log_of(&events_of(LogName::Audit)), Some(LogName::Audit));
        for unnamed in ["toka.evt.>", "toka.evt.*.agent.>", "toka.evtx.kernel.>", "toka.live.kernel.>", ""] {
            assert_eq!(log_of(unnamed), None, "{unnamed}");
        }
        assert_eq!(live("toka.evt.kernel.task.>").as_deref(), Some("toka.live.kernel.task.>"));
        assert_eq!(live("toka.evtx.kernel.>"), None);
    }
}
