//! Who may publish and subscribe to what on the bus: the accounts, one NATS user per service
//! role with least-privilege permissions, and what a client connecting with a Toka token may do
//! ([`token_permissions`], which auth's callout puts in the user it mints for the connection),
//! rendered into the server configuration.
//!
//! The tables here are the one place these permissions are decided; the local stack, the
//! container tests and the Kubernetes manifests all render them. `ARCHITECTURE.md` explains them.

use std::fmt::Write as _;

use crate::capability::{Action, Capability, Pattern};
use crate::record::LogName;
use crate::subject::{self, Endpoint};

/// A NATS user of a Toka deployment with a key of its own (clients have none: they connect with
/// a Toka token, [`token_permissions`]).
///
/// Each service has two: the one it serves requests with, which may publish only the requests
/// it makes and replies to inboxes, and a `-state` user for the work that is not serving (the
/// leases in key-value buckets, publishing committed events), which serves nothing. Auth has two
/// more, outside the `TOKA` account: the callout user, alone in `AUTH`, and a system user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The kernel service.
    Kernel,
    /// The kernel's sequencer lease (the `toka_kernel` key-value bucket).
    KernelState,
    /// The storage service.
    Storage,
    /// Storage's publishing of committed events (`toka.evt.>` and the `TOKA_EVENTS` and `TOKA_AUDIT`
    /// streams).
    StorageState,
    /// The auth service.
    Auth,
    /// Auth's rotation lease (the `toka_auth` bucket) and its revocation heartbeat.
    AuthState,
    /// Auth answering the server's authorization requests (the `AUTH` account).
    AuthCallout,
    /// Auth listing and closing client connections (the `SYS` account).
    AuthSystem,
    /// The telemetry service.
    Telemetry,
    /// Operators and auditors: issue the first tokens with the admin key, read, query and verify
    /// the logs, storage and kernel status, discovery.
    Operator,
}

/// The accounts of a deployment: the subjects of one are invisible to the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Account {
    /// Only the callout user: the server's authorization requests.
    Auth,
    /// Toka itself: the services, the operator, and every client the callout admits.
    Toka,
    /// The server's system account.
    Sys,
}

impl Account {
    /// Every account.
    pub const ALL: [Account; 3] = [Account::Auth, Account::Toka, Account::Sys];

    /// Its name in the server configuration (and the `aud` of the users minted for it).
    pub const fn name(self) -> &'static str {
        match self {
            Account::Auth => "AUTH",
            Account::Toka => "TOKA",
            Account::Sys => "SYS",
        }
    }
}

/// Where the server sends authorization requests, in the `AUTH` account.
pub const CALLOUT_SUBJECT: &str = "$SYS.REQ.USER.AUTH";

