//! The four services against a secured, containerised NATS: discovery, readiness, health,
//! trace propagation, bad requests, least-privilege permissions, graceful shutdown.

use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt as _;
use serde_json::Value;
use toka_contract::access::Role;
use toka_contract::api::service::{HealthReply, HealthRequest};
use toka_contract::record::LogName;
use toka_contract::schema::Registry;
use toka_contract::subject::{self, service};
use toka_contract::wire::{ERROR_CODE_HEADER, ERROR_HEADER};
use toka_contract::{AgentId, Envelope, Event};
use toka_runtime::config::NatsConfig;

use crate::auth::start_auth;
use crate::harness::{Nats, Running, TempDir, expect_event, http_get, spawn_service, temp_dir};
use crate::storage::start_storage;

/// The four services, in the order they depend on each other (the kernel is ready only once
/// auth and storage answer; auth only once storage does).
async fn start_all(nats: &Nats, dir: &TempDir) -> Vec<Running> {
    let mut running = Vec::new();
    running.push(start_storage(nats, &dir.path().join("storage")).await);
    running.push(start_auth(nats, &dir.path().join("auth"), |_| {}).await);
    running.push(
        spawn_service(service::KERNEL, nats, Role::Kernel, |nats, admin, bus, stop| {
            toka_kernel::run(toka_kernel::Config { nats, admin, ..Default::default() }, bus, stop)
        })
        .await,
    );
    running.push(
        spawn_service(service::TELEMETRY, nats, Role::Telemetry, |nats, admin, bus, stop| {
            toka_telemetry::run(toka_telemetry::Config { nats, admin, ..Default::default() }, bus, stop)
        })
        .await,
    );
    running
}

