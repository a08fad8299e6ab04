//! Telemetry on a stack: the kernel and audit logs' events folded into `/metrics`, exact after SIGKILL.

use std::net::SocketAddr;
use std::time::Duration;

use toka_contract::access::Role;
use toka_contract::spec::TaskSpec;
use toka_contract::{Event, Operation};

use crate::assert_eventually;
use crate::harness::{Nats, http_get};
use crate::kernel::{Stack, op_id, spawn, spawned, start_kernel, submit};

/// The telemetry binary on a free admin port; the process and the port.
fn start_telemetry_process(nats: &Nats) -> (std::process::Child, SocketAddr) {
    let admin: SocketAddr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let config = nats.config(Role::Telemetry);
    let child = std::process::Command::new(crate::binaries::binary("toka-telemetry"))
        .env("TOKA_NATS__URL", &config.url)
        .env("TOKA_NATS__NKEY_SEED_FILE", config.nkey_seed_file.unwrap())
        .env("TOKA_ADMIN__LISTEN", admin.to_string())
        .env("TOKA_TELEMETRY__LOG_FILTER", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    (child, admin)
}

/// The value of the series `series` (name and labels as exposed) in a scrape, if present.
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await.1
}

/// The series the test expects, with their values, all present at once.
fn shows(metrics: &str, expected: &[(&str, f64)]) -> bool {
    expected.iter().all(|(series, v)| value(metrics, series) == Some(*v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_in_metrics_is_exactly_what_the_kernel_log_says_across_a_sigkill() {
    let Some(stack) = Stack::start("telemetry-metrics").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k").await;
    let (mut telemetry, admin) = start_telemetry_process(&stack.nats);
    assert_eventually!(Duration::from_secs(20), http_get(admin, "/readyz").await.0 == 200, "telemetry ready");

    // 3 agents, 5 tasks on `jobs` owned by the first, 2 of them claimed and completed.
    let op = stack.operator().await;
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(spawned(&submit(&stack.client, &op, op_id(), spawn(&format!("a{i}"), None)).await.unwrap()));
    }
    let schedule = || {
        Operation::ScheduleTask(TaskSpec {
            agent: agents[0],
            queue: "jobs".parse().unwrap(),
            payload: String::new(),
            priority: 0,
            timeouts: Default::default(),
            retry: Default::default(),
        })
    };
    for _ in 0..5 {
        submit(&stack.client, &op, op_id(), schedule()).await.unwrap();
    }
    for _ in 0..2 {
        let claim = Operation::ClaimTask { queue: "jobs".parse().unwrap(), worker: "w".into() };
        let claimed = submit(&stack.client, &op, op_id(), claim).await.unwrap();
        let Event::TaskClaimed { task, attempt, .. } = claimed.events[0] else { panic!("{claimed:?}") };
        let complete = Operation::CompleteTask { task, attempt, result: "ok".into() };
        submit(&stack.client, &op, op_id(), complete).await.unwrap();
    }
    // Three submits with a token of a key auth never had: one aggregated denial record.
    let forged = "eyJhbGciOiJFZERTQSIsImtpZCI6ImstZWxzZXdoZXJlIiwidHlwIjoiSldUIn0.e30.c2ln";
    for _ in 0..3 {
        submit(&stack.client, forged, op_id(), spawn("x", None)).await.unwrap_err();
    }
    let expected = |scheduled: f64, head: f64| {
        vec![
            // The stack's client token and this test's operator token; the three spawned
            // agents' tokens.
            (r#"toka_tokens_total{kind="issued"}"#, 2.0),
            (r#"toka_tokens_total{kind="delegated"}"#, 3.0),
            (r#"toka_tokens_total{kind="revoked"}"#, 0.0),
            (r#"toka_access_denials_total{action="kernel.submit"}"#, 3.0),
            (r#"toka_telemetry_lag_events{log="kernel"}"#, 0.0),
            (r#"toka_agents{state="running"}"#, 3.0),
            (r#"toka_agents{state="suspended"}"#, 0.0),
            (r#"toka_agents{state="terminated"}"#, 0.0),
            (r#"toka_tasks{queue="jobs",state="scheduled"}"#, scheduled),
            (r#"toka_tasks{queue="jobs",state="completed"}"#, 2.0),
            (r#"toka_queue_ready{queue="jobs"}"#, scheduled),
            ("toka_task_schedule_to_claim_seconds_count", 2.0),
            ("toka_task_claim_to_complete_seconds_count", 2.0),
            (r#"toka_task_claim_to_complete_seconds_bucket{le="60.0"}"#, 2.0),
            (r#"toka_task_claim_to_complete_seconds_bucket{le="+Inf"}"#, 2.0),
            (r#"toka_task_schedule_to_claim_seconds_bucket{le="+Inf"}"#, 2.0),
            ("toka_task_retries_total", 0.0),
            ("toka_task_timeouts_total", 0.0),
            (r#"toka_log_head{log="kernel"}"#, head),
        ]
    };
    // 3 spawns, 5 schedules, 2 claims, 2 completions: records 1 to 12.
    let mut metrics: String;
    assert_eventually!(
        Duration::from_secs(10),
        {
            metrics = scrape(admin).await;
            shows(&metrics, &expected(3.0, 12.0))
        },
        "the series say what the log says:\n{metrics}"
    );
    assert!(!metrics.contains("claimed"), "no task is claimed now:\n{metrics}");

    // SIGKILL, one more task scheduled while telemetry is down, then a restart: exact again.
    telemetry.kill().unwrap();
    telemetry.wait().unwrap();
    submit(&stack.client, &op, op_id(), schedule()).await.unwrap();
    let (mut telemetry, admin) = start_telemetry_process(&stack.nats);
    assert_eventually!(Duration::from_secs(20), http_get(admin, "/readyz").await.0 == 200, "telemetry ready again");
    assert_eventually!(
        Duration::from_secs(10),
        {
            metrics = scrape(admin).await;
            shows(&metrics, &expected(4.0, 13.0))
        },
        "after the restart, the series say what the log says:\n{metrics}"
    );
    telemetry.kill().unwrap();
    telemetry.wait().unwrap();
}
