//! `toka`: set up and operate a Toka deployment.
//!
//! - `toka nats-config`: generate the deployment's NATS users (one nkey per role, seeds mode
//!   0600, never overwritten), the auth callout's keys, the server configuration with accounts,
//!   least-privilege permissions and the callout, and a configuration file per service pointing
//!   at its credentials.
//! - `toka ping`: which Toka services answer the NATS services API's `$SRV.PING`.
//! - `toka token issue`: a token from auth, asked for with the deployment's admin key.
//! - `toka load storage`: durable appends through NATS, with throughput and latency percentiles.
//! - `toka load kernel`: durable operations through the kernel, closed-loop clients, percentiles
//!   overall and by kind of operation;
//!   `toka load nats`: the same against a plain NATS echo, the baseline.

mod connect;
mod load;
mod load_kernel;
mod token;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use toka_contract::access::{Role, ServerSettings};
use toka_runtime::deploy;

#[derive(Debug, Parser)]
#[command(version, about = "Set up and operate a Toka deployment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate NATS credentials, the NATS server configuration and service configurations.
    ///
    /// Writes, under DIR (kept if present, so re-running keeps the deployment's identities):
    ///
    /// - creds/<role>.nk: an nkey seed (mode 0600) per NATS user: kernel, storage, auth and
    ///   telemetry, which serve requests and may publish nothing but their requests and replies
    ///   to inboxes; kernel-state, storage-state and auth-state, which hold the leases and
    ///   publish committed events and the revocation heartbeat; auth-callout (alone in the AUTH
    ///   account) and auth-system (the SYS account); operator, for `toka` commands.
    /// - creds/auth-issuer.nk and creds/auth-xkey.nk: the account key auth's callout signs the
    ///   users it admits with, and the curve key NATS encrypts authorization requests to.
    /// - creds/admin.key: the credential that issues the first tokens.
    /// - nats.conf: JetStream on; accounts AUTH, TOKA and SYS; each user in its account with
    ///   least-privilege permissions; the auth callout for every other connection. Clients have
    ///   no key: they connect with a Toka token (`token` in the NATS clients), and auth admits
    ///   each with the permissions its capabilities give and its own inbox, `_INBOX.<jti>`;
    ///   no client token reaches the JetStream API beyond direct gets on TOKA_EVENTS (with
    ///   `read` on every agent).
    /// - config/<service>.toml for each service.
    #[command(verbatim_doc_comment)]
    NatsConfig {
        /// Deployment directory.
        #[arg(long, default_value = "data")]
        dir: PathBuf,
        /// Address NATS listens on for clients.
        #[arg(long, default_value = "127.0.0.1:4222")]
        listen: String,
        /// Address of NATS's HTTP monitoring endpoint.
        #[arg(long, default_value = "127.0.0.1:8222")]
        monitor: String,
        /// First admin HTTP port; the services get this and the next three (kernel, storage,
        /// auth, telemetry).
        #[arg(long, default_value_t = 9101)]
        admin_port: u16,
    },
    /// List the services that answer `$SRV.PING` (name, instance id, version).
    ///
    /// Exits 1 when none answers within the wait.
    Ping {
        #[command(flatten)]
        nats: connect::Nats,
        /// How long to collect answers, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// Tokens: `toka token issue --sub alice --cap 'agent:*=spawn,read' --ttl 1h`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Load generators: bounded runs that print their configuration, progress, throughput and
    /// latency percentiles.
    #[command(subcommand)]
    Load(Load),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token with the deployment's admin key and print it (the first tokens of a
    /// deployment are made this way).
    Issue(token::Issue),
}

#[derive(Debug, Subcommand)]
enum Load {
    /// Durable appends to storage's kernel log through NATS (run against a stack with no kernel
    /// writing, e.g. `make run` with the kernel stopped, or a fresh storage).
    Storage(load::StorageLoad),
    /// Durable operations through the kernel: closed-loop clients submitting a mix of
    /// operations (verified, sequenced, applied, stored) against a running stack; latency
    /// percentiles overall and for each kind of operation.
    Kernel(load_kernel::KernelLoad),
    /// The baseline: plain NATS request/reply to an echo in this process, same clients and
    /// timing, against a plain server (e.g. `nats-server -p 4333`).
    Nats(load_kernel::NatsLoad),
}

const SERVICES: [(Role, &str); 4] =
    [(Role::Kernel, "kernel"), (Role::Storage, "storage"), (Role::Auth, "auth"), (Role::Telemetry, "telemetry")];

