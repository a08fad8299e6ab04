//! Who may publish and subscribe to what on the bus: one NATS user per service plus one for
//! clients, each with least-privilege permissions, rendered into the server configuration.
//!
//! The table here is the one place these permissions are decided; the local stack, the
//! container tests and the Kubernetes manifests all render it. `ARCHITECTURE.md` explains it.

use std::fmt::Write as _;

use crate::record::LogName;
use crate::subject::{self, Endpoint};

/// A NATS user of a Toka deployment.
///
/// Each service has two: the one it serves requests with, which may publish only the requests
/// it makes and replies to inboxes, and a `-state` user for the work that is not serving (the
/// leases in key-value buckets, publishing committed events), which serves nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The kernel service.
    Kernel,
    /// The kernel's sequencer lease (the `toka_kernel` key-value bucket).
    KernelState,
    /// The storage service.
    Storage,
    /// Storage's publishing of committed events (`toka.evt.>` and the `TOKA_EVENTS` stream).
    StorageState,
    /// The auth service.
    Auth,
    /// Auth's rotation lease (the `toka_auth` bucket) and its revocation heartbeat.
    AuthState,
    /// The telemetry service.
    Telemetry,
    /// Clients and agent workers: the kernel's and auth's public endpoints, committed events.
    Client,
    /// Operators and auditors: read, query and verify the logs, storage status, discovery.
    Operator,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 9] = [
        Role::Kernel,
        Role::KernelState,
        Role::Storage,
        Role::StorageState,
        Role::Auth,
        Role::AuthState,
        Role::Telemetry,
        Role::Client,
        Role::Operator,
    ];

    /// The user's name (also its credential file's stem).
    pub const fn name(self) -> &'static str {
        match self {
            Role::Kernel => "kernel",
            Role::KernelState => "kernel-state",
            Role::Storage => "storage",
            Role::StorageState => "storage-state",
            Role::Auth => "auth",
            Role::AuthState => "auth-state",
            Role::Telemetry => "telemetry",
            Role::Client => "client",
            Role::Operator => "operator",
        }
    }

    /// The role a service (a [`subject::service`] name) serves requests as.
    pub fn of_service(service: &str) -> Option<Role> {
        match service {
            subject::service::KERNEL => Some(Role::Kernel),
            subject::service::STORAGE => Some(Role::Storage),
            subject::service::AUTH => Some(Role::Auth),
            subject::service::TELEMETRY => Some(Role::Telemetry),
            _ => None,
        }
    }

    /// The role for a service's work that is not serving requests, if it has any.
    pub const fn state(self) -> Option<Role> {
        match self {
            Role::Kernel => Some(Role::KernelState),
            Role::Storage => Some(Role::StorageState),
            Role::Auth => Some(Role::AuthState),
            _ => None,
        }
    }

    /// The inbox prefix of the user's connections: replies to its requests come there, and it
    /// may subscribe to nothing else of `_INBOX`.
    pub fn inbox(self) -> String {
        format!("{INBOXES}.{}", self.name())
    }
}

/// Where every reply goes: a reply subject outside it is refused by the services' host, and
/// no service may publish anywhere else unasked.
pub const INBOXES: &str = "_INBOX";

/// Whether `subject` is an inbox: `_INBOX.` and at least one more token. Services reply there
/// and nowhere else.
pub fn is_inbox(subject: &str) -> bool {
    subject.strip_prefix(INBOXES).is_some_and(|rest| rest.len() > 1 && rest.starts_with('.'))
}

/// Subjects a user may publish to and subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// Publish allow-list.
    pub publish: Vec<String>,
    /// Subscribe allow-list.
    pub subscribe: Vec<String>,
}

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

/// What a lease in the key-value bucket `bucket` needs: the account's JetStream limits (read
/// when the bucket is made), the bucket's stream, its direct reads, its keys.
fn key_value(bucket: &str) -> [String; 5] {
    [
        "$JS.API.INFO".to_owned(),
        format!("$JS.API.STREAM.*.KV_{bucket}"),
        format!("$JS.API.DIRECT.GET.KV_{bucket}.>"),
        format!("$JS.API.STREAM.MSG.GET.KV_{bucket}"),
        format!("$KV.{bucket}.>"),
    ]
}

