//! Closing the open connections of a revoked token and of every token delegated from it: the
//! callout admitted each connection as a user named by its token's ancestry and `jti`
//! (`<root>/…/<jti>`, `callout`), so auth's system user asks every server for the `TOKA`
//! account's connections (`$SYS.REQ.SERVER.PING.CONNZ`) and kicks those whose name holds the
//! revoked `jti` (`$SYS.REQ.SERVER.<id>.KICK`). A kicked client that reconnects with the same
//! token is refused by the callout.

use std::time::Duration;

use futures::StreamExt as _;
use serde::Deserialize;
use toka_contract::access::Account;
use toka_runtime::bus::Bus;

/// How many connections one CONNZ page lists.
const PAGE: u64 = 1_024;

/// How long the servers have to answer a CONNZ ping.
const ANSWERS_WITHIN: Duration = Duration::from_millis(500);

#[derive(Debug, Deserialize)]
struct ServerReply {
    server: ServerInfo,
    #[serde(default)]
    data: Option<Connz>,
}

#[derive(Debug, Deserialize)]
struct ServerInfo {
    id: String,
}

#[derive(Debug, Deserialize)]
struct Connz {
    #[serde(default)]
    total: u64,
    #[serde(default)]
    connections: Vec<Connection>,
}

#[derive(Debug, Deserialize)]
struct Connection {
    cid: u64,
    /// The user's name: the token's ancestry, `<root>/…/<jti>` (`callout`).
    #[serde(default)]
    authorized_user: String,
}

impl Connection {
    fn acts_with(&self, jti: &str) -> bool {
        self.authorized_user.split('/').any(|t| t == jti)
    }
}

/// One page of every server's open `TOKA` connections: (server id, connections, total).
async fn connz_page(bus: &Bus, offset: u64) -> Result<Vec<(String, Connz)>, String> {
    let client = bus.client();
    let inbox = client.new_inbox();
    let mut answers = client.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    let body = serde_json::json!({ "acc": Account::Toka.name(), "auth": true, "offset": offset, "limit": PAGE });
    client
        .publish_with_reply("$SYS.REQ.SERVER.PING.CONNZ", inbox, body.to_string().into())
        .await
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + ANSWERS_WITHIN;
    let mut pages = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await {
        match serde_json::from_slice::<ServerReply>(&message.payload) {
            Ok(ServerReply { server, data: Some(connz) }) => pages.push((server.id, connz)),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "a CONNZ answer that does not parse"),
        }
    }
    Ok(pages)
}

/// Closes every open connection acting with `jti` or a token delegated from it; how many.
pub(crate) async fn close_connections(bus: &Bus, jti: &str) -> Result<usize, String> {
    let mut found: Vec<(String, u64)> = Vec::new();
    let mut offset = 0;
    loop {
        let pages = connz_page(bus, offset).await?;
        let more = pages.iter().any(|(_, connz)| connz.total > offset + PAGE);
        for (server, connz) in pages {
            found.extend(connz.connections.iter().filter(|c| c.acts_with(jti)).map(|c| (server.clone(), c.cid)));
        }
        if !more {
            break;
        }
        offset += PAGE;
    }
    let mut closed = 0;
    for (server, cid) in found {
        let body = serde_json::json!({ "cid": cid }).to_string();
        match bus.client().request(format!("$SYS.REQ.SERVER.{server}.KICK"), body.into()).await {
            Ok(answer) if !String::from_utf8_lossy(&answer.payload).contains("\"error\"") => closed += 1,
            Ok(answer) => {
                tracing::warn!(cid, answer = %String::from_utf8_lossy(&answer.payload), "connection not closed");
            }
            Err(e) => tracing::warn!(cid, error = %e, "connection not closed"),
        }
    }
    Ok(closed)
}

/// Closes the connections of each revoked token sent on `revoked`, until it closes. What was
/// queued before this started (revocations read from the log at start-up) is skipped: those
/// tokens were refused at connect from the moment they were revoked.
pub(crate) async fn serve(bus: Bus, mut revoked: tokio::sync::mpsc::UnboundedReceiver<String>) {
    let mut skipped = 0;
    while revoked.try_recv().is_ok() {
        skipped += 1;
    }
    tracing::debug!(skipped, "closing the connections of revoked tokens from now on");
    while let Some(jti) = revoked.recv().await {
        match close_connections(&bus, &jti).await {
            Ok(0) => tracing::debug!(%jti, "revoked; no open connection"),
            Ok(closed) => tracing::info!(%jti, closed, "revoked; its open connections closed"),
            Err(e) => tracing::warn!(%jti, error = %e, "revoked; its connections could not be listed"),
        }
    }
}
