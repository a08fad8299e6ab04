//! Storage under failure, for real: SIGKILL of the storage process at random moments while a
//! client appends, a data directory that turns read-only, a disk that fills up.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use toka_contract::Operation;
use toka_contract::access::Role;
use toka_contract::api::service::{HealthReply, HealthRequest};
use toka_contract::api::storage::{
    AppendReply, AppendRequest, HeadReply, HeadRequest, ReadReply, ReadRequest, StatusReply, StatusRequest,
    VerifyReply, VerifyRequest,
};
use toka_contract::record::{Hash, LogName};
use toka_contract::subject::{self, service};
use toka_contract::wire::ErrorCode;
use toka_runtime::bus::{Bus, RequestError};

use crate::assert_eventually;
use crate::harness::{Nats, Running, records_after, spawn_service, temp_dir};
use toka_contract::testing::Sample;

/// A small deterministic generator (xorshift64*), seeded and printed so a failure can be rerun.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

fn start_process(nats: &Nats, data_dir: &Path) -> Child {
    let config = nats.config(Role::Storage);
    Command::new(crate::binaries::binary("toka-storage"))
        .env("TOKA_NATS__URL", &config.url)
        .env("TOKA_NATS__NKEY_SEED_FILE", config.nkey_seed_file.unwrap())
        .env("TOKA_NATS__STATE_NKEY_SEED_FILE", config.state_nkey_seed_file.unwrap())
        .env("TOKA_STORAGE__DATA_DIR", data_dir)
        .env("TOKA_ADMIN__LISTEN", "127.0.0.1:0")
        .env("TOKA_TELEMETRY__LOG_FILTER", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

async fn healthy(bus: &Bus) -> bool {
    bus.request::<HealthRequest, HealthReply>(subject::STORAGE_HEALTH.subject, &HealthRequest {})
        .await
        .is_ok_and(|h| h.ready)
}

async fn head(bus: &Bus) -> (u64, Hash) {
    let h: HeadReply = bus.request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Kernel }).await.unwrap();
    (h.seq, h.hash)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_appends_loses_nothing_acknowledged() {
    let Some(nats) = Nats::start().await else { return };
    let dir = temp_dir("crash");
    let kernel = nats.connect(Role::Kernel).await;
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("crash test seed {seed}");
    let mut rng = Rng(seed);
    let mut acknowledged: Vec<(u64, Hash)> = Vec::new();
    let mut tag = 0;
    const ROUNDS: usize = 20;
    for round in 0..ROUNDS {
        let mut child = start_process(&nats, dir.path());
        assert_eventually!(Duration::from_secs(20), healthy(&kernel).await, "storage up in round {round}");
        let mut at = head(&kernel).await;
        assert!(at.0 >= acknowledged.last().map_or(0, |a| a.0), "round {round}: the head went back");
        let kill_at = tokio::time::Instant::now() + Duration::from_millis(50 + rng.below(400));
        while tokio::time::Instant::now() < kill_at {
            tag += 1;
            let batch = records_after(at, 1 + rng.below(40), Sample::Observe(tag));
            let request = AppendRequest { expected_seq: batch[0].seq, records: batch.clone() };
            match kernel.request::<_, AppendReply>(subject::append(LogName::Kernel).subject, &request).await {
                Ok(reply) => {
                    assert_eq!(
                        (reply.first_seq, reply.last_seq, reply.duplicate),
                        (batch[0].seq, batch[batch.len() - 1].seq, false)
                    );
                    acknowledged.extend(batch.iter().map(|r| (r.seq, r.hash)));
                    at = (reply.last_seq, reply.last_hash);
                }
                Err(e) => panic!("round {round}: append failed while storage was up: {e}"),
            }
        }
        // Kill while an append is in flight.
        tag += 1;
        let batch = records_after(at, 1 + rng.below(40), Sample::Observe(tag));
        let request = AppendRequest { expected_seq: batch[0].seq, records: batch };
        let in_flight = {
            let kernel = kernel.clone();
            tokio::spawn(async move {
                kernel.request::<_, AppendReply>(subject::append(LogName::Kernel).subject, &request).await
            })
        };
        tokio::time::sleep(Duration::from_micros(rng.below(3_000))).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if let Ok(Ok(reply)) = in_flight.await {
            // Acknowledged just before the kill: it must survive too.
            let records =
                records_after((reply.first_seq - 1, at.1), reply.last_seq - reply.first_seq + 1, Sample::Observe(tag));
            acknowledged.extend(records.iter().map(|r| (r.seq, r.hash)));
        }
    }

    // After the last restart, every acknowledged record is there, once, in order, chained, and
    // every committed event reached the stream exactly once.
    let mut child = start_process(&nats, dir.path());
    assert_eventually!(Duration::from_secs(20), healthy(&kernel).await, "storage up for the check");
    let (head_seq, _) = head(&kernel).await;
    assert!(head_seq >= acknowledged.len() as u64, "{head_seq} records kept, {} acknowledged", acknowledged.len());
    let operator = nats.connect(Role::Operator).await;
    let mut stored: Vec<(u64, Hash)> = Vec::new();
    while (stored.len() as u64) < head_seq {
        let page: ReadReply<Operation> = operator
            .request(
                subject::STORAGE_READ.subject,
                &ReadRequest {
                    log: LogName::Kernel,
                    from_seq: stored.len() as u64 + 1,
                    max_records: 1000,
                    max_bytes: 900_000,
                },
            )
            .await
            .unwrap();
        assert!(!page.records.is_empty());
        stored.extend(page.records.iter().map(|r| (r.seq, r.hash)));
    }
    for (i, (seq, _)) in stored.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1, "contiguous");
    }
    for (seq, hash) in &acknowledged {
        assert_eq!(stored[*seq as usize - 1], (*seq, *hash), "acknowledged record {seq} kept as acknowledged");
    }
    let verified: VerifyReply = operator
        .request(subject::STORAGE_VERIFY.subject, &VerifyRequest { log: LogName::Kernel, from_seq: None, to_seq: None })
        .await
        .unwrap();
    assert_eq!((verified.verified, verified.first_break), (head_seq, None), "the hash chain is intact");
    assert_eventually!(
        Duration::from_secs(20),
        operator.request::<_, StatusReply>(subject::STORAGE_STATUS.subject, &StatusRequest {}).await.unwrap().logs[0]
            .published_seq
            == head_seq,
        "every committed record published"
    );
    let js = async_nats::jetstream::new(operator.client().clone());
    let info = js.get_stream(subject::EVENTS_STREAM).await.unwrap().info().await.unwrap().state.clone();
    assert_eq!(info.messages, head_seq, "one event per record, each exactly once in the stream");
    eprintln!("crash test: {ROUNDS} SIGKILLs, {} records acknowledged, {head_seq} kept", acknowledged.len());
    child.kill().unwrap();
    child.wait().unwrap();
    // SIGKILL keeps the page cache, so surviving it proves ordering, not fsync. The durability
    // comes from the WAL's settings, which the service cannot run without: the backend it opens
    // refuses anything but synchronous=FULL, and reports it.
    let wal = toka_storage::wal::sqlite::SqliteWal::open(dir.path()).unwrap();
    assert_eq!(wal.synchronous().unwrap(), 2, "synchronous=FULL: every commit is fsynced before its reply");
}

