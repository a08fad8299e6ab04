//! An example worker: claims tasks from a queue of the local stack, "handles" each by
//! counting the words of its payload, and completes it with the count; stops on Ctrl-C.
//!
//! ```sh
//! make run   # in another terminal
//! TOKEN=$(target/release/toka token issue --sub worker-1 --cap 'task:demo=claim,heartbeat,complete,fail' --ttl 1h)
//! cargo run -p toka-client --example worker -- --queue demo --token "$TOKEN"
//! ```
//!
//! With `--token-file`, the worker reads its token from a file, and again before the token
//! expires: keep a fresh one there and it works on past any one token's life.

use std::time::Duration;

use clap::Parser;
use toka_client::worker::{Claimed, Failure, Worker};
use toka_client::{Client, NatsConfig, token_file};

#[derive(Debug, Parser)]
#[command(about = "Claim tasks from a Toka queue and complete them")]
#[command(group(clap::ArgGroup::new("credential").required(true).args(["token", "token_file"])))]
struct Args {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The queue to work.
    #[arg(long)]
    queue: String,
    /// A token with claim, heartbeat, complete and fail on `task:<queue>`; the worker connects
    /// with it, and stops working when it expires.
    #[arg(long, env = "TOKA_WORKER_TOKEN")]
    token: Option<String>,
    /// A file holding such a token, read again a quarter of the token's life before it expires:
    /// whatever writes a fresh token there keeps the worker going.
    #[arg(long, value_name = "PATH")]
    token_file: Option<std::path::PathBuf>,
    /// Heartbeat interval in milliseconds while a task runs.
    #[arg(long, default_value_t = 1_000)]
    heartbeat_ms: u64,
}

async fn handle(task: Claimed) -> Result<String, Failure> {
    if task.payload.is_empty() {
        return Err(Failure { error: "empty payload".into(), retryable: false });
    }
    Ok(format!("{} words", task.payload.split_whitespace().count()))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = NatsConfig { url: args.nats_url, ..Default::default() };
    let client = match (args.token, args.token_file) {
        (Some(token), _) => Client::connect(&config, "toka-example-worker", token).await?,
        (None, Some(file)) => Client::connect_renewing(&config, "toka-example-worker", token_file(file)).await?,
        (None, None) => anyhow::bail!("--token or --token-file is required"),
    };
    let worker = Worker::new(client, args.queue.parse()?, format!("example-{}", std::process::id()));
    eprintln!("working queue {}; Ctrl-C stops", args.queue);
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let done = worker.run(Duration::from_millis(args.heartbeat_ms), handle, stop).await;
    eprintln!("stopped after {done} tasks");
    Ok(())
}
