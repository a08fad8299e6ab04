//! The contract is pure: nothing it depends on, directly or through another crate, is an async
//! runtime or a NATS client. Services and clients bring those; the contract only describes
//! what crosses the bus.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

/// Crates the contract must never pull in.
const FORBIDDEN: &[&str] = &["tokio", "async-nats", "mio", "futures", "async-std", "smol", "nats"];

/// Every crate `package` depends on for its build (normal dependencies, transitively), from
/// `cargo metadata`'s resolved graph.
fn normal_dependencies(metadata: &Value, package: &str) -> BTreeSet<String> {
    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: BTreeMap<&str, &Value> =
        metadata["resolve"]["nodes"].as_array().unwrap().iter().map(|n| (n["id"].as_str().unwrap(), n)).collect();
    let root = names.iter().find(|(_, name)| **name == package).map(|(id, _)| *id).unwrap();
    let mut seen = BTreeSet::new();
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for dep in nodes[id]["deps"].as_array().unwrap() {
            let normal = dep["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].is_null());
            let dep_id = dep["pkg"].as_str().unwrap();
            if normal && seen.insert(names[dep_id].to_owned()) {
                todo.push(dep_id);
            }
        }
    }
    seen
}

#[test]
fn the_contract_depends_on_no_async_runtime_and_no_nats_client() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).unwrap();
    let contract = normal_dependencies(&metadata, "toka-contract");
    assert!(contract.contains("serde_json") && contract.contains("jsonschema"), "the graph was read: {contract:?}");
    let found: Vec<&&str> = FORBIDDEN.iter().filter(|f| contract.contains(**f)).collect();
    assert!(found.is_empty(), "toka-contract depends on {found:?}");
    // The check can fail: the runtime does depend on both.
    let runtime = normal_dependencies(&metadata, "toka-runtime");
    assert!(runtime.contains("tokio") && runtime.contains("async-nats"));
}