/// Runs `mount` with `args`; `false` (after printing why) where mounting is not permitted.
fn mount(args: &[&str]) -> bool {
    match Command::new("mount").args(args).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            let reason = format!("mount {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
            if std::env::var("TOKA_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
                panic!("{reason}");
            }
            eprintln!("skipped: {reason}");
            false
        }
        Err(e) => {
            if std::env::var("TOKA_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
                panic!("mount unavailable: {e}");
            }
            eprintln!("skipped: mount unavailable: {e}");
            false
        }
    }
}

/// Unmounts on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

async fn storage_on(nats: &Nats, data_dir: PathBuf) -> Running {
    spawn_service(service::STORAGE, nats, Role::Storage, move |nats, admin, bus, stop| {
        let storage =
            toka_storage::StorageConfig { backend: toka_storage::Backend::Sqlite, data_dir, ..Default::default() };
        toka_storage::run(toka_storage::Config { nats, admin, storage, ..Default::default() }, bus, stop)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_directory_gives_errors_not_loss() {
    let Some(nats) = Nats::start().await else { return };
    let (base, point) = (temp_dir("ro-base"), temp_dir("ro-mount"));
    if !mount(&["--bind", base.path().to_str().unwrap(), point.path().to_str().unwrap()]) {
        return;
    }
    let _mounted = Mounted(point.path().to_path_buf());
    let kernel = nats.connect(Role::Kernel).await;
    let first = records_after((0, Hash::ZERO), 5, Sample::Observe(1));
    let storage = storage_on(&nats, point.path().join("wal")).await;
    let _: AppendReply = kernel
        .request(subject::append(LogName::Kernel).subject, &AppendRequest { expected_seq: 1, records: first.clone() })
        .await
        .unwrap();
    storage.stop().await.unwrap();
    // The mount turns read-only (as a failing disk is remounted); storage comes back on it.
    assert!(mount(&["-o", "remount,ro,bind", point.path().to_str().unwrap()]), "remount read-only");
    let storage = storage_on(&nats, point.path().join("wal")).await;
    let more = records_after((5, first[4].hash), 5, Sample::Observe(2));
    let err = kernel
        .request::<_, AppendReply>(
            subject::append(LogName::Kernel).subject,
            &AppendRequest { expected_seq: 6, records: more },
        )
        .await
        .unwrap_err();
    let RequestError::Remote(e) = err else { panic!("{err}") };
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("read-only"), "{e}");
    assert_eq!(head(&kernel).await, (5, first[4].hash), "what was acknowledged is still served");
    let operator = nats.connect(Role::Operator).await;
    let page: ReadReply<Operation> = operator
        .request(
            subject::STORAGE_READ.subject,
            &ReadRequest { log: LogName::Kernel, from_seq: 1, max_records: 10, max_bytes: 900_000 },
        )
        .await
        .unwrap();
    assert_eq!(page.records, first);
    storage.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_gives_errors_not_loss() {
    let Some(nats) = Nats::start().await else { return };
    let point = temp_dir("full");
    if !mount(&["-t", "tmpfs", "-o", "size=2m", "tmpfs", point.path().to_str().unwrap()]) {
        return;
    }
    let _mounted = Mounted(point.path().to_path_buf());
    let storage = storage_on(&nats, point.path().join("wal")).await;
    let kernel = nats.connect(Role::Kernel).await;
    let mut at = (0, Hash::ZERO);
    let mut refused = None;
    for tag in 0..2_000 {
        let batch = records_after(at, 200, Sample::Observe(tag));
        match kernel
            .request::<_, AppendReply>(
                subject::append(LogName::Kernel).subject,
                &AppendRequest { expected_seq: batch[0].seq, records: batch },
            )
            .await
        {
            Ok(reply) => at = (reply.last_seq, reply.last_hash),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let Some(RequestError::Remote(e)) = refused else { panic!("a 2 MiB disk never filled: {refused:?}") };
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("full"), "{e}");
    assert_eq!(head(&kernel).await, at, "every acknowledged batch is still there; the refused one left nothing");
    let operator = nats.connect(Role::Operator).await;
    let verified: VerifyReply = operator
        .request(subject::STORAGE_VERIFY.subject, &VerifyRequest { log: LogName::Kernel, from_seq: None, to_seq: None })
        .await
        .unwrap();
    assert_eq!((verified.verified, verified.first_break), (at.0, None));
    storage.stop().await.unwrap();
}
