//! The bus from outside, with an independent client (nats-py): a request whose reply subject
//! points outside the inboxes (at a lease key, an event subject, the JetStream API) makes no
//! service write there; the services drop such requests and count them.

use std::time::Duration;

use toka_client::Client;
use toka_contract::access::Role;
use toka_contract::api::service::{HealthReply, HealthRequest};
use toka_contract::api::storage::{VerifyReply, VerifyRequest};
use toka_contract::capability::{Action, Capability, Pattern};
use toka_contract::record::{Decision, LogName};
use toka_contract::spec::AgentSpec;
use toka_contract::{Event, Operation, subject};
use toka_runtime::lease::Lease;

use crate::harness::{http_get, python};
use crate::kernel::{Stack, start_kernel};

/// How long the attacker sends.
const ATTACK: Duration = Duration::from_secs(30);

/// Sends requests to health, JWKS and discovery with reply subjects outside the inboxes, as
/// a client with a token, for the given seconds; prints how many it sent.
const ATTACKER: &str = r#"
import asyncio, sys, time, nats

async def main(url, token, jti, seconds, agent):
    nc = await nats.connect(url, token=token, inbox_prefix=("_INBOX." + jti).encode())
    replies = ["$KV.toka_kernel.sequencer", "$KV.toka_auth.rotation",
               "toka.evt.kernel.agent.spawned." + agent, "$JS.API.STREAM.PURGE.TOKA_EVENTS"]
    subjects = ["toka.kernel.v1.health", "toka.auth.v1.jwks", "$SRV.PING"]
    end, sent = time.monotonic() + float(seconds), 0
    while time.monotonic() < end:
        for s in subjects:
            for r in replies:
                await nc.publish(s, b"{}", reply=r)
                sent += 1
        await nc.flush()
        await asyncio.sleep(0.05)
    await nc.close()
    print(sent)

asyncio.run(main(*sys.argv[1:]))
"#;

/// The events stream's message count, as an operator sees it.
async fn stream_messages(stack: &Stack) -> u64 {
    let js = async_nats::jetstream::new(stack.nats.connect(Role::Operator).await.client().clone());
    js.get_stream(subject::EVENTS_STREAM).await.unwrap().info().await.unwrap().state.messages
}

/// The events stream's message count once everything committed so far is published (the
/// count holds still for half a second).
async fn settled_stream_messages(stack: &Stack) -> u64 {
    let mut last = stream_messages(stack).await;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = stream_messages(stack).await;
        if now == last && now > 0 {
            return now;
        }
        last = now;
    }
    panic!("the events stream never settled");
}

