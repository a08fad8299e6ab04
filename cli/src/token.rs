//! `toka token issue`: a token from auth, asked for with the admin key.

use std::path::PathBuf;

use anyhow::Context as _;
use toka_client::Client;
use toka_contract::capability::{Action, ActionSet, Capability, Pattern};

/// Issue a token with the deployment's admin key and print it.
#[derive(Debug, clap::Args)]
pub(crate) struct Issue {
    #[command(flatten)]
    nats: crate::connect::Nats,
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
    let sub = args.sub.parse().context("--sub")?;
    let bus = args.nats.connect("toka-cli", toka_contract::access::Role::Operator, 5_000).await?;
    let reply = Client::issue_token(&bus, &key, sub, capabilities, args.ttl.into(), args.one_time).await?;
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
