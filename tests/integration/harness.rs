//! The test harness: a secured NATS in a container, services run in-process, and helpers that
//! wait with bounded patience.
//!
//! NATS runs from the local image `toka-nats:<version>` (the version in `scripts/nats.version`,
//! built by `scripts/build-nats-image.sh`;
//! nothing can be pulled) with a server configuration generated from `toka_contract::access`, so
//! every test talks to the same least-privilege bus a deployment gets. Without Docker, container
//! tests print why they skipped; with `TOKA_REQUIRE_DOCKER=1` (as `.ci/run` sets) they fail.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use testcontainers::core::{IntoContainerPort as _, WaitFor};
use testcontainers::runners::AsyncRunner as _;
use testcontainers::{ContainerAsync, GenericImage, ImageExt as _};
use toka_contract::Envelope;
use toka_contract::KernelRecord;
use toka_contract::access::{Role, ServerSettings};
use toka_contract::api::storage::{ReadReply, ReadRequest};
use toka_contract::record::{Chain, Hash, LogName, Record};
use toka_contract::schema::{Registry, ReplyContract};
use toka_contract::subject;
use toka_contract::testing::{Sample, kernel_records};
use toka_runtime::bus::Bus;
use toka_runtime::cli::ShutdownSignal;
use toka_runtime::config::{AdminConfig, NatsConfig};
use toka_runtime::deploy;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The NATS image the container tests run: its name, and its tag, the pinned NATS version.
pub const NATS_IMAGE: (&str, &str) = ("toka-nats", NATS_VERSION);

/// The NATS version, pinned in one place for the scripts and the tests.
const NATS_VERSION: &str = include_str!("../../scripts/nats.version").trim_ascii();