/// The value of the counter line starting `prefix` in `/metrics` at `admin`.
async fn counter(admin: std::net::SocketAddr, prefix: &str) -> u64 {
    let (_, metrics) = http_get(admin, "/metrics").await;
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_replying_outside_the_inboxes_are_dropped_and_move_nothing() {
    let Some(python) = python("nats, nkeys") else { return };
    let Some(stack) = Stack::start("bus-replies").await else { return };
    let (kernel, _) = start_kernel(&stack.nats, "k1").await;
    let client = Client::new(stack.client.clone(), stack.operator().await);
    let spec = AgentSpec { name: "target".parse().unwrap(), parent: None, limits: Default::default() };
    let spawned = client.submit(Operation::SpawnAgent(spec)).await.unwrap();
    let Event::AgentSpawned { agent, .. } = spawned.events[0] else { panic!() };
    let before = client.status().await.unwrap();
    assert_eq!((before.instance.as_str(), before.lease_holder.as_deref()), ("k1", Some("k1")));
    let auth_state = stack.nats.connect(Role::AuthState).await;
    let probe =
        Lease::open(&auth_state, toka_auth::LEASE_BUCKET, toka_auth::LEASE_KEY, "probe", Duration::from_secs(15));
    let probe = probe.await.unwrap();
    let auth_lease = || probe.holder();
    let auth_holder = auth_lease().await;
    assert!(auth_holder.is_some(), "auth holds its rotation lease");
    // The attacker's token, issued (an audit event) before the stream is counted.
    let token = stack.token("attacker", vec![Capability::new(Pattern::AnyQueue, &[Action::Claim])]).await;
    let jti = toka_runtime::token::unverified_jti(&token).unwrap();
    let events_before = settled_stream_messages(&stack).await;

    // The attack, with real work going on beside it.
    let attacker = tokio::process::Command::new(&python)
        .args(["-c", ATTACKER, &stack.nats.url, &token, &jti])
        .args([&ATTACK.as_secs().to_string(), &agent.to_string()])
        .output();
    let work = async {
        let mut done = 0;
        let deadline = tokio::time::Instant::now() + ATTACK;
        while tokio::time::Instant::now() < deadline {
            let op = Operation::EmitObservation { agent, kind: "test.tick".parse().unwrap(), body: done.to_string() };
            client.submit(op).await.expect("the kernel keeps serving");
            done += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        done
    };
    let (attacked, real) = tokio::join!(attacker, work);
    let attacked = attacked.unwrap();
    assert!(attacked.status.success(), "the attacker failed: {}", String::from_utf8_lossy(&attacked.stderr));
    let sent: u64 = String::from_utf8_lossy(&attacked.stdout).trim().parse().unwrap();
    assert!(sent > 100, "the attack sent {sent} requests");

    // The kernel kept its lease throughout, and so did auth.
    let after = client.status().await.unwrap();
    assert_eq!((after.instance.as_str(), after.lease_holder.as_deref()), ("k1", Some("k1")));
    assert_eq!(after.head_seq, before.head_seq + real, "every real operation, nothing else");
    assert_eq!(auth_lease().await, auth_holder);
    // The stream moved with the real events only: one observation each.
    let expected = events_before + real;
    crate::assert_eventually!(Duration::from_secs(10), stream_messages(&stack).await >= expected, "published");
    assert_eq!(stream_messages(&stack).await, expected, "no event was forged through a reply");
    let operator = stack.nats.connect(Role::Operator).await;
    let verified: VerifyReply = operator
        .request(subject::STORAGE_VERIFY.subject, &VerifyRequest { log: LogName::Kernel, from_seq: None, to_seq: None })
        .await
        .unwrap();
    assert_eq!((verified.verified, verified.first_break), (after.head_seq, None), "the log verifies");
    // The hosts dropped the requests and counted them, each of the four reply subjects.
    let health = r#"toka_requests_dropped_total{endpoint="health",reason="reply_subject"}"#;
    let each = sent / 3;
    crate::assert_eventually!(
        Duration::from_secs(10),
        counter(kernel.admin, health).await == each,
        "the kernel counted {each}"
    );
    let jwks = r#"toka_requests_dropped_total{endpoint="jwks",reason="reply_subject"}"#;
    crate::assert_eventually!(
        Duration::from_secs(10),
        counter(stack.auth.admin, jwks).await == each,
        "auth counted {each}"
    );
}

/// Subscribes with a token of its own to every inbox it can name, including the victim's, for
/// the given seconds, asking the kernel's health now and then as its positive control; prints
/// what each subscription received, the errors the server sent, and how many of its own
/// requests were answered.
const SPY: &str = r#"
import asyncio, json, sys, nats

async def main(url, token, jti, victim, seconds):
    errors = []
    async def on_error(e):
        errors.append(str(e))
    nc = await nats.connect(url, token=token, inbox_prefix=("_INBOX." + jti).encode(), error_cb=on_error)
    received = {}
    for s in ["_INBOX.>", "_INBOX.*.>", ">", "_INBOX." + victim + ".>"]:
        received[s] = 0
        async def count(msg, s=s):
            received[s] += 1
        await nc.subscribe(s, cb=count)
    await nc.flush()
    print("ready", flush=True)
    answered, end = 0, asyncio.get_running_loop().time() + float(seconds)
    while asyncio.get_running_loop().time() < end:
        try:
            await nc.request("toka.kernel.v1.health", b"{}", timeout=2)
            answered += 1
        except Exception as e:
            errors.append("own request: " + str(e))
        await asyncio.sleep(0.5)
    await nc.close()
    print(json.dumps({"received": received, "errors": errors, "answered": answered}), flush=True)

asyncio.run(main(*sys.argv[1:]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reads_no_inbox_but_its_own() {
    use tokio::io::AsyncBufReadExt as _;
    let Some(python) = python("nats, nkeys") else { return };
    let Some(stack) = Stack::start("bus-spy").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k1").await;
    let victim_token = stack.operator().await;
    let victim_jti = toka_runtime::token::unverified_jti(&victim_token).unwrap();
    let victim = stack.nats.client(&victim_token).await;
    let spy_token = stack.token("spy", vec![Capability::new(Pattern::AnyAgent, &[Action::Read])]).await;
    let spy_jti = toka_runtime::token::unverified_jti(&spy_token).unwrap();
    let mut spy = tokio::process::Command::new(&python)
        .args(["-c", SPY, &stack.nats.url, &spy_token, &spy_jti, &victim_jti, "6"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(spy.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.unwrap().unwrap();
    assert_eq!(ready.as_deref(), Some("ready"), "the spy started");

    // The victim's work while the spy listens: a delegated token, a spawn, a task claimed.
    let delegate = toka_contract::api::auth::DelegateRequest {
        token: victim_token.clone(),
        sub: None,
        capabilities: vec![Capability::new(Pattern::AnyAgent, &[Action::Read])],
        ttl_ms: 600_000,
        one_time: false,
    };
    let child: toka_contract::api::auth::TokenReply =
        victim.bus().request(subject::AUTH_DELEGATE.subject, &delegate).await.expect("the delegation is answered");
    assert!(!child.token.is_empty());
    let spec = AgentSpec { name: "victim".parse().unwrap(), parent: None, limits: Default::default() };
    let spawned = victim.submit(Operation::SpawnAgent(spec)).await.expect("the victim's spawn is answered");
    let Event::AgentSpawned { agent, .. } = spawned.events[0] else { panic!() };
    let task = toka_contract::spec::TaskSpec {
        agent,
        queue: "spied".parse().unwrap(),
        payload: "secret payload".into(),
        priority: 0,
        timeouts: Default::default(),
        retry: Default::default(),
    };
    victim.submit(Operation::ScheduleTask(task)).await.expect("the victim's schedule is answered");
    let worker = toka_client::worker::Worker::new(victim.clone(), "spied".parse().unwrap(), "victim-worker".into());
    let claimed = worker.claim().await.expect("the claim is answered").expect("the victim claimed its task");
    assert_eq!(claimed.payload, "secret payload");

    let output = tokio::time::timeout(Duration::from_secs(30), spy.wait_with_output()).await.unwrap().unwrap();
    let report = lines.next_line().await.unwrap().unwrap_or_default();
    assert!(output.status.success(), "the spy failed: {}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    for (subject, count) in report["received"].as_object().unwrap() {
        assert_eq!(count, 0, "the spy received {count} messages on {subject}: {report}");
    }
    let errors: Vec<String> =
        report["errors"].as_array().unwrap().iter().map(|e| e.as_str().unwrap().to_lowercase()).collect();
    for subject in ["_INBOX.>", "_INBOX.*.>", ">", &format!("_INBOX.{victim_jti}.>")] {
        let refused = format!("permissions violation for subscription to \"{}\"", subject.to_lowercase());
        assert!(errors.iter().any(|e| e.contains(&refused)), "{subject} not refused: {report}");
    }
    assert!(report["answered"].as_u64().unwrap() >= 5, "the spy's own inbox works: {report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_token_are_refused_and_counted_by_reason() {
    use toka_contract::api::auth::{AUDIENCE, Claims, ISSUER};
    let Some(stack) = Stack::start("bus-refusals").await else { return };
    let caps = vec![Capability::new(Pattern::AnyQueue, &[Action::Claim])];
    let now = toka_runtime::now_us() / 1_000_000;
    let claims = |jti: u128, exp: u64| Claims {
        iss: ISSUER.into(),
        sub: "mallory".parse().unwrap(),
        aud: AUDIENCE.into(),
        exp,
        nbf: now - 7_200,
        iat: now - 7_200,
        jti: toka_contract::TokenId::from_u128(jti),
        caps: caps.clone(),
        chain: Vec::new(),
        depth: 0,
        once: false,
        root: None,
    };
    // Signed with the deployment's own key, an hour past its expiry; and by another deployment.
    let ring = toka_auth::keys::KeyStore::open(&stack.keys_dir()).unwrap().load().unwrap();
    let expired = ring.signing().unwrap().sign(&claims(1, now - 3_600)).unwrap();
    let elsewhere = toka_auth::signing::SigningKey::generate("k-elsewhere").unwrap();
    let foreign = elsewhere.sign(&claims(2, now + 3_600)).unwrap();
    let revoked = stack.token("revoked", caps.clone()).await;
    stack.revoke(toka_runtime::token::unverified_jti(&revoked).unwrap().parse().unwrap()).await;
    let cases = [
        ("no_token", None),
        ("malformed", Some("garbage")),
        ("expired", Some(expired.as_str())),
        ("unknown_key", Some(foreign.as_str())),
        ("revoked", Some(revoked.as_str())),
    ];
    for (reason, token) in cases {
        let options = match token {
            None => async_nats::ConnectOptions::new(),
            Some(token) => async_nats::ConnectOptions::with_token(token.to_owned()),
        };
        let refused = options.connect(stack.nats.url.as_str()).await.expect_err(reason);
        assert_eq!(refused.kind(), async_nats::ConnectErrorKind::AuthorizationViolation, "{reason}: {refused}");
    }
    // The positive control: a valid token connects, with its own inbox.
    let good = stack.token("good", caps).await;
    let admitted = stack.nats.client(&good).await;
    let health: Result<HealthReply, _> = admitted.bus().request(subject::AUTH_HEALTH.subject, &HealthRequest {}).await;
    assert!(health.unwrap().ready, "the admitted client is answered");
    for (reason, _) in cases {
        let line = format!("toka_auth_callout_refusals_total{{reason=\"{reason}\"}}");
        assert_eq!(counter(stack.auth.admin, &line).await, 1, "{reason} counted once");
    }
    // And in the audit log, aggregated.
    let refused_connections = || async {
        (stack.audit_log().await.into_iter())
            .filter(|r| r.op.decision == Decision::Deny && r.op.action == "connect")
            .map(|r| r.op.count)
            .sum::<u32>()
    };
    crate::assert_eventually!(
        Duration::from_secs(10),
        refused_connections().await == cases.len() as u32,
        "the audit log counts every refused connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_or_its_ancestor_closes_its_open_connections() {
    use async_nats::connection::State;
    let Some(stack) = Stack::start("bus-revoke").await else { return };
    let caps = vec![Capability::new(Pattern::AnyQueue, &[Action::Claim])];
    let delegate = |parent: &str| toka_contract::api::auth::DelegateRequest {
        token: parent.to_owned(),
        sub: None,
        capabilities: caps.clone(),
        ttl_ms: 600_000,
        one_time: false,
    };
    let parent = stack.token("parent", caps.clone()).await;
    let mut children = Vec::new();
    for _ in 0..2 {
        let child: toka_contract::api::auth::TokenReply =
            stack.operators.request(subject::AUTH_DELEGATE.subject, &delegate(&parent)).await.unwrap();
        children.push(child.token);
    }
    let bystander = stack.token("bystander", caps.clone()).await;
    let [first, second] = [&children[0], &children[1]].map(|t| t.clone());
    let (parent_conn, first_conn, second_conn, bystander_conn) = (
        stack.nats.client(&parent).await,
        stack.nats.client(&first).await,
        stack.nats.client(&second).await,
        stack.nats.client(&bystander).await,
    );
    let open = |c: &toka_client::Client| c.bus().client().connection_state() == State::Connected;
    let answered = |c: toka_client::Client| async move {
        c.bus().request::<HealthRequest, HealthReply>(subject::AUTH_HEALTH.subject, &HealthRequest {}).await.is_ok()
    };
    let jti = |t: &str| toka_runtime::token::unverified_jti(t).unwrap().parse().unwrap();

    // The token itself.
    stack.revoke(jti(&first)).await;
    crate::assert_eventually!(Duration::from_secs(5), !open(&first_conn), "the revoked token's connection closed");
    assert!(open(&parent_conn) && open(&second_conn) && open(&bystander_conn), "only the revoked one closed");
    assert!(answered(second_conn.clone()).await, "its sibling is still served");

    // Its ancestor: the ancestor's connection and its other descendant's.
    stack.revoke(jti(&parent)).await;
    crate::assert_eventually!(
        Duration::from_secs(5),
        !open(&parent_conn) && !open(&second_conn),
        "the ancestor's and its descendant's connections closed"
    );
    assert!(open(&bystander_conn) && answered(bystander_conn.clone()).await, "the bystander is still served");
    // They stay out: reconnecting with a revoked token is refused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!open(&first_conn) && !open(&parent_conn) && !open(&second_conn));
    let line = r#"toka_auth_callout_refusals_total{reason="revoked"}"#;
    assert!(counter(stack.auth.admin, line).await > 0, "their reconnects were refused as revoked");
}

/// Tries each `[name, subject, body]` request of its fourth argument (JSON) and each
/// subscription of its fifth, as a client with a token; prints, for each, what answered (the
/// subject of a stream message, or the reply's start) or the server's errors that named it.
const JETSTREAM_PROBE: &str = r#"
import asyncio, json, sys, nats

async def main(url, token, jti, requests, subscriptions):
    errors = []
    async def on_error(e):
        errors.append(str(e))
    nc = await nats.connect(url, token=token, inbox_prefix=("_INBOX." + jti).encode(), error_cb=on_error)
    report = {}
    for name, subject, body in json.loads(requests):
        payload = b"" if body is None else json.dumps(body).encode()
        try:
            msg = await nc.request(subject, payload, timeout=0.7)
            headers = msg.headers or {}
            report[name] = {"answered": headers.get("Nats-Subject") or msg.data.decode()[:200]}
        except Exception:
            await asyncio.sleep(0.1)
            report[name] = {"errors": [e for e in errors if subject.lower() in e.lower()]}
    for subject in json.loads(subscriptions):
        await nc.subscribe(subject)
        await nc.flush()
        await asyncio.sleep(0.2)
        report["sub " + subject] = {"errors": [e for e in errors if subject.lower() in e.lower()]}
    await nc.close()
    print(json.dumps(report))

asyncio.run(main(*sys.argv[1:]))
"#;

/// Runs [`JETSTREAM_PROBE`] with `token`; the report.
async fn probe_jetstream(
    python: &std::path::Path,
    stack: &Stack,
    token: &str,
    requests: &serde_json::Value,
    subscriptions: &[&str],
) -> serde_json::Value {
    let jti = toka_runtime::token::unverified_jti(token).unwrap();
    let output = tokio::process::Command::new(python)
        .args(["-c", JETSTREAM_PROBE, &stack.nats.url, token, &jti, &requests.to_string()])
        .arg(serde_json::to_string(subscriptions).unwrap())
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output).await.unwrap().unwrap();
    assert!(output.status.success(), "the probe failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Whether the report says the server refused `name` as a permissions violation.
fn refused(report: &serde_json::Value, name: &str) -> bool {
    report[name]["errors"].as_array().is_some_and(|errors| {
        errors.iter().any(|e| e.as_str().unwrap_or("").to_lowercase().contains("permissions violation"))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_token_reads_kernel_events_by_direct_get_and_touches_no_other_jetstream_api() {
    let Some(python) = python("nats, nkeys") else { return };
    let Some(stack) = Stack::start("bus-jetstream").await else { return };
    let (_kernel, _) = start_kernel(&stack.nats, "k1").await;
    let client = Client::new(stack.client.clone(), stack.operator().await);
    let spec = AgentSpec { name: "watched".parse().unwrap(), parent: None, limits: Default::default() };
    let spawned = client.submit(Operation::SpawnAgent(spec)).await.unwrap();
    let Event::AgentSpawned { agent, .. } = spawned.events[0] else { panic!() };
    settled_stream_messages(&stack).await;
    let spawned_subject = format!("toka.evt.kernel.agent.spawned.{agent}");
    let reader = stack.token("reader", vec![Capability::new(Pattern::AnyAgent, &[Action::Read])]).await;
    // The account's streams, as the kernel's lease user (which may ask) counts them.
    let lease_user = async_nats::jetstream::new(stack.nats.connect(Role::KernelState).await.client().clone());
    let streams = lease_user.query_account().await.unwrap().streams;
    let consumer = |name: &str, extra: serde_json::Value| {
        let mut config = serde_json::json!({"name": name, "ack_policy": "none", "filter_subject": "toka.evt.kernel.>"});
        config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::json!({"stream_name": subject::EVENTS_STREAM, "config": config})
    };
    let requests = serde_json::json!([
        ["next event", "$JS.API.DIRECT.GET.TOKA_EVENTS", {"seq": 1, "next_by_subj": "toka.evt.kernel.>"}],
        ["last about the agent", format!("$JS.API.DIRECT.GET.TOKA_EVENTS.{spawned_subject}"), null],
        ["audit by direct get", "$JS.API.DIRECT.GET.TOKA_AUDIT", {"seq": 1}],
        ["stream info", "$JS.API.STREAM.INFO.TOKA_EVENTS", null],
        ["stream message", "$JS.API.STREAM.MSG.GET.TOKA_EVENTS", {"seq": 1}],
        ["stream purge", "$JS.API.STREAM.PURGE.TOKA_EVENTS", null],
        ["ephemeral consumer", "$JS.API.CONSUMER.CREATE.TOKA_EVENTS", consumer("", serde_json::json!({}))],
        ["named consumer", "$JS.API.CONSUMER.CREATE.TOKA_EVENTS.spy.toka.evt.kernel.>", consumer("spy", serde_json::json!({}))],
        ["push consumer", "$JS.API.CONSUMER.CREATE.TOKA_EVENTS.push.toka.evt.kernel.>",
            consumer("push", serde_json::json!({"deliver_subject": "toka.kernel.v1.submit"}))],
        ["durable consumer", "$JS.API.CONSUMER.DURABLE.CREATE.TOKA_EVENTS.spy", consumer("spy", serde_json::json!({"durable_name": "spy"}))],
        ["consumer list", "$JS.API.CONSUMER.LIST.TOKA_EVENTS", null],
        ["consumer delete", "$JS.API.CONSUMER.DELETE.TOKA_EVENTS.spy", null],
        ["bucket read", "$JS.API.DIRECT.GET.KV_toka_kernel.$KV.toka_kernel.sequencer", null],
        ["bucket info", "$JS.API.STREAM.INFO.KV_toka_kernel", null],
        ["bucket create", "$JS.API.STREAM.CREATE.KV_spy", {"name": "KV_spy", "subjects": ["$KV.spy.>"]}],
        ["bucket write", "$KV.toka_kernel.sequencer", {}],
        ["account info", "$JS.API.INFO", null],
        // Not JetStream, but as closed to a client: naming an agent's token is the kernel's.
        ["agent token", "toka.auth.v1.agent_token", {"token": reader, "agent": agent.to_string(),
            "capabilities": [{"resource": "agent:*", "actions": ["read"]}], "ttl_ms": 60_000}]
    ]);
    let report = probe_jetstream(&python, &stack, &reader, &requests, &["toka.evt.audit.>", "toka.live.audit.>"]).await;
    // The positive controls: the stream's history, read as a reader reads it.
    assert_eq!(report["next event"]["answered"], spawned_subject.as_str(), "{report}");
    assert_eq!(report["last about the agent"]["answered"], spawned_subject.as_str(), "{report}");
    for name in requests.as_array().unwrap().iter().skip(2).map(|r| r[0].as_str().unwrap()) {
        assert!(refused(&report, name), "a reader's {name} was not refused: {report}");
    }
    for name in ["sub toka.evt.audit.>", "sub toka.live.audit.>"] {
        assert!(refused(&report, name), "a reader's {name} was not refused: {report}");
    }
    // A token without `read` on every agent does not even read the kernel's stream.
    let worker = stack.token("worker", vec![Capability::new(Pattern::AnyQueue, &[Action::Claim])]).await;
    let requests = serde_json::json!([["next event", "$JS.API.DIRECT.GET.TOKA_EVENTS", {"seq": 1}]]);
    let report =
        probe_jetstream(&python, &stack, &worker, &requests, &["toka.evt.kernel.>", "toka.live.kernel.>"]).await;
    for name in ["next event", "sub toka.evt.kernel.>", "sub toka.live.kernel.>"] {
        assert!(refused(&report, name), "a worker's {name} was not refused: {report}");
    }
    // Nothing was made: no consumer on the stream, no bucket, the lease where it was.
    let js = async_nats::jetstream::new(stack.nats.connect(Role::Operator).await.client().clone());
    let mut stream = js.get_stream(subject::EVENTS_STREAM).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.consumer_count, 0, "no consumer on the stream");
    assert_eq!(lease_user.query_account().await.unwrap().streams, streams, "no bucket");
    assert_eq!(client.status().await.unwrap().lease_holder.as_deref(), Some("k1"));
}
