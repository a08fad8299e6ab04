//! Who may publish and subscribe to what on the bus: one NATS user per service plus one for
//! clients, each with least-privilege permissions, rendered into the server configuration.
//!
//! The table here is the one place these permissions are decided; the local stack, the
//! container tests and the Kubernetes manifests all render it. `ARCHITECTURE.md` explains it.

use std::fmt::Write as _;

use crate::record::LogName;
use crate::subject::{self, Endpoint};

/// A NATS user of a Toka deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The kernel service.
    Kernel,
    /// The storage service.
    Storage,
    /// The auth service.
    Auth,
    /// The telemetry service.
    Telemetry,
    /// Clients and agent workers: the kernel's and auth's public endpoints, committed events.
    Client,
    /// Operators and auditors: read, query and verify the logs, storage status, discovery.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 6] = [Role::Kernel, Role::Storage, Role::Auth, Role::Telemetry, Role::Client, Role::Operator];

    /// The user's name (also its credential file's stem).
    pub const fn name(self) -> &'static str {
        match self {
            Role::Kernel => "kernel",
            Role::Storage => "storage",
            Role::Auth => "auth",
            Role::Telemetry => "telemetry",
            Role::Client => "client",
            Role::Operator => "operator",
        }
    }
}

/// Subjects a user may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Publish allow-list.
    pub publish: Vec<String>,
    /// Subscribe allow-list.
    pub subscribe: Vec<String>,
    /// Whether the user may reply to requests it received (NATS `allow_responses`).
    pub responses: bool,
}

/// Every service registers with the NATS services API and makes requests of its own.
const SERVICE_SUBSCRIBE: [&str; 2] = ["$SRV.>", "_INBOX.>"];

fn all_of(service: &str) -> String {
    format!("toka.{}.v1.>", service.trim_start_matches("toka-"))
}

fn subjects(endpoints: &[Endpoint]) -> impl Iterator<Item = String> + '_ {
    endpoints.iter().map(|e| e.subject.to_owned())
}

/// Asking the services API who is there, and consuming the committed-events stream.
fn discovery_and_event_consumers() -> Vec<String> {
    let mut subjects: Vec<String> =
        ["$SRV.PING", "$SRV.INFO", "$SRV.STATS", "$SRV.PING.>", "$SRV.INFO.>", "$SRV.STATS.>"]
            .map(String::from)
            .to_vec();
    subjects.push("$JS.API.CONSUMER.>".to_owned());
    subjects.push(format!("$JS.API.STREAM.INFO.{}", subject::EVENTS_STREAM));
    subjects.push(format!("$JS.ACK.{}.>", subject::EVENTS_STREAM));
    subjects
}

