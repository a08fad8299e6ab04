//! WAL backends in-process: durable appends at batch sizes 1, 10, 100 and 1000, and reading
//! back in order.
//!
//! SQLite runs on the real disk (under `target/`, not a tmpfs), with `synchronous=FULL`: every
//! measured append is a committed, fsynced transaction. Records are ~400-byte kernel records
//! (a `task.schedule` with a 120-character payload and its event), generated outside the timing.
//!
//! Run: `cargo bench -p toka-storage --bench wal`

#![allow(clippy::unwrap_used)] // benchmark set-up

use std::cell::RefCell;
use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use toka_contract::record::{Chain, LogName};
use toka_contract::testing::{Sample, kernel_records};
use toka_storage::wal::memory::MemoryWal;
use toka_storage::wal::sqlite::SqliteWal;
use toka_storage::wal::{EventKey, StoredRecord, Wal};

/// `n` ~400-byte records sealed onto `chain`, as the WAL stores them.
fn next(chain: &mut Chain, n: usize) -> Vec<StoredRecord> {
    kernel_records(chain, n as u64, Sample::Schedule)
        .into_iter()
        .map(|r| StoredRecord {
            seq: r.seq,
            hash: r.hash,
            prev_hash: r.prev_hash,
            time_us: r.time_us,
            body: serde_json::to_vec(&r).unwrap(),
            events: r
                .events
                .iter()
                .map(|e| EventKey { event_type: e.type_name().into(), entity: e.entity() })
                .collect(),
        })
        .collect()
}

fn bench_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/bench-wal").join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn appends(c: &mut Criterion) {
    eprintln!(
        "config: records ~400 B (task.schedule + event); SQLite on {} with synchronous=FULL; one batch per committed transaction",
        bench_dir("probe").display()
    );
    let mut group = c.benchmark_group("append_durable");
    group.sample_size(20);
    for batch in [1usize, 10, 100, 1000] {
        group.throughput(Throughput::Elements(batch as u64));
        let backends: Vec<(&str, RefCell<Box<dyn Wal>>)> = vec![
            ("sqlite", RefCell::new(Box::new(SqliteWal::open(&bench_dir(&format!("append-{batch}"))).unwrap()))),
            ("memory", RefCell::new(Box::new(MemoryWal::new()))),
        ];
        for (name, wal) in &backends {
            let chain = RefCell::new(Chain::START);
            group.bench_function(format!("{name}/batch_{batch}"), |b| {
                b.iter_batched(
                    || next(&mut chain.borrow_mut(), batch),
                    |records| {
                        let result = wal.borrow_mut().append(&[(LogName::Kernel, &records)]).pop().unwrap();
                        black_box(result.unwrap());
                    },
                    BatchSize::SmallInput,
                )
            });
        }
    }
    group.finish();
}

fn read_back(c: &mut Criterion) {
    const RECORDS: u64 = 100_000;
    let mut wal = SqliteWal::open(&bench_dir("read")).unwrap();
    let mut chain = Chain::START;
    for _ in 0..RECORDS / 1000 {
        let batch = next(&mut chain, 1000);
        wal.append(&[(LogName::Kernel, &batch)]).pop().unwrap().unwrap();
    }
    eprintln!("config: read back {RECORDS} records in order, 1000 per call");
    let mut group = c.benchmark_group("read_in_order");
    group.throughput(Throughput::Elements(1000));
    let mut from = 1;
    group.bench_function("sqlite/1000_per_call", |b| {
        b.iter(|| {
            let records = wal.read(LogName::Kernel, from, 1000, usize::MAX).unwrap();
            from = if from + 1000 > RECORDS { 1 } else { from + 1000 };
            black_box(records)
        })
    });
    group.finish();
}

criterion_group!(benches, appends, read_back);
criterion_main!(benches);
