//! How a `toka` command reaches NATS: the options every command that connects shares.

use std::path::PathBuf;

use serde::Serialize;
use toka_contract::access::Role;
use toka_runtime::bus::Bus;
use toka_runtime::config::NatsConfig;

/// `--nats-url` and `--creds`, also read from `TOKA_NATS_URL` and `TOKA_NATS_CREDS`.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub(crate) struct Nats {
    /// NATS server URL.
    #[arg(long = "nats-url", env = "TOKA_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    #[serde(rename = "nats_url")]
    pub(crate) url: String,
    /// The operator's nkey seed file (`toka nats-config` writes it).
    #[arg(long, env = "TOKA_NATS_CREDS", default_value = "data/creds/operator.nk")]
    pub(crate) creds: PathBuf,
}

impl Nats {
    /// The connection settings, waiting at most 3 s to connect and `request_timeout_ms` for a
    /// reply.
    pub(crate) fn config(&self, request_timeout_ms: u64) -> NatsConfig {
        NatsConfig {
            url: self.url.clone(),
            nkey_seed_file: Some(self.creds.clone()),
            state_nkey_seed_file: None,
            connect_timeout_ms: 3_000,
            request_timeout_ms,
        }
    }

    /// Connects as `name`, a user of `role` (whose inbox the replies come to).
    pub(crate) async fn connect(&self, name: &str, role: Role, request_timeout_ms: u64) -> anyhow::Result<Bus> {
        Ok(Bus::connect(&self.config(request_timeout_ms), name, &role.inbox()).await?)
    }
}