/// The permissions of `role`.
pub fn permissions(role: Role) -> Permissions {
    use subject::*;
    let mut publish: Vec<String> = Vec::new();
    let mut subscribe: Vec<String> = SERVICE_SUBSCRIBE.iter().map(|s| s.to_string()).collect();
    let mut responses = true;
    match role {
        Role::Kernel => {
            subscribe.push(all_of(service::KERNEL));
            subscribe.push(AUTH_HEARTBEAT.to_owned());
            subscribe.push(AUTH_EVENTS.to_owned());
            publish.extend(subjects(&[
                append(LogName::Kernel),
                append(LogName::Audit),
                STORAGE_READ,
                STORAGE_HEAD,
                STORAGE_SNAPSHOT_PUT,
                STORAGE_SNAPSHOT_GET,
                AUTH_DELEGATE,
                AUTH_JWKS,
                AUTH_REVOCATIONS,
            ]));
            // The sequencer lease lives in a JetStream key-value bucket.
            publish.push("$JS.API.>".to_owned());
            publish.push("$KV.>".to_owned());
        }
        Role::Storage => {
            subscribe.push(all_of(service::STORAGE));
            publish.push(ALL_EVENTS.to_owned());
            publish.push("$JS.API.>".to_owned());
        }
        Role::Auth => {
            subscribe.push(all_of(service::AUTH));
            subscribe.push(AUTH_EVENTS.to_owned());
            publish.extend(subjects(&[append(LogName::Audit), STORAGE_HEAD, STORAGE_READ, STORAGE_QUERY]));
            publish.push(AUTH_HEARTBEAT.to_owned());
            // Rotation requests forwarded to the replica that holds the rotation lease.
            publish.push("toka.auth.v1.leader.*.rotate".to_owned());
            // The rotation lease lives in a JetStream key-value bucket.
            publish.push("$JS.API.>".to_owned());
            publish.push("$KV.>".to_owned());
        }
        Role::Telemetry => {
            subscribe.push(all_of(service::TELEMETRY));
            subscribe.push(ALL_EVENTS.to_owned());
            publish.extend(subjects(&[STORAGE_QUERY, STORAGE_STATUS]));
            publish.extend(discovery_and_event_consumers());
        }
        Role::Client => {
            subscribe = vec!["_INBOX.>".to_owned(), ALL_EVENTS.to_owned(), AUTH_HEARTBEAT.to_owned()];
            responses = false;
            publish.push(all_of(service::KERNEL));
            publish.extend(subjects(&[
                AUTH_ISSUE,
                AUTH_DELEGATE,
                AUTH_REVOKE,
                AUTH_JWKS,
                AUTH_ROTATE,
                AUTH_REVOCATIONS,
            ]));
            publish.extend(discovery_and_event_consumers());
        }
        Role::Operator => {
            subscribe = vec!["_INBOX.>".to_owned(), ALL_EVENTS.to_owned()];
            responses = false;
            publish.extend(subjects(&[STORAGE_READ, STORAGE_QUERY, STORAGE_HEAD, STORAGE_VERIFY, STORAGE_STATUS]));
            publish.extend(discovery_and_event_consumers());
        }
    }
    // Any Toka user may ask any service for its health.
    publish.push("toka.*.v1.health".to_owned());
    Permissions { publish, subscribe, responses }
}

/// Where the NATS server listens and keeps JetStream data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// `host:port` for clients.
    pub listen: String,
    /// `host:port` for the HTTP monitoring endpoint, if any.
    pub monitor: Option<String>,
    /// JetStream's store directory.
    pub store_dir: String,
    /// The largest message, in bytes.
    pub max_payload: u32,
}

