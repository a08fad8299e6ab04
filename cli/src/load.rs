//! `toka load storage`: durable appends through NATS to storage, measured end to end.
//!
//! One client, like the kernel: it appends to the `kernel` log in batches, keeping up to
//! `--in-flight` batches outstanding (pipelined, sent in order on one connection), and times
//! each append from publish to reply. Records are generated and sealed before the clock starts.
//! A bounded run: `--warmup` records, then `--records` measured ones.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use serde::Serialize;
use toka_contract::api::storage::{AppendReply, AppendRequest, HeadReply, HeadRequest};
use toka_contract::record::{Chain, LogName};
use toka_contract::spec::{Principal, QueueName, RetryPolicy, TaskSpec, Timeouts};
use toka_contract::wire::Reply;
use toka_contract::{AgentId, Event, KernelRecord, OpId, Operation, TaskId, subject};

/// The load's settings.
#[derive(Debug, Clone, Serialize, clap::Args)]
#[command(mut_arg("creds", |a| a.default_value("data/creds/kernel.nk")
    .help("The kernel's nkey seed file: only the kernel may append to the kernel log")))]
pub(crate) struct StorageLoad {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) nats: crate::connect::Nats,
    /// Measured records.
    #[arg(long, default_value_t = 200_000)]
    pub(crate) records: u64,
    /// Records appended before measuring.
    #[arg(long, default_value_t = 20_000)]
    pub(crate) warmup: u64,
    /// Records per append.
    #[arg(long, default_value_t = 100)]
    pub(crate) batch: usize,
    /// Appends outstanding at once.
    #[arg(long, default_value_t = 8)]
    pub(crate) in_flight: usize,
    /// Print the result as JSON.
    #[arg(long)]
    #[serde(skip)]
    pub(crate) json: bool,
}

#[derive(Debug, Serialize)]
struct Outcome {
    config: StorageLoad,
    records: u64,
    appends: u64,
    seconds: f64,
    records_per_second: f64,
    appends_per_second: f64,
    latency_us: BTreeMap<&'static str, u64>,
}

/// `n` records of `task.schedule` on queue `load` sealed onto `chain`.
fn generate(chain: &mut Chain, n: u64) -> anyhow::Result<Vec<KernelRecord>> {
    let queue: QueueName = "load".parse()?;
    let principal: Principal = "operator".parse()?;
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let (seq, time) = (chain.seq + 1, 1_764_150_000_000_000 + chain.seq + 1);
        let (agent, task) = (AgentId::mint(time, 1, 0), TaskId::mint(time, seq, 0));
        let payload = "x".repeat(120);
        let spec = TaskSpec {
            agent,
            queue: queue.clone(),
            payload,
            priority: 5,
            timeouts: Timeouts::default(),
            retry: RetryPolicy::default(),
        };
        let events = vec![Event::TaskScheduled { task, agent, queue: queue.clone(), priority: 5 }];
        out.push(
            chain.seal(OpId::mint(time, seq, 2), principal.clone(), time, Operation::ScheduleTask(spec), events)?.0,
        );
    }
    Ok(out)
}

/// Runs the load and prints the result.
pub(crate) async fn storage(load: StorageLoad) -> anyhow::Result<()> {
    let bus = load.nats.connect("toka-load", toka_contract::access::Role::Kernel, 5_000).await?;
    let head: HeadReply = bus
        .request(subject::STORAGE_HEAD.subject, &HeadRequest { log: LogName::Kernel })
        .await
        .context("storage head")?;
    eprintln!(
        "config: {} measured + {} warm-up records, batch {}, {} appends in flight, kernel log from seq {}",
        load.records,
        load.warmup,
        load.batch,
        load.in_flight,
        head.seq + 1
    );
    eprintln!("generating and sealing {} records...", load.records + load.warmup);
    let records = generate(&mut Chain { seq: head.seq, hash: head.hash }, load.records + load.warmup)?;
    let payloads: Vec<Vec<u8>> = records
        .chunks(load.batch.max(1))
        .map(|batch| serde_json::to_vec(&AppendRequest { expected_seq: batch[0].seq, records: batch.to_vec() }))
        .collect::<Result<_, _>>()?;
    let warmup_appends = load.warmup.div_ceil(load.batch.max(1) as u64) as usize;
    let client = bus.client();
    let prefix = client.new_inbox();
    let mut replies = client.subscribe(format!("{prefix}.*")).await?;
    let subject = subject::append(LogName::Kernel).subject;
    let mut sent_at = vec![None; payloads.len()];
    let mut histogram = crate::load_kernel::histogram()?;
    let (mut next, mut done, mut outstanding) = (0usize, 0usize, 0usize);
    let mut started = Instant::now();
    let mut last_progress = Instant::now();
    while done < payloads.len() {
        while next < payloads.len() && outstanding < load.in_flight.max(1) {
            sent_at[next] = Some(Instant::now());
            client.publish_with_reply(subject, format!("{prefix}.{next}"), payloads[next].clone().into()).await?;
            next += 1;
            outstanding += 1;
        }
        let message = tokio::time::timeout(Duration::from_secs(30), replies.next())
            .await
            .context("no reply within 30 s")?
            .context("reply subscription closed")?;
        let index: usize =
            message.subject.rsplit('.').next().and_then(|i| i.parse().ok()).context("reply to an unknown inbox")?;
        let reply: Reply<AppendReply> = serde_json::from_slice(&message.payload)?;
        if let Reply::Error(e) = reply {
            bail!("append {index} refused: {e}");
        }
        let latency = sent_at[index].map(|t| t.elapsed()).unwrap_or_default();
        outstanding -= 1;
        done += 1;
        if done == warmup_appends {
            histogram.reset();
            started = Instant::now();
        } else if done > warmup_appends {
            histogram.record(latency.as_micros().max(1) as u64)?;
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            eprintln!("  {done}/{} appends acknowledged", payloads.len());
            last_progress = Instant::now();
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let appends = (payloads.len() - warmup_appends) as u64;
    let measured = load.records;
    let latency_us = crate::load_kernel::percentiles(&histogram);
    let outcome = Outcome {
        config: load.clone(),
        records: measured,
        appends,
        seconds,
        records_per_second: measured as f64 / seconds,
        appends_per_second: appends as f64 / seconds,
        latency_us,
    };
    if load.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        println!(
            "storage load: {measured} records in {appends} appends of {} in {seconds:.2} s, {} in flight",
            load.batch, load.in_flight
        );
        println!(
            "  throughput: {:.0} records/s durable ({:.0} appends/s)",
            outcome.records_per_second, outcome.appends_per_second
        );
        let l = &outcome.latency_us;
        println!(
            "  append latency: p50 {} µs, p95 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            l["p50"], l["p95"], l["p99"], l["p99.9"], l["max"]
        );
    }
    Ok(())
}
