//! The bus from outside, with an independent client (nats-py): a request whose reply subject
//! points outside the inboxes (at a lease key, an event subject, the JetStream API) makes no
//! service write there; the services drop such requests and count them.

use std::time::Duration;

use toka_client::Client;
use toka_contract::access::Role;
use toka_contract::api::storage::{VerifyReply, VerifyRequest};
use toka_contract::record::LogName;
use toka_contract::spec::AgentSpec;
use toka_contract::{Event, Operation, subject};
use toka_runtime::lease::Lease;

use crate::harness::{http_get, python};
use crate::kernel::{Stack, start_kernel};

/// How long the attacker sends.
const ATTACK: Duration = Duration::from_secs(30);

/// Sends requests to health, JWKS and discovery with reply subjects outside the inboxes, as
/// the client user, for the given seconds; prints how many it sent.
const ATTACKER: &str = r#"
import asyncio, sys, time, nats

async def main(url, seed, seconds, agent):
    nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix=b"_INBOX.client")
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
    crate::assert_eventually!(Duration::from_secs(10), stream_messages(&stack).await > 0, "events published");
    let events_before = stream_messages(&stack).await;

    // The attack, with real work going on beside it.
    let seed = stack.nats.config(Role::Client).nkey_seed_file.unwrap();
    let attacker = tokio::process::Command::new(&python)
        .args(["-c", ATTACKER, &stack.nats.url])
        .arg(&seed)
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