impl Role {
    /// Every role.
    pub const ALL: [Role; 10] = [
        Role::Kernel,
        Role::KernelState,
        Role::Storage,
        Role::StorageState,
        Role::Auth,
        Role::AuthState,
        Role::AuthCallout,
        Role::AuthSystem,
        Role::Telemetry,
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
            Role::AuthCallout => "auth-callout",
            Role::AuthSystem => "auth-system",
            Role::Telemetry => "telemetry",
            Role::Operator => "operator",
        }
    }

    /// The account the user belongs to.
    pub const fn account(self) -> Account {
        match self {
            Role::AuthCallout => Account::Auth,
            Role::AuthSystem => Account::Sys,
            _ => Account::Toka,
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

/// Asking the services API who is there.
const DISCOVERY: [&str; 6] = ["$SRV.PING", "$SRV.INFO", "$SRV.STATS", "$SRV.PING.>", "$SRV.INFO.>", "$SRV.STATS.>"];

/// Reading the stream of `log`'s committed events: direct gets (a message by sequence, the next
/// or the last on a subject), nothing that creates a consumer or changes the stream.
fn direct_gets(log: LogName) -> [String; 2] {
    let stream = subject::stream_of(log);
    [format!("$JS.API.DIRECT.GET.{stream}"), format!("$JS.API.DIRECT.GET.{stream}.>")]
}

/// Discovery, and reading every committed event (live, and from the streams with their
/// information): telemetry and operators.
fn discovery_and_event_reads(publish: &mut Vec<String>, subscribe: &mut Vec<String>) {
    publish.extend(DISCOVERY.map(String::from));
    for log in LogName::ALL {
        publish.extend(direct_gets(log));
        publish.push(format!("$JS.API.STREAM.INFO.{}", subject::stream_of(log)));
    }
    subscribe.extend([subject::ALL_EVENTS.to_owned(), format!("{}.>", subject::LIVE_ROOT)]);
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

/// The durable consumer telemetry reads the kernel log's stream with.
pub const TELEMETRY_CONSUMER: &str = "telemetry";

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
                AUTH_AGENT_TOKEN,
                AUTH_SERVICE_JWKS,
                AUTH_SERVICE_REVOCATIONS,
            ]));
            // Counting its standbys for `toka.kernel.v1.status`.
            publish.push(format!("$SRV.PING.{}", service::KERNEL));
        }
        Role::KernelState => publish.extend(key_value("toka_kernel")),
        Role::Storage => serves(service::STORAGE, &mut subscribe, &mut publish),
        Role::StorageState => {
            publish.push(ALL_EVENTS.to_owned());
            publish.extend(LogName::ALL.map(|log| format!("$JS.API.STREAM.*.{}", stream_of(log))));
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
            // Its durable pull consumer on each log's stream, and nothing else of the consumer
            // API.
            for log in LogName::ALL {
                let (stream, durable) = (subject::stream_of(log), TELEMETRY_CONSUMER);
                for api in ["CREATE", "DURABLE.CREATE", "DELETE", "INFO", "MSG.NEXT"] {
                    publish.push(format!("$JS.API.CONSUMER.{api}.{stream}.{durable}"));
                }
                publish.push(format!("$JS.API.CONSUMER.CREATE.{stream}.{durable}.>"));
            }
            publish.extend(subjects(&[STORAGE_QUERY, STORAGE_STATUS]));
            discovery_and_event_reads(&mut publish, &mut subscribe);
        }
        Role::AuthCallout => {
            // Alone in its account: the server's requests, and the answers to them.
            subscribe.push(CALLOUT_SUBJECT.to_owned());
            publish.push("$SYS._INBOX.>".to_owned());
        }
        Role::AuthSystem => {
            publish.push("$SYS.REQ.SERVER.PING.CONNZ".to_owned());
            publish.push("$SYS.REQ.SERVER.*.KICK".to_owned());
        }
        Role::Operator => {
            subscribe.extend([AUTH_HEARTBEAT.to_owned(), ALERTS.to_owned()]);
            publish.extend(subjects(&[STORAGE_READ, STORAGE_QUERY, STORAGE_HEAD, STORAGE_VERIFY, STORAGE_STATUS]));
            publish.extend(subjects(&[
                KERNEL_STATUS,
                AUTH_ISSUE,
                AUTH_DELEGATE,
                AUTH_REVOKE,
                AUTH_ROTATE,
                AUTH_JWKS,
                AUTH_REVOCATIONS,
            ]));
            discovery_and_event_reads(&mut publish, &mut subscribe);
        }
    }
    // Any Toka user may ask any service for its health; the state users ask nothing.
    if role.account() == Account::Toka && !matches!(role, Role::KernelState | Role::StorageState | Role::AuthState) {
        publish.push("toka.*.v1.health".to_owned());
    }
    Permissions { publish, subscribe }
}

/// The inbox prefix of a client connecting with the token `jti`: its replies come there, and
/// it may subscribe to nothing else of `_INBOX`.
pub fn token_inbox(jti: &str) -> String {
    format!("{INBOXES}.{jti}")
}

