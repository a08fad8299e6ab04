//! `toka token issue`: a token from auth, asked for with the admin key.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use toka_contract::api::auth::{Credential, IssueRequest, TokenReply};
use toka_contract::capability::{Action, ActionSet, Capability, Pattern};
use toka_contract::subject;
use toka_runtime::bus::Bus;
use toka_runtime::config::NatsConfig;

/// Issue a token with the deployment's admin key and print it.
#[derive(Debug, clap::Args)]
pub(crate) struct Issue {
    /// NATS server URL.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// Client nkey seed file.
    #[arg(long, default_value = "data/creds/client.nk")]
    creds: PathBuf,
    /// The admin key file written by `toka nats-config`.
    #[arg(long, default_value = "data/creds/admin.key")]
    admin_key_file: PathBuf,
    /// The token's subject (who will hold it), e.g. `alice` or `svc/scheduler`.
    #[arg(long)]
    sub: String,
    /// A capability as RESOURCE=ACTION[,ACTION...], e.g. `agent:*=spawn,read` or
    /// `task:builds=claim,heartbeat,complete,fail`; repeat for more.
    #[arg(long = "cap", required = true)]
    caps: Vec<String>,
    /// Lifetime, e.g. `30m`, `1h` (at most auth's `max_token_ttl_ms`).
    #[arg(long, default_value = "1h")]
    ttl: humantime::Duration,
    /// Verifiers accept the token once only.
    #[arg(long)]
    one_time: bool,
    /// Print auth's whole reply as JSON rather than the token alone.
    #[arg(long)]
    json: bool,
}

/// Parses `RESOURCE=ACTION[,ACTION...]`.
fn capability(text: &str) -> anyhow::Result<Capability> {
    let (resource, actions) =
        text.split_once('=').with_context(|| format!("--cap {text}: expected RESOURCE=ACTION[,ACTION...]"))?;
    let resource: Pattern = resource.parse().with_context(|| format!("--cap {text}"))?;
    let actions = actions
        .split(',')
        .map(|a| a.trim().parse::<Action>())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("--cap {text}"))?;
    anyhow::ensure!(!actions.is_empty(), "--cap {text}: no action");
    Ok(Capability { resource, actions: ActionSet::of(&actions) })
}

pub(crate) async fn issue(args: Issue) -> anyhow::Result<()> {
    let capabilities = args.caps.iter().map(|c| capability(c)).collect::<anyhow::Result<Vec<_>>>()?;
    let key = std::fs::read_to_string(&args.admin_key_file)
        .with_context(|| format!("the admin key {}", args.admin_key_file.display()))?;
    let ttl: Duration = args.ttl.into();
    let request = IssueRequest {
        credential: Credential::AdminKey(key.trim().to_owned()),
        sub: args.sub.parse().context("--sub")?,
        capabilities,
        ttl_ms: u64::try_from(ttl.as_millis()).context("--ttl")?,
        one_time: args.one_time,
    };
    let config = NatsConfig {
        url: args.nats_url,
        nkey_seed_file: Some(args.creds),
        connect_timeout_ms: 3_000,
        ..Default::default()
    };
    let bus = Bus::connect(&config, "toka-cli").await?;
    let reply: TokenReply = bus.request(subject::AUTH_ISSUE.subject, &request).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&reply)?);
    } else {
        println!("{}", reply.token);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn capabilities_parse_from_the_command_line() {
        let cap = capability("agent:*=spawn,read").unwrap();
        assert_eq!(cap, Capability::new(Pattern::AnyAgent, &[Action::Spawn, Action::Read]));
        assert!(capability("agent:*").is_err());
        assert!(capability("agent:*=fly").is_err());
        assert!(capability("nowhere=read").is_err());
    }
}
