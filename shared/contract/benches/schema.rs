//! Schema validation of the two hottest documents: a kernel submit request and a storage
//! append of a kernel batch, both taken from their schemas' own examples.
//!
//! Run: `cargo bench -p toka-contract --bench schema`

#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark set-up

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::Value;
use toka_contract::schema::{FILES, Registry};

/// The first example of the schema at `path`.
fn example(path: &str) -> Value {
    let text = FILES.iter().find(|(p, _)| *p == path).expect("schema exists").1;
    let schema: Value = serde_json::from_str(text).unwrap();
    schema["examples"][0].clone()
}

fn validate(c: &mut Criterion) {
    let registry = Registry::global();
    let submit = example("api/kernel.submit.request.v1.json");
    // The append example holds 3 records; a batch of 18 is what 64 clients send at a time.
    let mut append = example("api/storage.append.kernel.request.v1.json");
    let three = append["records"].as_array().unwrap().clone();
    append["records"] = Value::Array(three.iter().cycle().take(18).cloned().collect());
    eprintln!("config: kernel.submit request (agent.spawn); storage.append.kernel request of 18 records");
    registry.validate("api/kernel.submit.request.v1.json", &submit).unwrap();
    registry.validate("api/storage.append.kernel.request.v1.json", &append).unwrap();
    c.bench_function("validate/kernel.submit", |b| {
        b.iter(|| registry.validate("api/kernel.submit.request.v1.json", black_box(&submit)).unwrap())
    });
    c.bench_function("validate/storage.append.kernel/18", |b| {
        b.iter(|| registry.validate("api/storage.append.kernel.request.v1.json", black_box(&append)).unwrap())
    });
}

criterion_group!(benches, validate);
criterion_main!(benches);
