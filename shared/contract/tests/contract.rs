//! Contract tests: the schemas in `schemas/` and the Rust types agree both ways.
//!
//! - every schema compiles, the set of files equals the registry in code, every `$id` is right;
//! - every example validates, decodes into its Rust type and re-encodes to the same document;
//! - every invalid example is rejected, with an error naming the schema and the expected pointer;
//! - arbitrary Rust values (proptest) encode to documents that validate and decode back;
//! - the patterns in `common/defs.v1.json` are the ones the Rust types enforce.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use serde_json::Value;
use toka_contract::api::kernel::SubmitReply;
use toka_contract::capability::Capability;
use toka_contract::event::{Event, ResourceKind, TimeoutKind};
use toka_contract::id::ID_PATTERN;
use toka_contract::op::Operation;
use toka_contract::record::{AuditEntry, Chain, Decision, Hash, Record};
use toka_contract::schema::{BASE_URI, CONTRACTS, Contract, FILES, Registry};
use toka_contract::spec::{
    AgentName, AgentSpec, ObservationKind, Principal, QueueName, ResourceLimits, RetryPolicy, TaskSpec, Timeouts,
};
use toka_contract::wire::{ErrorCode, Reply, WireError};
use toka_contract::{AgentId, AuditRecord, Envelope, KernelRecord, LogName, OpId, Pattern, TaskId, TokenId};

fn schemas_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
}

fn doc(path: &str) -> Value {
    let (_, text) = FILES.iter().find(|(p, _)| *p == path).unwrap_or_else(|| panic!("{path} is not registered"));
    serde_json::from_str(text).unwrap()
}

/// Building blocks that describe no message of their own.
fn is_building_block(path: &str) -> bool {
    path.starts_with("common/") || path.starts_with("external/")
}

fn files_on_disk(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let path = entry.path();
        if path.is_dir() {
            files_on_disk(&path, &format!("{prefix}{name}/"), out);
        } else if name.ends_with(".json") {
            out.insert(format!("{prefix}{name}"));
        }
    }
}

#[test]
fn every_schema_compiles() {
    let registry = Registry::load().unwrap();
    assert_eq!(registry.schemas().count(), FILES.len());
}

#[test]
fn schema_files_equal_the_registry_in_code() {
    let mut on_disk = BTreeSet::new();
    files_on_disk(&schemas_dir(), "", &mut on_disk);
    let registered: BTreeSet<String> = FILES.iter().map(|(p, _)| p.to_string()).collect();
    assert_eq!(on_disk, registered, "schemas/ and schema::FILES differ");
    for (path, _) in FILES.iter().filter(|(p, _)| !p.starts_with("external/")) {
        let d = doc(path);
        assert_eq!(d["$id"], format!("{BASE_URI}{path}"), "{path}: $id");
        assert_eq!(d["$schema"], "https://json-schema.org/draft/2020-12/schema", "{path}: $schema");
        assert!(d["description"].as_str().is_some_and(|s| !s.is_empty()), "{path}: description");
    }
}

#[test]
fn every_message_schema_has_a_rust_type_and_examples_both_ways() {
    let mut covered: BTreeSet<&str> = CONTRACTS.iter().map(|c| c.schema).collect();
    covered.extend(Operation::TYPES.iter().map(|t| &*format!("ops/{t}.v1.json").leak()));
    covered.extend(Event::TYPES.iter().map(|t| &*format!("events/{t}.v1.json").leak()));
    for (path, _) in FILES {
        if is_building_block(path) {
            continue;
        }
        assert!(covered.contains(path), "{path} has no Rust type");
        let d = doc(path);
        let examples = d["examples"].as_array().unwrap_or_else(|| panic!("{path}: no examples"));
        let invalid = d["x-invalid-examples"].as_array().unwrap_or_else(|| panic!("{path}: no x-invalid-examples"));
        assert!(!examples.is_empty() && !invalid.is_empty(), "{path}: needs valid and invalid examples");
    }
    assert_eq!(
        covered.len(),
        FILES.iter().filter(|(p, _)| !is_building_block(p)).count(),
        "a contract names a schema that does not exist"
    );
}