/// The permissions of `role`.
pub fn permissions(role: Role) -> Permissions {
    use subject::*;
    // Every user receives replies on its own inboxes only.
    let mut subscribe: Vec<String> = vec![format!("{}.>", role.inbox())];
    let mut publish: Vec<String> = Vec::new();
    let serves = |service: &str, subscribe: &mut Vec<String>, publish: &mut Vec<String>| {
        // Registered with the services API; answers requests by replying to inboxes only.
        subscribe.push(all_of(service));
        subscribe.push("$SRV.>".to_owned());
        publish.push(format!("{INBOXES}.>"));
    };
    match role {
        Role::Kernel => {
            serves(service::KERNEL, &mut subscribe, &mut publish);
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
            // Counting its standbys for `toka.kernel.v1.status`.
            publish.push(format!("$SRV.PING.{}", service::KERNEL));
        }
        Role::KernelState => publish.extend(key_value("toka_kernel")),
        Role::Storage => serves(service::STORAGE, &mut subscribe, &mut publish),
        Role::StorageState => {
            publish.push(ALL_EVENTS.to_owned());
            publish.push(format!("$JS.API.STREAM.*.{EVENTS_STREAM}"));
        }
        Role::Auth => {
            serves(service::AUTH, &mut subscribe, &mut publish);
            subscribe.push(AUTH_EVENTS.to_owned());
            publish.extend(subjects(&[append(LogName::Audit), STORAGE_HEAD, STORAGE_READ, STORAGE_QUERY]));
            // Rotation requests forwarded to the replica that holds the rotation lease.
            publish.push("toka.auth.v1.leader.*.rotate".to_owned());
        }
        Role::AuthState => {
            publish.extend(key_value("toka_auth"));
            publish.push(AUTH_HEARTBEAT.to_owned());
        }
        Role::Telemetry => {
            serves(service::TELEMETRY, &mut subscribe, &mut publish);
            subscribe.push(ALL_EVENTS.to_owned());
            publish.extend(subjects(&[STORAGE_QUERY, STORAGE_STATUS]));
            publish.extend(discovery_and_event_consumers());
        }
        Role::Client => {
            subscribe.extend([ALL_EVENTS.to_owned(), AUTH_HEARTBEAT.to_owned()]);
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
            subscribe.push(ALL_EVENTS.to_owned());
            publish.extend(subjects(&[STORAGE_READ, STORAGE_QUERY, STORAGE_HEAD, STORAGE_VERIFY, STORAGE_STATUS]));
            publish.extend(subjects(&[KERNEL_STATUS, AUTH_ISSUE, AUTH_REVOKE, AUTH_ROTATE, AUTH_JWKS]));
            publish.extend(discovery_and_event_consumers());
        }
    }
    // Any Toka user may ask any service for its health; the state users ask nothing.
    if !matches!(role, Role::KernelState | Role::StorageState | Role::AuthState) {
        publish.push("toka.*.v1.health".to_owned());
    }
    Permissions { publish, subscribe }
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
            assert_eq!(may_publish(role, "toka.evt.kernel.agent.spawned._"), role == Role::StorageState, "{role:?}");
        }
    }

    #[test]
    fn clients_reach_public_endpoints_only() {
        assert!(may_publish(Role::Client, subject::KERNEL_SUBMIT.subject));
        assert!(may_publish(Role::Client, subject::AUTH_ISSUE.subject));
        assert!(!may_publish(Role::Client, subject::AUTH_HEARTBEAT), "a client could forge the revocation heartbeat");
        assert!(!may_publish(Role::Client, subject::STORAGE_READ.subject));
        assert!(!may_publish(Role::Client, "$JS.API.STREAM.DELETE.TOKA_EVENTS"));
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
        assert_eq!(
            names,
            [
                "kernel",
                "kernel-state",
                "storage",
                "storage-state",
                "auth",
                "auth-state",
                "telemetry",
                "client",
                "operator"
            ]
        );
        assert_eq!(Role::Kernel.inbox(), "_INBOX.kernel");
        for service in subject::service::ALL {
            let role = Role::of_service(service).unwrap();
            assert_eq!(format!("toka-{}", role.name()), service);
        }
        assert_eq!(Role::of_service("toka-nothing"), None);
        assert_eq!(Role::Kernel.state(), Some(Role::KernelState));
        assert_eq!(Role::Telemetry.state(), None);
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

    fn may_subscribe(role: Role, subject: &str) -> bool {
        permissions(role).subscribe.iter().any(|p| matches(p, subject))
    }

    #[test]
    fn every_user_reads_its_own_inbox_only() {
        for role in Role::ALL {
            assert!(may_subscribe(role, &format!("{}.abc.1", role.inbox())), "{role:?} reads its replies");
            for other in Role::ALL.into_iter().filter(|o| *o != role) {
                assert!(!may_subscribe(role, &format!("{}.abc.1", other.inbox())), "{role:?} reads {other:?}'s");
            }
            assert!(!may_subscribe(role, "_INBOX.abc"), "{role:?} reads a stranger's");
        }
    }

    #[test]
    fn a_serving_user_publishes_replies_to_inboxes_and_its_own_requests_only() {
        let attacks = [
            "$KV.toka_kernel.sequencer",
            "$KV.toka_auth.rotation",
            "toka.evt.kernel.agent.spawned.x",
            "$JS.API.STREAM.PURGE.TOKA_EVENTS",
            "$JS.API.STREAM.DELETE.KV_toka_kernel",
            "toka.auth.v1.heartbeat",
        ];
        for role in [Role::Kernel, Role::Storage, Role::Auth, Role::Telemetry] {
            assert!(may_publish(role, "_INBOX.client.abc.1"), "{role:?} answers");
            for subject in attacks {
                assert!(!may_publish(role, subject), "{role:?} could be made to publish on {subject}");
            }
        }
        // The work that is not serving lives on the state users, each with its own.
        assert!(may_publish(Role::KernelState, "$KV.toka_kernel.sequencer"));
        assert!(!may_publish(Role::KernelState, "$KV.toka_auth.rotation"));
        assert!(may_publish(Role::AuthState, "$KV.toka_auth.rotation"));
        assert!(may_publish(Role::AuthState, "toka.auth.v1.heartbeat"));
        assert!(may_publish(Role::StorageState, "$JS.API.STREAM.INFO.TOKA_EVENTS"));
        assert!(!may_publish(Role::StorageState, "$JS.API.STREAM.INFO.KV_toka_kernel"));
        for state in [Role::KernelState, Role::AuthState, Role::StorageState] {
            assert!(!may_publish(state, "_INBOX.client.abc.1"), "{state:?} answers nobody");
            assert!(!may_subscribe(state, "toka.kernel.v1.submit"), "{state:?} serves nothing");
        }
    }

    #[test]
    fn an_inbox_is_under_the_inbox_root() {
        for yes in ["_INBOX.client.abc", "_INBOX.x"] {
            assert!(is_inbox(yes), "{yes}");
        }
        for no in
            ["_INBOX", "_INBOX.", "_INBOXES.x", "$KV.toka_kernel.sequencer", "toka.evt.kernel.x", "x._INBOX.y", ""]
        {
            assert!(!is_inbox(no), "{no}");
        }
    }
}