fn nats_config(dir: &Path, listen: &str, monitor: &str, admin_port: u16) -> anyhow::Result<()> {
    let dir = std::path::absolute(dir).context("deployment directory")?;
    let settings = ServerSettings {
        listen: listen.to_owned(),
        monitor: Some(monitor.to_owned()),
        store_dir: dir.join("nats").join("jetstream").display().to_string(),
        max_payload: 1 << 20,
    };
    let generated = deploy::generate(&dir, &settings)?;
    let config_dir = dir.join("config");
    std::fs::create_dir_all(&config_dir).with_context(|| config_dir.display().to_string())?;
    for (i, (role, name)) in SERVICES.iter().enumerate() {
        let seed = &generated.seeds[role];
        let state = role.state().map_or(String::new(), |state| {
            format!("state_nkey_seed_file = \"{}\"\n", generated.seeds[&state].display())
        });
        let mut text = format!(
            "# Generated by `toka nats-config`; edit freely, it is not overwritten.\n\
             [nats]\nurl = \"nats://{listen}\"\nnkey_seed_file = \"{}\"\n{state}\n[admin]\nlisten = \"127.0.0.1:{}\"\n",
            seed.display(),
            admin_port + i as u16
        );
        if *role == Role::Auth {
            text.push_str(&format!(
                "\n[auth]\nkey_dir = \"{}\"\nadmin_key_file = \"{}\"\n\n[auth.callout]\nnkey_seed_file = \"{}\"\n\
                 issuer_seed_file = \"{}\"\nxkey_seed_file = \"{}\"\nsystem_nkey_seed_file = \"{}\"\n",
                dir.join("auth").display(),
                generated.admin_key.display(),
                generated.seeds[&Role::AuthCallout].display(),
                generated.callout_issuer.display(),
                generated.callout_xkey.display(),
                generated.seeds[&Role::AuthSystem].display(),
            ));
        }
        if *role == Role::Storage {
            text.push_str(&format!(
                "\n[storage]\nbackend = \"sqlite\"\ndata_dir = \"{}\"\n",
                dir.join("storage").display()
            ));
        }
        let path = config_dir.join(format!("{name}.toml"));
        if !path.exists() {
            std::fs::write(&path, text).with_context(|| path.display().to_string())?;
        }
    }
    println!("NATS server configuration: {}", generated.server_config.display());
    for (role, path) in &generated.seeds {
        println!("  {:<17} {}  {}", role.name(), generated.public_keys[role], path.display());
    }
    println!("  {:<17} {}  {}", "auth-issuer", generated.callout.issuer, generated.callout_issuer.display());
    println!("  {:<17} {}  {}", "auth-xkey", generated.callout.xkey, generated.callout_xkey.display());
    println!(
        "Auth admin key:            {}  (issues the first tokens: `toka token issue`)",
        generated.admin_key.display()
    );
    println!("Clients connect with a token; `toka` commands connect as the operator.");
    println!("Service configurations:    {}/{{kernel,storage,auth,telemetry}}.toml", config_dir.display());
    Ok(())
}

async fn ping(nats: &connect::Nats, wait_ms: u64) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let bus = nats.connect("toka-cli", Role::Operator, 5_000).await?;
    let client = bus.client();
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client.publish_with_reply("$SRV.PING", inbox, "".into()).await?;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    let mut found = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await {
        let reply: serde_json::Value = serde_json::from_slice(&message.payload)?;
        found.push((
            reply["name"].as_str().unwrap_or("?").to_owned(),
            reply["id"].as_str().unwrap_or("?").to_owned(),
            reply["version"].as_str().unwrap_or("?").to_owned(),
        ));
    }
    found.sort();
    for (name, id, version) in &found {
        println!("{name:<16} {id:<24} {version}");
    }
    anyhow::ensure!(!found.is_empty(), "no service answered $SRV.PING within {wait_ms} ms");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::NatsConfig { dir, listen, monitor, admin_port } => nats_config(&dir, &listen, &monitor, admin_port),
        Command::Ping { nats, wait_ms } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ping(&nats, wait_ms))),
        Command::Token(TokenCommand::Issue(args)) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(token::issue(args))),
        Command::Load(Load::Kernel(load)) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(load_kernel::kernel(load))),
        Command::Load(Load::Nats(load)) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(load_kernel::nats(load))),
        Command::Load(Load::Storage(load)) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(load::storage(load))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toka: {e:#}");
            ExitCode::FAILURE
        }
    }
}