/// What a connection authenticated with a Toka token may do on the bus, from the token's id and
/// capabilities. Auth's callout mints a user with these permissions for each such connection.
///
/// Every token may publish the kernel's client endpoints (the kernel checks the token in each
/// request), delegate and revoke, read the keys and revocations, ask for health and discovery,
/// and receive replies on its own inbox. `issue` and `rotate` need a capability with those
/// actions; committed kernel events (live, and from the stream by direct gets) and alerts need
/// `read` on every agent. No token reads audit events or another token's inbox, or touches
/// any other JetStream API: no consumers, no key-value buckets.
pub fn token_permissions(jti: &str, caps: &[Capability]) -> Permissions {
    use subject::*;
    let mut publish: Vec<String> = subjects(&[
        KERNEL_SUBMIT,
        KERNEL_SUBMIT_BATCH,
        KERNEL_AGENT_GET,
        KERNEL_AGENT_LIST,
        KERNEL_TASK_GET,
        KERNEL_TASK_LIST,
        KERNEL_STATUS,
        AUTH_DELEGATE,
        AUTH_REVOKE,
        AUTH_JWKS,
        AUTH_REVOCATIONS,
    ])
    .collect();
    let holds = |action: Action| caps.iter().any(|c| c.actions.contains(action));
    if holds(Action::Issue) {
        publish.push(AUTH_ISSUE.subject.to_owned());
    }
    if holds(Action::Rotate) {
        publish.push(AUTH_ROTATE.subject.to_owned());
    }
    publish.push("toka.*.v1.health".to_owned());
    publish.extend(DISCOVERY.map(String::from));
    let mut subscribe = vec![format!("{}.>", token_inbox(jti)), AUTH_HEARTBEAT.to_owned()];
    let reads_every_agent = caps.iter().any(|c| c.resource == Pattern::AnyAgent && c.actions.contains(Action::Read));
    if reads_every_agent {
        let kernel_events = events_of(LogName::Kernel);
        publish.extend(direct_gets(LogName::Kernel));
        subscribe.extend(live(&kernel_events));
        subscribe.push(kernel_events);
        subscribe.push(ALERTS.to_owned());
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

/// The public keys auth's callout answers with: the account key that signs the users it mints
/// (`A…`) and the curve key the server encrypts authorization requests to (`X…`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalloutKeys {
    /// The issuer's public account key.
    pub issuer: String,
    /// The callout's public xkey.
    pub xkey: String,
}

/// A NATS server configuration: JetStream, the accounts, one nkey user per role in its account
/// with least-privilege permissions, and the auth callout for every other connection. `users`
/// pairs each role with its public nkey (`U…`).
pub fn render_server_config(settings: &ServerSettings, users: &[(Role, String)], callout: &CalloutKeys) -> String {
    let mut out = String::new();
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let list = |items: &[String]| items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ");
    let _ = writeln!(
        out,
        "# Generated by `toka nats-config`: the accounts, one nkey user per Toka role with least\n\
         # privilege, and auth's callout for every client (they connect with a Toka token)."
    );
    let _ = writeln!(out, "listen: {}", q(&settings.listen));
    if let Some(monitor) = &settings.monitor {
        let _ = writeln!(out, "http: {}", q(monitor));
    }
    let _ = writeln!(out, "max_payload: {}", settings.max_payload);
    let _ = writeln!(out, "jetstream {{\n  store_dir: {}\n}}", q(&settings.store_dir));
    let _ = writeln!(out, "accounts {{");
    for account in Account::ALL {
        let _ = writeln!(out, "  {} {{", account.name());
        if account == Account::Toka {
            let _ = writeln!(out, "    jetstream: enabled");
        }
        let _ = writeln!(out, "    users = [");
        for (role, public_key) in users.iter().filter(|(r, _)| r.account() == account) {
            let p = permissions(*role);
            let _ = writeln!(out, "      # {}", role.name());
            let _ = writeln!(out, "      {{");
            let _ = writeln!(out, "        nkey: {}", q(public_key));
            let _ = writeln!(out, "        permissions: {{");
            let _ = writeln!(out, "          publish: {{ allow: [{}] }}", list(&p.publish));
            let _ = writeln!(out, "          subscribe: {{ allow: [{}] }}", list(&p.subscribe));
            let _ = writeln!(out, "        }}");
            let _ = writeln!(out, "      }}");
        }
        let _ = writeln!(out, "    ]\n  }}");
    }
    let _ = writeln!(out, "}}");
    let _ = writeln!(out, "system_account: {}", Account::Sys.name());
    let keys: Vec<String> = users.iter().map(|(_, k)| k.clone()).collect();
    let _ = writeln!(out, "authorization {{\n  auth_callout {{");
    let _ = writeln!(out, "    issuer: {}", q(&callout.issuer));
    let _ = writeln!(out, "    account: {}", Account::Auth.name());
    let _ = writeln!(out, "    xkey: {}", q(&callout.xkey));
    let _ = writeln!(out, "    # Users with keys of their own are not asked about.");
    let _ = writeln!(out, "    auth_users: [{}]", list(&keys));
    let _ = writeln!(out, "  }}\n}}");
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
    fn only_services_read_keys_and_revocations_on_their_own_subjects() {
        for subject in [subject::AUTH_SERVICE_JWKS.subject, subject::AUTH_SERVICE_REVOCATIONS.subject] {
            for role in Role::ALL {
                assert_eq!(may_publish(role, subject), role == Role::Kernel, "{role:?} {subject}");
            }
            let everything = [Capability::new(Pattern::Tokens, &[Action::Issue, Action::Rotate, Action::Revoke])];
            assert!(!token_may(&everything, subject), "{subject}");
        }
    }

    #[test]
    fn only_the_kernel_names_agents_tokens() {
        for role in Role::ALL {
            assert_eq!(may_publish(role, subject::AUTH_AGENT_TOKEN.subject), role == Role::Kernel, "{role:?}");
        }
        let everything = [
            Capability::new(Pattern::AnyAgent, &[Action::Spawn, Action::Read]),
            Capability::new(Pattern::Tokens, &[Action::Issue, Action::Rotate]),
        ];
        assert!(!token_may(&everything, subject::AUTH_AGENT_TOKEN.subject));
    }

    #[test]
    fn only_storage_publishes_committed_events() {
        for role in Role::ALL {
            assert_eq!(may_publish(role, "toka.evt.kernel.agent.spawned._"), role == Role::StorageState, "{role:?}");
        }
    }

    fn token_may(caps: &[Capability], publish: &str) -> bool {
        token_permissions("JTI", caps).publish.iter().any(|p| matches(p, publish))
    }

    fn token_reads(caps: &[Capability], subject: &str) -> bool {
        token_permissions("JTI", caps).subscribe.iter().any(|p| matches(p, subject))
    }

    #[test]
    fn a_token_reaches_public_endpoints_and_its_own_inbox_only() {
        let worker = [Capability::new(Pattern::AnyQueue, &[Action::Claim])];
        for endpoint in
            [subject::KERNEL_SUBMIT, subject::KERNEL_TASK_LIST, subject::KERNEL_STATUS, subject::AUTH_DELEGATE]
        {
            assert!(token_may(&worker, endpoint.subject), "{}", endpoint.subject);
        }
        assert!(token_may(&worker, "toka.storage.v1.health") && token_may(&worker, "$SRV.PING.toka-kernel"));
        for refused in [
            subject::AUTH_ISSUE.subject,
            subject::AUTH_ROTATE.subject,
            subject::AUTH_HEARTBEAT,
            subject::STORAGE_READ.subject,
            subject::append(LogName::Kernel).subject,
            "$JS.API.STREAM.DELETE.TOKA_EVENTS",
            "$JS.API.CONSUMER.CREATE.TOKA_EVENTS.x.toka.evt.kernel.>",
            "$KV.toka_kernel.sequencer",
            "_INBOX.OTHER.1",
        ] {
            assert!(!token_may(&worker, refused), "a worker token may publish {refused}");
        }
        assert!(token_reads(&worker, "_INBOX.JTI.abc.1"));
        for refused in ["_INBOX.OTHER.1", "_INBOX.kernel.1", "toka.evt.kernel.agent.spawned.x", "toka.evt.audit.x"] {
            assert!(!token_reads(&worker, refused), "a worker token reads {refused}");
        }
        let admin = [Capability::new(Pattern::Tokens, &[Action::Issue, Action::Rotate])];
        assert!(token_may(&admin, subject::AUTH_ISSUE.subject) && token_may(&admin, subject::AUTH_ROTATE.subject));
    }

    #[test]
    fn reading_every_agent_reads_kernel_events_and_never_audit() {
        let reader = [Capability::new(Pattern::AnyAgent, &[Action::Read])];
        for subject in ["toka.evt.kernel.agent.spawned.x", "toka.live.kernel.agent.spawned.x", "toka.alert.denials"] {
            assert!(token_reads(&reader, subject), "{subject}");
        }
        assert!(token_may(&reader, "$JS.API.DIRECT.GET.TOKA_EVENTS"));
        assert!(token_may(&reader, "$JS.API.DIRECT.GET.TOKA_EVENTS.toka.evt.kernel.agent.*.x"));
        for refused in [
            "$JS.API.DIRECT.GET.TOKA_AUDIT",
            "$JS.API.DIRECT.GET.TOKA_AUDIT.toka.evt.audit.>",
            "$JS.API.DIRECT.GET.KV_toka_kernel.$KV.toka_kernel.sequencer",
            "$JS.API.STREAM.INFO.TOKA_EVENTS",
            "$JS.API.STREAM.MSG.GET.TOKA_EVENTS",
            "$JS.API.CONSUMER.CREATE.TOKA_EVENTS.c1.toka.evt.kernel.>",
            "$JS.API.CONSUMER.CREATE.TOKA_EVENTS",
            "$JS.API.CONSUMER.DURABLE.CREATE.TOKA_EVENTS.c1",
            "$JS.API.CONSUMER.MSG.NEXT.TOKA_EVENTS.c1",
            "$JS.API.CONSUMER.DELETE.TOKA_EVENTS.c1",
            "$JS.API.STREAM.PURGE.TOKA_EVENTS",
            "$JS.API.INFO",
        ] {
            assert!(!token_may(&reader, refused), "{refused}");
        }
        for refused in ["toka.evt.audit.auth.token.issued.x", "toka.live.audit.auth.token.issued.x"] {
            assert!(!token_reads(&reader, refused), "{refused}");
        }
        // Without `read` on every agent: no events, no alerts, no stream.
        let worker = [Capability::new(Pattern::AnyQueue, &[Action::Claim])];
        assert!(!token_reads(&worker, "toka.live.kernel.agent.spawned.x") && !token_reads(&worker, "toka.alert.x"));
        assert!(!token_may(&worker, "$JS.API.DIRECT.GET.TOKA_EVENTS"));
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
        let callout = CalloutKeys { issuer: "AISSUER".into(), xkey: "XKEY".into() };
        let text = render_server_config(&settings, &users, &callout);
        for (_, key) in &users {
            assert!(text.contains(&format!("nkey: \"{key}\"")));
        }
        let accounts = text.find("accounts {").unwrap();
        let (toka, auth, sys) =
            (text.find("  TOKA {").unwrap(), text.find("  AUTH {").unwrap(), text.find("  SYS {").unwrap());
        assert!(accounts < auth && auth < text.find("UAUTH-CALLOUT").unwrap(), "the callout user is in AUTH");
        assert!(text.find("UAUTH-CALLOUT").unwrap() < toka && toka < text.find("UKERNEL").unwrap());
        assert!(sys < text.find("UAUTH-SYSTEM").unwrap());
        assert!(text.contains("issuer: \"AISSUER\"") && text.contains("xkey: \"XKEY\""));
        assert!(text.contains("system_account: SYS"));
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
                "auth-callout",
                "auth-system",
                "telemetry",
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
        for role in [Role::Telemetry, Role::Operator] {
            for subject in ["$SRV.PING", "$SRV.INFO.toka-kernel", "$SRV.STATS.toka-auth.abc"] {
                assert!(may_publish(role, subject), "{role:?} may ask {subject}");
            }
            for stream in ["TOKA_EVENTS", "TOKA_AUDIT"] {
                assert!(may_publish(role, &format!("$JS.API.DIRECT.GET.{stream}")), "{role:?} may read {stream}");
                assert!(may_publish(role, &format!("$JS.API.STREAM.INFO.{stream}")), "{role:?} may find {stream}");
                for refused in ["CONSUMER.CREATE.{}.c.toka.evt.>", "CONSUMER.DURABLE.CREATE.{}.c", "STREAM.PURGE.{}"] {
                    let subject = format!("$JS.API.{}", refused.replace("{}", stream));
                    assert!(!may_publish(role, &subject), "{role:?} may publish {subject}");
                }
            }
            assert!(may_subscribe(role, "toka.live.audit.auth.token.issued.x"), "{role:?} follows the audit log");
            assert!(!may_publish(role, "$JS.API.DIRECT.GET.KV_toka_kernel"), "{role:?} may read a bucket");
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
            assert!(may_publish(role, "_INBOX.01JTI.abc.1"), "{role:?} answers");
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
        assert!(may_publish(Role::StorageState, "$JS.API.STREAM.UPDATE.TOKA_AUDIT"));
        assert!(!may_publish(Role::StorageState, "$JS.API.STREAM.INFO.KV_toka_kernel"));
        for state in [Role::KernelState, Role::AuthState, Role::StorageState] {
            assert!(!may_publish(state, "_INBOX.01JTI.abc.1"), "{state:?} answers nobody");
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