/// A `$SRV` request as the telemetry user (which may make them); the reply's JSON.
async fn srv(bus: &toka_runtime::bus::Bus, subject: String) -> Option<Value> {
    let reply =
        tokio::time::timeout(Duration::from_secs(2), bus.client().request(subject, "".into())).await.ok()?.ok()?;
    serde_json::from_slice(&reply.payload).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_services_start_answer_discovery_report_ready_and_drain() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("four");
    let running = start_all(&nats, &dir).await;
    let probe = nats.connect(Role::Telemetry).await;
    let registry = Registry::global();
    for svc in &running {
        let (status, body) = http_get(svc.admin, "/livez").await;
        assert_eq!((status, body.as_str()), (200, "ok\n"), "{} livez", svc.name);
        for (verb, schema) in [("PING", "ping_response"), ("INFO", "info_response"), ("STATS", "stats_response")] {
            let reply = srv(&probe, format!("$SRV.{verb}.{}", svc.name))
                .await
                .unwrap_or_else(|| panic!("{} answers $SRV.{verb}", svc.name));
            registry
                .validate(&format!("external/nats-micro-v1/{schema}.json"), &reply)
                .unwrap_or_else(|e| panic!("{} $SRV.{verb} reply breaks the NATS schema: {e}\n{reply}", svc.name));
            assert_eq!(reply["name"], svc.name);
        }
        let health = subject::health(svc.name).unwrap();
        let reply: HealthReply = probe.request(health.subject, &HealthRequest {}).await.unwrap();
        assert!(reply.ready && reply.service == svc.name, "{reply:?}");
        let (_, metrics) = http_get(svc.admin, "/metrics").await;
        assert!(
            metrics.contains("toka_requests_total{endpoint=\"health\",code=\"ok\"}"),
            "{} metrics count the health request:\n{metrics}",
            svc.name
        );
    }
    // Discovery of all services at once answers for each of them.
    let inbox = probe.client().new_inbox();
    let mut pings = probe.client().subscribe(inbox.clone()).await.unwrap();
    probe.client().publish_with_reply("$SRV.PING", inbox, "".into()).await.unwrap();
    let mut names = std::collections::BTreeSet::new();
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(500), pings.next()).await {
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        names.insert(v["name"].as_str().unwrap().to_owned());
    }
    assert_eq!(names, service::ALL.iter().map(|s| s.to_string()).collect());

    for svc in running {
        let (name, admin) = (svc.name, svc.admin);
        svc.stop().await.unwrap_or_else(|e| panic!("{name} stops cleanly: {e}"));
        assert_eq!(http_get(admin, "/livez").await.0, 0, "{name} admin server stopped");
        assert!(srv(&probe, format!("$SRV.PING.{name}")).await.is_none(), "{name} deregistered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_with_trace_context_is_handled_in_the_same_trace() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("trace");
    let storage = start_storage(&nats, dir.path()).await;
    let bus = nats.connect(Role::Storage).await;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").as_str());
    let request = async_nats::Request::new().payload("{}".into()).headers(headers);
    let reply = bus.client().send_request(subject::STORAGE_HEALTH.subject, request).await.unwrap();
    let traceparent = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("reply carries the handler's traceparent");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts[1], trace_id, "handled in the caller's trace: {traceparent}");
    assert_ne!(parts[2], "00f067aa0ba902b7", "in a span of its own");
    // Without a trace context the handler starts a new trace.
    let reply = bus.client().request(subject::STORAGE_HEALTH.subject, "{}".into()).await.unwrap();
    let fresh = reply.headers.as_ref().and_then(|h| h.get("traceparent")).map(|v| v.as_str().to_owned()).unwrap();
    assert!(!fresh.contains(trace_id));
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_gets_a_body_and_error_headers_naming_schema_and_pointer() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("bad-request");
    let _storage = start_storage(&nats, &dir.path().join("storage")).await;
    let auth = start_auth(&nats, &dir.path().join("auth"), |_| {}).await;
    let bus = nats.connect(Role::Auth).await;
    for (body, pointer) in [(&br#"{"verbose":true}"#[..], Some("")), (&b"not json"[..], None)] {
        let reply = bus.client().request(subject::AUTH_HEALTH.subject, body.to_vec().into()).await.unwrap();
        let headers = reply.headers.as_ref().expect("error headers");
        assert_eq!(headers.get(ERROR_CODE_HEADER).map(|v| v.as_str()), Some("400"));
        assert!(headers.get(ERROR_HEADER).is_some());
        let doc: Value = serde_json::from_slice(&reply.payload).unwrap();
        Registry::global().validate("wire/error.v1.json", &doc).unwrap();
        assert_eq!(doc["error"]["code"], "bad_request");
        if let Some(pointer) = pointer {
            assert_eq!(doc["error"]["details"]["schema"], "api/service.health.request.v1.json");
            assert_eq!(doc["error"]["details"]["pointer"], pointer);
        }
    }
    auth.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_neither_append_to_storage_nor_forge_an_event() {
    let Some(nats) = Nats::start().await else { return };
    let storage = nats.connect(Role::Storage).await;
    let publisher = nats.connect(Role::StorageState).await;
    let kernel = nats.connect(Role::Kernel).await;
    let client = nats.connect(Role::Operator).await;
    let observer = nats.connect(Role::Telemetry).await;

    // What storage would receive on the kernel log's append subject.
    let append = subject::append(LogName::Kernel).subject;
    let mut appends = storage.client().subscribe(append).await.unwrap();
    let mut events = observer.client().subscribe(subject::ALL_EVENTS).await.unwrap();
    storage.client().flush().await.unwrap();
    observer.client().flush().await.unwrap();

    // The client tries both; the server refuses the publishes.
    client.client().publish(append, "forged append".into()).await.unwrap();
    let forged = Envelope::new(
        LogName::Kernel,
        1,
        0,
        1_764_150_000_000_000,
        Event::AgentResumed { agent: AgentId::mint(1, 1, 0) },
        None,
    );
    let forged_subject = subject::event(LogName::Kernel, &forged.data);
    client.client().publish(forged_subject.clone(), serde_json::to_vec(&forged).unwrap().into()).await.unwrap();
    client.client().flush().await.unwrap();

    // Positive controls: the kernel may append and storage's publisher may publish, over the same bus.
    kernel.client().publish(append, "kernel append".into()).await.unwrap();
    kernel.client().flush().await.unwrap();
    let genuine = Envelope::new(
        LogName::Kernel,
        2,
        0,
        1_764_150_000_000_001,
        Event::AgentResumed { agent: AgentId::mint(1, 2, 0) },
        None,
    );
    publisher
        .client()
        .publish(subject::event(LogName::Kernel, &genuine.data), serde_json::to_vec(&genuine).unwrap().into())
        .await
        .unwrap();
    publisher.client().flush().await.unwrap();

    // The server handled the client's publishes (flushed) before the controls, and delivers
    // in the order it handles: had it let a forged message through, that would come first.
    let first_append = tokio::time::timeout(Duration::from_secs(2), appends.next()).await.unwrap().unwrap();
    assert_eq!(&first_append.payload[..], b"kernel append", "the client's append never reached storage");
    let first_event = expect_event(&mut events, Duration::from_secs(2)).await;
    assert_eq!(first_event, genuine, "the client's forged event never reached subscribers");

    // A request is refused too: nothing answers it.
    let _responder = storage.client().subscribe(append).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(3), client.client().request(append, "x".into())).await;
    assert!(!matches!(refused, Ok(Ok(_))), "the client got a reply from the append subject");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anonymous_or_unknown_user_cannot_connect() {
    let Some(nats) = Nats::start().await else { return };
    // With no auth running, the callout answers nobody, so nothing without a key gets in.
    let anonymous = NatsConfig { nkey_seed_file: None, connect_timeout_ms: 500, ..nats.config(Role::Operator) };
    assert!(toka_runtime::bus::Bus::connect(&anonymous, "anonymous", &Role::Operator.inbox()).await.is_err());
    let dir = crate::harness::temp_dir("stranger");
    let (seed, _) = toka_runtime::deploy::new_user_key().unwrap();
    let path = dir.path().join("stranger.nk");
    toka_runtime::deploy::write_secret(&path, &seed).unwrap();
    let stranger = NatsConfig { nkey_seed_file: Some(path), connect_timeout_ms: 500, ..nats.config(Role::Operator) };
    assert!(toka_runtime::bus::Bus::connect(&stranger, "stranger", &Role::Operator.inbox()).await.is_err());
    // The positive control: the deployment's own operator seed connects.
    let operator = nats.config(Role::Operator);
    assert!(toka_runtime::bus::Bus::connect(&operator, "operator", &Role::Operator.inbox()).await.is_ok());
}