/// Polls `$cond` (an async expression giving `bool`) until it holds or `$within` passes.
#[macro_export]
macro_rules! assert_eventually {
    ($within:expr, $cond:expr, $($msg:tt)+) => {{
        let deadline = tokio::time::Instant::now() + $within;
        loop {
            if $cond {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!("not within {:?}: {}", $within, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }};
}

pub use tempfile::TempDir;

/// A fresh directory under the system's temporary directory, removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new().prefix(&format!("toka-{tag}-")).tempdir().unwrap()
}

/// Whether container tests can run here; prints why not, or panics under
/// `TOKA_REQUIRE_DOCKER=1`.
fn docker_ready() -> bool {
    let image = format!("{}:{}", NATS_IMAGE.0, NATS_IMAGE.1);
    let reason =
        match std::process::Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &image]).output() {
            Ok(out) if out.status.success() => return true,
            Ok(out) => format!(
                "image {image} is not available ({}); build it with scripts/build-nats-image.sh",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => format!("docker is not available ({e})"),
        };
    if std::env::var("TOKA_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
        panic!("TOKA_REQUIRE_DOCKER=1 but {reason}");
    }
    eprintln!("skipped: {reason}");
    false
}

/// The Python that imports `modules` (`.ci/run` installs PyJWT, cryptography and nats-py into
/// `.tools/venv` with `scripts/install-python.sh`), if any; prints why not, or panics under
/// `TOKA_REQUIRE_PYTHON=1`.
pub fn python(modules: &str) -> Option<PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let candidates = [std::env::var_os("TOKA_PYTHON").map(PathBuf::from), Some(root.join(".tools/venv/bin/python"))];
    let found = candidates.into_iter().flatten().find(|python| {
        std::process::Command::new(python)
            .args(["-c", &format!("import {modules}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if found.is_none() {
        let reason = format!("no Python with {modules} (scripts/install-python.sh installs them)");
        if std::env::var("TOKA_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
            panic!("TOKA_REQUIRE_PYTHON=1 but {reason}");
        }
        eprintln!("skipped: {reason}");
    }
    found
}

/// A secured NATS server with JetStream in a container, removed on drop.
pub struct Nats {
    _container: ContainerAsync<GenericImage>,
    pub url: String,
    generated: deploy::Generated,
    _dir: TempDir,
}

impl Nats {
    /// Starts NATS, or returns `None` (after printing why) where Docker is unavailable.
    pub async fn start() -> Option<Nats> {
        toka_runtime::observe::init_for_tests();
        if !docker_ready() {
            return None;
        }
        let dir = temp_dir("nats");
        let settings = ServerSettings {
            listen: "0.0.0.0:4222".into(),
            monitor: None,
            store_dir: "/data/jetstream".into(),
            max_payload: 1 << 20,
        };
        // The deployment's keys and configuration, as `toka nats-config` makes them.
        let generated = deploy::generate(dir.path(), &settings).unwrap();
        let config = std::fs::read_to_string(&generated.server_config).unwrap();
        let container = GenericImage::new(NATS_IMAGE.0, NATS_IMAGE.1)
            .with_exposed_port(4222.tcp())
            .with_wait_for(WaitFor::message_on_stderr("Server is ready"))
            .with_copy_to("/etc/nats.conf", config.into_bytes())
            .with_cmd(["-c", "/etc/nats.conf"])
            .start()
            .await
            .expect("NATS container starts");
        let port = container.get_host_port_ipv4(4222).await.unwrap();
        Some(Nats { _container: container, url: format!("nats://127.0.0.1:{port}"), generated, _dir: dir })
    }

    /// The NATS configuration of a `role` user (with its state user's seed, for a service
    /// that has one).
    pub fn config(&self, role: Role) -> NatsConfig {
        NatsConfig {
            url: self.url.clone(),
            nkey_seed_file: Some(self.generated.seeds[&role].clone()),
            state_nkey_seed_file: role.state().map(|state| self.generated.seeds[&state].clone()),
            request_timeout_ms: 2_000,
            connect_timeout_ms: 5_000,
        }
    }

    /// Auth's callout settings for this server.
    pub fn callout(&self) -> toka_auth::CalloutConfig {
        toka_auth::CalloutConfig {
            nkey_seed_file: Some(self.generated.seeds[&Role::AuthCallout].clone()),
            issuer_seed_file: Some(self.generated.callout_issuer.clone()),
            xkey_seed_file: Some(self.generated.callout_xkey.clone()),
            system_nkey_seed_file: Some(self.generated.seeds[&Role::AuthSystem].clone()),
        }
    }

    /// The connection settings for a client (which connects with a token, no key).
    pub fn client_config(&self) -> NatsConfig {
        NatsConfig { nkey_seed_file: None, state_nkey_seed_file: None, ..self.config(Role::Operator) }
    }

    /// A client acting with `token`, on a connection admitted with it.
    pub async fn client(&self, token: &str) -> toka_client::Client {
        toka_client::Client::connect(&self.client_config(), "test-client", token).await.unwrap()
    }

    /// A connection as `role`.
    pub async fn connect(&self, role: Role) -> Bus {
        Bus::connect(&self.config(role), &format!("test-{}", role.name()), &role.inbox()).await.unwrap()
    }

    /// Every record of `log`, page by page, as the operator reads it.
    pub async fn read_log<B>(&self, log: LogName) -> Vec<Record<B>>
    where
        ReadReply<B>: ReplyContract,
    {
        let operator = self.connect(Role::Operator).await;
        let mut records = Vec::new();
        loop {
            let request =
                ReadRequest { log, from_seq: records.len() as u64 + 1, max_records: 1_000, max_bytes: 900_000 };
            let page: ReadReply<B> = operator.request(subject::STORAGE_READ.subject, &request).await.unwrap();
            if page.records.is_empty() {
                return records;
            }
            records.extend(page.records);
        }
    }
}

/// `n` sample kernel records of `kind` after (`seq`, `hash`) (`toka_contract::testing`).
pub fn records_after(after: (u64, Hash), n: u64, kind: Sample) -> Vec<KernelRecord> {
    kernel_records(&mut Chain { seq: after.0, hash: after.1 }, n, kind)
}

/// A service running in-process; [`Running::stop`] shuts it down like SIGTERM would.
pub struct Running {
    pub name: &'static str,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    /// Signals shutdown and waits (boundedly) for `run` to return; its result.
    pub async fn stop(mut self) -> Result<(), String> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match tokio::time::timeout(Duration::from_secs(20), &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(format!("{} panicked: {e}", self.name)),
            Err(_) => Err(format!("{} did not stop within 20 s", self.name)),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A free loopback port for an admin server.
fn free_admin() -> AdminConfig {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    AdminConfig { listen: listener.local_addr().unwrap() }
}

/// Runs a service's `run` in-process as `role`, and waits until `/readyz` says ready.
pub async fn spawn_service<F, Fut, E>(name: &'static str, nats: &Nats, role: Role, start: F) -> Running
where
    F: FnOnce(NatsConfig, AdminConfig, Bus, ShutdownSignal) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: std::fmt::Display,
{
    let admin = free_admin();
    let addr = admin.listen;
    let bus = Bus::connect(&nats.config(role), name, &role.inbox()).await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let shutdown: ShutdownSignal = Box::pin(async move {
        let _ = stopped.await;
    });
    let fut = start(nats.config(role), admin, bus, shutdown);
    let task = tokio::spawn(async move { fut.await.map_err(|e| e.to_string()) });
    let running = Running { name, admin: addr, stop: Some(stop), task };
    assert_eventually!(Duration::from_secs(15), http_get(addr, "/readyz").await.0 == 200, "{name} ready");
    running
}

/// A minimal HTTP/1.0 GET: (status, body); status 0 when nothing answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else { return (0, String::new()) };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

/// The next message on `sub`, decoded as an envelope and validated against its schema.
pub async fn expect_event(sub: &mut async_nats::Subscriber, within: Duration) -> Envelope {
    use futures::StreamExt as _;
    let message = tokio::time::timeout(within, sub.next()).await.expect("an event in time").expect("subscription open");
    let doc: serde_json::Value = serde_json::from_slice(&message.payload).expect("event is JSON");
    Registry::global()
        .validate("envelope/envelope.v1.json", &doc)
        .unwrap_or_else(|e| panic!("event breaks the envelope schema: {e}"));
    let envelope: Envelope = serde_json::from_value(doc).unwrap();
    assert_eq!(
        message.subject.as_str(),
        toka_contract::subject::event(envelope.tokalog, &envelope.data),
        "published on its subject"
    );
    envelope
}