/// Decodes `example` as the Rust type of `path` and encodes it again.
fn round_trip(path: &str, example: &Value) -> Value {
    if let Some(t) = path.strip_prefix("ops/").and_then(|p| p.strip_suffix(".v1.json")).filter(|t| *t != "operation") {
        let op: Operation =
            serde_json::from_value(example.clone()).unwrap_or_else(|e| panic!("{path}: {e}\n{example}"));
        assert_eq!(op.type_name(), t, "{path}: example decodes to another operation");
        return serde_json::to_value(op).unwrap();
    }
    if let Some(t) = path.strip_prefix("events/").and_then(|p| p.strip_suffix(".v1.json")).filter(|t| *t != "event") {
        let ev: Event = serde_json::from_value(example.clone()).unwrap_or_else(|e| panic!("{path}: {e}\n{example}"));
        assert_eq!(ev.type_name(), t, "{path}: example decodes to another event");
        return serde_json::to_value(ev).unwrap();
    }
    let contract = CONTRACTS.iter().find(|c| c.schema == path).unwrap_or_else(|| panic!("{path}: no contract"));
    (contract.round_trip)(example).unwrap_or_else(|e| panic!("{path} as {}: {e}\n{example}", contract.rust_type))
}

#[test]
fn examples_validate_and_round_trip_through_their_rust_types() {
    let registry = Registry::global();
    let mut checked = 0;
    for (path, _) in FILES.iter().filter(|(p, _)| !is_building_block(p)) {
        for example in doc(path)["examples"].as_array().unwrap() {
            registry.validate(path, example).unwrap_or_else(|e| panic!("example of {path} is invalid: {e}"));
            let again = round_trip(path, example);
            assert_eq!(&again, example, "{path}: the Rust type does not re-encode the example as written");
            registry.validate(path, &again).unwrap();
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} examples");
}

#[test]
fn invalid_examples_fail_naming_schema_and_pointer() {
    let registry = Registry::global();
    let mut checked = 0;
    for (path, _) in FILES.iter().filter(|(p, _)| !is_building_block(p)) {
        for case in doc(path)["x-invalid-examples"].as_array().unwrap() {
            let why = case["description"].as_str().unwrap();
            let expected = case["pointer"].as_str().unwrap_or_else(|| panic!("{path}: {why}: no pointer"));
            let err = registry
                .validate(path, &case["instance"])
                .err()
                .unwrap_or_else(|| panic!("{path}: invalid example accepted: {why}"));
            assert_eq!(err.schema, *path);
            assert_eq!(err.pointer, expected, "{path}: {why}: {err}");
            let shown = err.to_string();
            assert!(shown.starts_with(path) && shown.len() < 400, "{shown}");
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} invalid examples");
}

#[test]
fn we_own_every_shape_we_define() {
    // Every object schema with properties closes itself (additionalProperties: false), except
    // dispatchers whose branches close them and if/then/else refinements of a closed parent.
    fn walk(path: &str, at: &str, v: &Value) {
        match v {
            Value::Object(map) => {
                if map.contains_key("properties") && !map.contains_key("allOf") {
                    assert_eq!(map.get("additionalProperties"), Some(&Value::Bool(false)), "{path}#{at} is open");
                }
                for (k, child) in map {
                    if !matches!(k.as_str(), "examples" | "x-invalid-examples" | "then" | "else" | "if") {
                        walk(path, &format!("{at}/{k}"), child);
                    }
                }
            }
            Value::Array(items) => items.iter().enumerate().for_each(|(i, c)| walk(path, &format!("{at}/{i}"), c)),
            _ => {}
        }
    }
    for (path, _) in FILES.iter().filter(|(p, _)| !p.starts_with("external/")) {
        walk(path, "", &doc(path));
    }
}

#[test]
fn defs_spell_the_patterns_the_types_enforce() {
    let defs = doc("common/defs.v1.json");
    let pattern = |name: &str| defs["$defs"][name]["pattern"].as_str().unwrap().to_owned();
    assert_eq!(pattern("id"), ID_PATTERN);
    assert_eq!(pattern("queue"), QueueName::PATTERN);
    assert_eq!(pattern("agent_name"), AgentName::PATTERN);
    assert_eq!(pattern("principal"), Principal::PATTERN);
    assert_eq!(pattern("observation_kind"), ObservationKind::PATTERN);
    let actions: Vec<&str> =
        defs["$defs"]["action"]["enum"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let rust: Vec<&str> = toka_contract::Action::ALL.iter().map(|a| a.as_str()).collect();
    assert_eq!(actions, rust);
    let codes: Vec<&str> =
        defs["$defs"]["error_code"]["enum"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(codes, ErrorCode::ALL.iter().map(|c| c.as_str()).collect::<Vec<_>>());
}

/// SHA-256 of the published schemas Toka vendors under `schemas/external/`: the CloudEvents
/// JSON schema (cloudevents/spec `cloudevents/cloudevents.json`) and the NATS services API
/// replies (nats-io/jsm.go `schemas/micro/v1/`), as published beside the design
/// (`shared/external/`), read 2026-12-01. A vendored copy that drifts from its publication
/// fails here.
const PUBLISHED: &[(&str, &str)] = &[
    ("external/cloudevents.json", "b64ad6f25e9bac2239d29f932bea4920f4e1f8b6749709bfb509a33b1381ed2c"),
    ("external/nats-micro-v1/info_response.json", "50c3256bc99c99c15cde0d56209b4ba6871f959b6df358a70b24fb805281eec2"),
    ("external/nats-micro-v1/ping_response.json", "867ee1769bcc69d0ca67aeeb88efb8785cf535e27adfbe5e6cd0123e338ed0d7"),
    ("external/nats-micro-v1/stats_response.json", "771cbf2ace72cc603f5070ac7862d8c8ec721cb2f418edf4732736a9f2f4cb1f"),
];

#[test]
fn the_vendored_external_schemas_are_the_published_ones_byte_for_byte() {
    use sha2::Digest as _;
    let vendored: BTreeSet<&str> = FILES.iter().map(|(p, _)| *p).filter(|p| p.starts_with("external/")).collect();
    let pinned: BTreeSet<&str> = PUBLISHED.iter().map(|(p, _)| *p).collect();
    assert_eq!(vendored, pinned, "every vendored schema is pinned");
    for (path, pin) in PUBLISHED {
        let (_, text) = FILES.iter().find(|(p, _)| p == path).unwrap();
        let digest: String = sha2::Sha256::digest(text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(&digest, pin, "{path} differs from its publication");
    }
}

#[test]
fn decode_reports_schema_and_pointer() {
    let err = toka_contract::schema::decode::<Operation>(br#"{"type":"agent.spawn","name":"my agent"}"#).unwrap_err();
    let toka_contract::schema::DecodeError::Schema(e) = err else { panic!("{err:?}") };
    assert_eq!((e.schema.as_str(), e.pointer.as_str()), ("ops/operation.v1.json", "/name"));
    let wire = WireError::from(e);
    assert_eq!(wire.code, ErrorCode::BadRequest);
    assert_eq!(wire.details["pointer"], "/name");
    assert!(matches!(
        toka_contract::schema::decode::<Operation>(b"{"),
        Err(toka_contract::schema::DecodeError::Json(_))
    ));
}

// ------------------------------------------------------------------ property tests

fn id() -> impl Strategy<Value = u128> {
    any::<u128>()
}
fn agent() -> impl Strategy<Value = AgentId> {
    id().prop_map(AgentId::from_u128)
}
fn task() -> impl Strategy<Value = TaskId> {
    id().prop_map(TaskId::from_u128)
}
fn token() -> impl Strategy<Value = TokenId> {
    id().prop_map(TokenId::from_u128)
}
fn name<T: std::str::FromStr + std::fmt::Debug>(re: &'static str) -> impl Strategy<Value = T>
where
    T::Err: std::fmt::Debug,
{
    proptest::string::string_regex(re).unwrap().prop_map(|s| s.parse().unwrap())
}
fn queue() -> impl Strategy<Value = QueueName> {
    name("[a-z0-9][a-z0-9_-]{0,12}")
}
fn principal() -> impl Strategy<Value = Principal> {
    name("[A-Za-z0-9][A-Za-z0-9._:@/-]{0,20}")
}
fn short() -> impl Strategy<Value = String> {
    "\\PC{0,24}"
}
fn u64s() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]
}
fn opt<T: std::fmt::Debug + Clone + 'static>(
    s: impl Strategy<Value = T> + 'static,
) -> impl Strategy<Value = Option<T>> {
    proptest::option::of(s)
}
fn limits() -> impl Strategy<Value = ResourceLimits> {
    (opt(u64s()), opt(u64s()), opt(u64s())).prop_map(|(memory_bytes, cpu_millicores, io_bytes)| ResourceLimits {
        memory_bytes,
        cpu_millicores,
        io_bytes,
    })
}
fn capability() -> impl Strategy<Value = Capability> {
    let pattern = prop_oneof![
        Just(Pattern::AnyAgent),
        agent().prop_map(Pattern::Agent),
        agent().prop_map(Pattern::Subtree),
        Just(Pattern::AnyQueue),
        queue().prop_map(Pattern::Queue),
        Just(Pattern::Tokens),
    ];
    let actions = proptest::sample::subsequence(toka_contract::Action::ALL, 1..=toka_contract::Action::ALL.len());
    (pattern, actions).prop_map(|(p, a)| Capability::new(p, &a))
}
fn capabilities() -> impl Strategy<Value = Vec<Capability>> {
    proptest::collection::vec(capability(), 1..4)
}

fn operation() -> impl Strategy<Value = Operation> {
    let timeouts =
        (opt(u64s()), opt(u64s()), opt(u64s())).prop_map(|(schedule_to_start_us, start_to_close_us, heartbeat_us)| {
            Timeouts { schedule_to_start_us, start_to_close_us, heartbeat_us }
        });
    let retry = (1u32..=100, u64s(), 100u32..=1000, u64s()).prop_map(
        |(max_attempts, initial_backoff_us, backoff_multiplier_pct, max_backoff_us)| RetryPolicy {
            max_attempts,
            initial_backoff_us,
            backoff_multiplier_pct,
            max_backoff_us,
        },
    );
    prop_oneof![
        (name("[A-Za-z0-9][A-Za-z0-9._:-]{0,20}"), opt(agent()), limits())
            .prop_map(|(name, parent, limits)| Operation::SpawnAgent(AgentSpec { name, parent, limits })),
        (agent(), short()).prop_map(|(agent, reason)| Operation::SuspendAgent { agent, reason }),
        agent().prop_map(|agent| Operation::ResumeAgent { agent }),
        (agent(), short()).prop_map(|(agent, reason)| Operation::TerminateAgent { agent, reason }),
        (agent(), queue(), short(), any::<u8>(), timeouts, retry).prop_map(
            |(agent, queue, payload, priority, timeouts, retry)| Operation::ScheduleTask(TaskSpec {
                agent,
                queue,
                payload,
                priority,
                timeouts,
                retry
            })
        ),
        (queue(), short()).prop_map(|(queue, worker)| Operation::ClaimTask { queue, worker }),
        (task(), any::<u32>()).prop_map(|(task, attempt)| Operation::HeartbeatTask { task, attempt }),
        (task(), any::<u32>(), short()).prop_map(|(task, attempt, result)| Operation::CompleteTask {
            task,
            attempt,
            result
        }),
        (task(), any::<u32>(), short(), any::<bool>())
            .prop_map(|(task, attempt, error, retryable)| Operation::FailTask { task, attempt, error, retryable }),
        (task(), short()).prop_map(|(task, reason)| Operation::CancelTask { task, reason }),
        (agent(), name("[a-z0-9][a-z0-9._-]{0,12}"), short())
            .prop_map(|(agent, kind, body)| Operation::EmitObservation { agent, kind, body }),
        (agent(), u64s()).prop_map(|(agent, bytes)| Operation::ReportMemory { agent, bytes }),
        (agent(), u64s()).prop_map(|(agent, millicores)| Operation::ReportCpu { agent, millicores }),
        (agent(), u64s(), u64s(), u64s()).prop_map(|(agent, read_bytes, write_bytes, ops)| Operation::ReportIo {
            agent,
            read_bytes,
            write_bytes,
            ops
        }),
        proptest::option::of(1u32..100_000).prop_map(|max_fired| Operation::Tick { max_fired }),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let kid = || "[A-Za-z0-9_-]{1,16}";
    let agent_events = prop_oneof![
        (agent(), name("[A-Za-z0-9][A-Za-z0-9._:-]{0,20}"), opt(agent()), limits())
            .prop_map(|(agent, name, parent, limits)| Event::AgentSpawned { agent, name, parent, limits }),
        (agent(), short()).prop_map(|(agent, reason)| Event::AgentSuspended { agent, reason }),
        agent().prop_map(|agent| Event::AgentResumed { agent }),
        (agent(), opt(agent()), short()).prop_map(|(agent, cascade_from, reason)| Event::AgentTerminated {
            agent,
            cascade_from,
            reason
        }),
        (agent(), name("[a-z0-9][a-z0-9._-]{0,12}"), short())
            .prop_map(|(agent, kind, body)| Event::ObservationEmitted { agent, kind, body }),
        (agent(), u64s()).prop_map(|(agent, bytes)| Event::MemoryAllocated { agent, bytes }),
        (agent(), u64s()).prop_map(|(agent, millicores)| Event::CpuUtilization { agent, millicores }),
        (agent(), u64s(), u64s(), u64s(), u64s()).prop_map(|(agent, read_bytes, write_bytes, ops, total_bytes)| {
            Event::IoOperation { agent, read_bytes, write_bytes, ops, total_bytes }
        }),
        (
            agent(),
            prop_oneof![Just(ResourceKind::Memory), Just(ResourceKind::Cpu), Just(ResourceKind::Io)],
            u64s(),
            u64s()
        )
            .prop_map(|(agent, resource, used, limit)| Event::ResourceError { agent, resource, used, limit }),
    ];
    let timeout =
        prop_oneof![Just(TimeoutKind::ScheduleToStart), Just(TimeoutKind::StartToClose), Just(TimeoutKind::Heartbeat)];
    let task_events = prop_oneof![
        (task(), agent(), queue(), any::<u8>()).prop_map(|(task, agent, queue, priority)| Event::TaskScheduled {
            task,
            agent,
            queue,
            priority
        }),
        (task(), 1u32.., principal(), short()).prop_map(|(task, attempt, principal, worker)| Event::TaskClaimed {
            task,
            attempt,
            principal,
            worker
        }),
        (task(), any::<u32>()).prop_map(|(task, attempt)| Event::TaskCompleted { task, attempt }),
        (task(), any::<u32>(), short(), opt(u64s()))
            .prop_map(|(task, attempt, error, retry_at_us)| Event::TaskFailed { task, attempt, error, retry_at_us }),
        (task(), any::<u32>(), timeout, opt(u64s())).prop_map(|(task, attempt, timeout, retry_at_us)| {
            Event::TaskTimedOut { task, attempt, timeout, retry_at_us }
        }),
        (task(), short()).prop_map(|(task, reason)| Event::TaskCancelled { task, reason }),
        (task(), any::<u32>(), short()).prop_map(|(task, attempts, reason)| Event::TaskParked {
            task,
            attempts,
            reason
        }),
    ];
    let other_events = prop_oneof![
        ("toka-[a-z]{1,9}", short()).prop_map(|(service, message)| Event::SystemError { service, message }),
        ("[a-z./]{0,30}", "(/[a-z0-9]{1,5}){0,4}", short())
            .prop_map(|(schema, pointer, message)| Event::ValidationError { schema, pointer, message }),
        (token(), principal(), capabilities(), u64s()).prop_map(|(jti, sub, capabilities, expires_at_us)| {
            Event::TokenIssued { jti, sub, capabilities, expires_at_us }
        }),
        (token(), token(), principal(), 1u8.., capabilities(), u64s()).prop_map(
            |(jti, parent, sub, depth, capabilities, expires_at_us)| Event::TokenDelegated {
                jti,
                parent,
                sub,
                depth,
                capabilities,
                expires_at_us
            }
        ),
        (token(), u64s(), short(), opt(u64s())).prop_map(|(jti, epoch, reason, expires_at_us)| {
            Event::TokenRevoked { jti, epoch, reason, expires_at_us }
        }),
        (kid(), opt(kid()), opt(u64s())).prop_map(|(kid, previous_kid, retire_at_us)| Event::KeyRotated {
            kid,
            previous_kid,
            retire_at_us
        }),
        (principal(), "[a-z0-9_.]{1,20}", "\\PC{0,30}", short(), 1u32..).prop_map(
            |(principal, action, resource, reason, count)| Event::AccessDenied {
                principal,
                action,
                resource,
                reason,
                count
            }
        ),
    ];
    prop_oneof![agent_events, task_events, other_events]
}

fn chain_of<B: serde::Serialize + std::fmt::Debug + Clone + 'static>(
    bodies: impl Strategy<Value = B> + 'static,
) -> impl Strategy<Value = Vec<Record<B>>> {
    let entry = (id(), principal(), bodies, proptest::collection::vec(event(), 0..4), 0u64..1_000_000);
    proptest::collection::vec(entry, 1..5).prop_map(|entries| {
        let (mut chain, mut time) = (Chain::START, 1_764_150_000_000_000u64);
        entries
            .into_iter()
            .map(|(op_id, principal, body, events, dt)| {
                time += dt;
                chain.seal(OpId::from_u128(op_id), principal, time, body, events).unwrap().0
            })
            .collect()
    })
}

fn audit_entry() -> impl Strategy<Value = AuditEntry> {
    ("[a-z0-9_.]{1,20}", "\\PC{1,30}", any::<bool>(), short(), 1u32..).prop_map(
        |(action, resource, allow, reason, count)| AuditEntry {
            action,
            resource,
            decision: if allow { Decision::Allow } else { Decision::Deny },
            reason,
            count,
        },
    )
}

/// Encodes `value`, validates the document against `T`'s schema, decodes it back and compares.
fn check<T: Contract + PartialEq + std::fmt::Debug>(value: &T) -> Result<(), TestCaseError> {
    let json = serde_json::to_value(value).unwrap();
    if let Err(e) = Registry::global().validate(T::SCHEMA, &json) {
        return Err(TestCaseError::fail(format!("{e}\n{json}")));
    }
    let back: T = serde_json::from_value(json).unwrap();
    prop_assert_eq!(&back, value);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_operations_validate(op in operation()) {
        check(&op)?;
        let own = format!("ops/{}.v1.json", op.type_name());
        Registry::global().validate(&own, &serde_json::to_value(&op).unwrap()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn arbitrary_events_validate(ev in event()) {
        check(&ev)?;
        let own = format!("events/{}.v1.json", ev.type_name());
        Registry::global().validate(&own, &serde_json::to_value(&ev).unwrap()).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn arbitrary_kernel_records_validate_and_chain(records in chain_of(operation())) {
        for r in &records { check::<KernelRecord>(r)?; }
        prop_assert!(toka_contract::record::verify_chain(&records, 0, Hash::ZERO).is_ok());
    }

    #[test]
    fn arbitrary_audit_records_validate_and_chain(records in chain_of(audit_entry())) {
        for r in &records { check::<AuditRecord>(r)?; }
        prop_assert!(toka_contract::record::verify_chain(&records, 0, Hash::ZERO).is_ok());
    }

    #[test]
    fn arbitrary_envelopes_validate(ev in event(), seq in 1u64.., idx in any::<u16>(), time in 0u64..4_000_000_000_000_000, audit in any::<bool>(), trace in opt("00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]")) {
        let log = if audit { LogName::Audit } else { LogName::Kernel };
        check(&Envelope::new(log, seq, idx, time, ev, trace))?;
    }

    #[test]
    fn arbitrary_replies_validate(events in proptest::collection::vec(event(), 0..3), seq in 1u64.., time in u64s(), code in proptest::sample::select(ErrorCode::ALL.to_vec()), msg in short(), retry in opt(u64s()), ok in any::<bool>()) {
        let reply = if ok {
            Reply::Ok(SubmitReply { seq, time_us: time, events, agent_token: None, task_payload: None })
        } else {
            let error = match code {
                // A too_large error names the bound it hit.
                ErrorCode::TooLarge => WireError::too_large(msg, "kernel.max_record_bytes", seq, retry),
                code => WireError::new(code, msg),
            };
            Reply::Error(WireError { retry_after_ms: retry, ..error })
        };
        check(&reply)?;
    }

    #[test]
    fn the_id_regex_and_the_id_parser_agree(s in "[0-9a-zA-Z._-]{24,28}|[0-9a-hjkmnp-tv-z]{26}") {
        let re = regex::Regex::new(ID_PATTERN).unwrap();
        prop_assert_eq!(re.is_match(&s), s.parse::<AgentId>().is_ok(), "{}", s);
    }

    #[test]
    fn the_name_regexes_and_parsers_agree(s in "[ -~]{0,70}") {
        for (pattern, parsed) in [
            (QueueName::PATTERN, s.parse::<QueueName>().is_ok()),
            (AgentName::PATTERN, s.parse::<AgentName>().is_ok()),
            (Principal::PATTERN, s.parse::<Principal>().is_ok()),
            (ObservationKind::PATTERN, s.parse::<ObservationKind>().is_ok()),
        ] {
            prop_assert_eq!(regex::Regex::new(pattern).unwrap().is_match(&s), parsed, "{} vs {:?}", pattern, s);
        }
    }

    #[test]
    fn the_pattern_regex_and_the_pattern_parser_agree(s in "(agent|task|token|x):(\\*|[0-9a-hjkmnp-tv-z]{26}(/\\*\\*)?|[a-z0-9_-]{1,8}|\\*\\*)") {
        let defs = doc("common/defs.v1.json");
        let re = regex::Regex::new(defs["$defs"]["resource_pattern"]["pattern"].as_str().unwrap()).unwrap();
        prop_assert_eq!(re.is_match(&s), s.parse::<Pattern>().is_ok(), "{}", s);
    }
}

#[test]
fn record_examples_are_chains_sealed_by_another_implementation() {
    // The examples were hashed by an independent implementation (Python's json + blake3) of
    // the canonical form documented in `record.rs`: the Rust chain check must accept them and
    // notice any edit.
    let kernel: Vec<KernelRecord> =
        serde_json::from_value(doc("records/kernel-record.v1.json")["examples"].clone()).unwrap();
    assert_eq!(toka_contract::record::verify_chain(&kernel, 0, Hash::ZERO).unwrap().0, 3);
    let audit: Vec<AuditRecord> =
        serde_json::from_value(doc("records/audit-record.v1.json")["examples"].clone()).unwrap();
    assert_eq!(toka_contract::record::verify_chain(&audit, 0, Hash::ZERO).unwrap().0, 2);
    let mut edited = kernel.clone();
    edited[1].principal = "intruder".parse().unwrap();
    assert_eq!(toka_contract::record::verify_chain(&edited, 0, Hash::ZERO).unwrap_err().seq, 2);
}
