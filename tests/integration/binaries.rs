//! The service binaries as an operator runs them: command line, configuration errors, exit
//! codes, OTLP export, SIGTERM.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use toka_contract::access::Role;
use toka_contract::api::service::{HealthReply, HealthRequest};
use toka_contract::subject;

use crate::assert_eventually;
use crate::harness::Nats;

/// A service binary next to this test binary (`make test` builds them first).
pub(crate) fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().and_then(|deps| deps.parent()).unwrap().join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build --workspace --bins` (make test does)",
        bin.display()
    );
    bin
}

#[test]
fn an_invalid_configuration_exits_64_naming_the_key() {
    let out = Command::new(binary("toka-auth")).args(["--set", "shutdown.grace_ms=soon"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("grace_ms"), "{stderr}");
    let out = Command::new(binary("toka-kernel"))
        .env("TOKA_NATS__URLL", "x")
        .env("TOKA_NATS__REQUEST_TIMEOUT_MS", "-5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("request_timeout_ms"));
}

#[test]
fn dump_config_prints_every_key_as_toml_and_help_explains_the_layers() {
    let out = Command::new(binary("toka-storage"))
        .args(["--dump-config", "--set", "storage.backend=memory"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for key in [
        "[nats]",
        "url = \"nats://127.0.0.1:4222\"",
        "[admin]",
        "[telemetry]",
        "[shutdown]",
        "[storage]",
        "backend = \"memory\"",
    ] {
        assert!(text.contains(key), "{key} missing from\n{text}");
    }
    let out = Command::new(binary("toka-telemetry")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(help.contains("TOKA_NATS__URL") && help.contains("--dump-config") && help.contains("SIGTERM"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exports_its_traces_over_otlp_and_exits_0_on_sigterm() {
    let Some(nats) = Nats::start().await else { return };
    // A stand-in collector: records the paths of the requests it gets and answers 200.
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let (paths, received) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for stream in collector.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut length = 0;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).is_err() || header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let _ = paths.send(line.split_whitespace().nth(1).unwrap_or("").to_owned());
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    let config = nats.config(Role::Auth);
    let keys = crate::harness::temp_dir("otlp-auth");
    let mut child = Command::new(binary("toka-auth"))
        .env("TOKA_AUTH__KEY_DIR", keys.path())
        .env("TOKA_NATS__URL", &config.url)
        .env("TOKA_NATS__NKEY_SEED_FILE", config.nkey_seed_file.unwrap())
        .env("TOKA_NATS__STATE_NKEY_SEED_FILE", config.state_nkey_seed_file.unwrap())
        .env("TOKA_ADMIN__LISTEN", "127.0.0.1:0")
        .env("TOKA_TELEMETRY__OTLP_ENDPOINT", &endpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = nats.connect(Role::Operator).await;
    assert_eventually!(
        Duration::from_secs(20),
        client.request::<HealthRequest, HealthReply>(subject::AUTH_HEALTH.subject, &HealthRequest {}).await.is_ok(),
        "toka-auth answers"
    );
    let pid = child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM is a clean stop");
    let mut seen = Vec::new();
    while let Ok(path) = received.recv_timeout(Duration::from_secs(5)) {
        seen.push(path);
        if seen.iter().any(|p| p == "/v1/traces") {
            break;
        }
    }
    assert!(seen.iter().any(|p| p == "/v1/traces"), "the handled request's trace reached the collector: {seen:?}");
}