/// A NATS server configuration with JetStream and one nkey user per role. `users` pairs each
/// role with its public nkey (`U…`).
pub fn render_server_config(settings: &ServerSettings, users: &[(Role, String)]) -> String {
    let mut out = String::new();
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let list = |items: &[String]| items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
    let _ = writeln!(out, "# Generated by `toka nats-config`: one nkey user per Toka role, least privilege.");
    let _ = writeln!(out, "listen: {}", q(&settings.listen));
    if let Some(monitor) = &settings.monitor {
        let _ = writeln!(out, "http: {}", q(monitor));
    }
    let _ = writeln!(out, "max_payload: {}", settings.max_payload);
    let _ = writeln!(out, "jetstream {{\n  store_dir: {}\n}}", q(&settings.store_dir));
    let _ = writeln!(out, "authorization {{\n  users = [");
    for (role, public_key) in users {
        let p = permissions(*role);
        let _ = writeln!(out, "    # {}", role.name());
        let _ = writeln!(out, "    {{");
        let _ = writeln!(out, "      nkey: {}", q(public_key));
        let _ = writeln!(out, "      permissions: {{");
        let _ = writeln!(out, "        publish: {{ allow: [{}] }}", list(&p.publish));
        let _ = writeln!(out, "        subscribe: {{ allow: [{}] }}", list(&p.subscribe));
        if p.responses {
            let _ = writeln!(out, "        allow_responses: true");
        }
        let _ = writeln!(out, "      }}");
        let _ = writeln!(out, "    }}");
    }
    let _ = writeln!(out, "  ]\n}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn may_publish(role: Role, subject: &str) -> bool {
        permissions(role).publish.iter().any(|p| matches(p, subject))
    }

    /// NATS subject matching: `*` one token, `>` the rest.
    fn matches(pattern: &str, subject: &str) -> bool {
        let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
        loop {
            match (p.next(), s.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(_)) => {}
                (Some(a), Some(b)) if a == b => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    #[test]
    fn only_the_kernel_appends_to_the_kernel_log() {
        let kernel_log = subject::append(LogName::Kernel).subject;
        let audit_log = subject::append(LogName::Audit).subject;
        for role in Role::ALL {
            assert_eq!(may_publish(role, kernel_log), role == Role::Kernel, "{role:?}");
            assert_eq!(may_publish(role, audit_log), matches!(role, Role::Kernel | Role::Auth), "{role:?}");
        }
    }

    #[test]
    fn only_storage_publishes_committed_events() {
        for role in Role::ALL {
            assert_eq!(may_publish(role, "toka.evt.kernel.agent.spawned._"), role == Role::Storage, "{role:?}");
        }
    }

    #[test]
    fn clients_reach_public_endpoints_only() {
        assert!(may_publish(Role::Client, subject::KERNEL_SUBMIT.subject));
        assert!(may_publish(Role::Client, subject::AUTH_ISSUE.subject));
        assert!(!may_publish(Role::Client, subject::AUTH_HEARTBEAT), "a client could forge the revocation heartbeat");
        assert!(!may_publish(Role::Client, subject::STORAGE_READ.subject));
        assert!(!may_publish(Role::Client, "$JS.API.STREAM.DELETE.TOKA_EVENTS"));
        assert!(!permissions(Role::Client).responses);
        assert!(!may_publish(Role::Storage, subject::AUTH_HEARTBEAT));
    }

    #[test]
    fn the_config_names_every_user_and_quotes_subjects() {
        let users: Vec<(Role, String)> =
            Role::ALL.iter().map(|r| (*r, format!("U{}", r.name().to_uppercase()))).collect();
        let settings = ServerSettings {
            listen: "127.0.0.1:4222".into(),
            monitor: None,
            store_dir: "/data/js".into(),
            max_payload: 1_048_576,
        };
        let text = render_server_config(&settings, &users);
        for (_, key) in &users {
            assert!(text.contains(&format!("nkey: \"{key}\"")));
        }
        assert!(text.contains("\"$SRV.>\""));
        assert!(text.contains("store_dir: \"/data/js\""));
        assert!(matches("toka.evt.>", "toka.evt.kernel.task.failed.x"));
        assert!(!matches("toka.kernel.v1.>", "toka.kernel.v1"));
    }

    #[test]
    fn each_role_has_its_own_user_name() {
        let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names, ["kernel", "storage", "auth", "telemetry", "client", "operator"]);
    }

    #[test]
    fn discovery_and_the_events_stream_are_open_to_observers_only() {
        for role in [Role::Telemetry, Role::Client, Role::Operator] {
            for subject in ["$SRV.PING", "$SRV.INFO.toka-kernel", "$SRV.STATS.toka-auth.abc"] {
                assert!(may_publish(role, subject), "{role:?} may ask {subject}");
            }
            assert!(may_publish(role, "$JS.API.CONSUMER.CREATE.TOKA_EVENTS"), "{role:?} may consume events");
            assert!(may_publish(role, "$JS.API.STREAM.INFO.TOKA_EVENTS"), "{role:?} may find the stream");
            assert!(may_publish(role, "$JS.ACK.TOKA_EVENTS.c.1.1.1.1.1"), "{role:?} may acknowledge");
            assert!(!may_publish(role, "$JS.API.STREAM.INFO.OTHER"), "{role:?} sees no other stream");
        }
        assert!(!may_publish(Role::Storage, "$SRV.PING"), "services answer discovery, they do not ask");
    }
}
