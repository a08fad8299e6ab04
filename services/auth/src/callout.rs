//! The NATS auth callout: every connection without a key of its own presents a Toka token, the
//! server asks auth (an authorization request on `$SYS.REQ.USER.AUTH` in the `AUTH` account,
//! encrypted to auth's xkey and signed by the server), and auth answers with a user of the `TOKA`
//! account named by the token's ancestry and `jti` (`<root>/…/<jti>`), expiring with the token, whose permissions follow from
//! the token's capabilities (`toka_contract::access::token_permissions`), or with a refusal the
//! client sees as `Authorization Violation`.
//!
//! The token is checked by the same verifier the endpoints use (signature, expiry, revocation),
//! without using up a one-time token. Refusals are logged, counted by reason
//! (`toka_auth_callout_refusals_total`), and aggregated into the audit log's denials.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use futures::StreamExt as _;
use nats_jwt_rs::authorization::AuthResponse;
use nats_jwt_rs::types::{Permission, Permissions as NatsPermissions};
use nats_jwt_rs::user::User;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use toka_contract::access::{self, Account};
use toka_contract::api::auth::Claims;
use toka_runtime::bus::{self, Bus};
use toka_runtime::token;

use crate::Error;
use crate::handlers::{Auth, UNVERIFIED, read};

/// The header carrying the server's public xkey on an encrypted request.
const SERVER_XKEY: &str = "Nats-Server-Xkey";

/// The queue group auth's replicas answer in.
const QUEUE: &str = "toka-auth";

/// The parts of an authorization request the callout reads. (`nats-jwt-rs`'s own request type
/// requires fields nats-server 2.15 leaves out, so the request is read here; the answer is
/// built with its types.)
#[derive(Debug, serde::Deserialize)]
struct Request {
    iss: String,
    nats: RequestBody,
}

#[derive(Debug, serde::Deserialize)]
struct RequestBody {
    user_nkey: String,
    server_id: ServerId,
    #[serde(default)]
    client_info: ClientInfo,
    #[serde(default)]
    connect_opts: ConnectOpts,
}

#[derive(Debug, serde::Deserialize)]
struct ServerId {
    id: String,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ClientInfo {
    #[serde(default)]
    host: String,
    name: Option<String>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ConnectOpts {
    auth_token: Option<String>,
}

/// The claims of a request JWT, checked against the signature of the server key that issued
/// it.
fn decode_request(jwt: &str) -> Result<Request, String> {
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    // `<header>.<claims>` is what the signature covers.
    let (signed, signature) = jwt.rsplit_once('.').ok_or("not a JWT")?;
    let (_header, payload) = signed.split_once('.').filter(|(_, p)| !p.contains('.')).ok_or("not a JWT")?;
    let claims = b64.decode(payload).map_err(|e| format!("claims: {e}"))?;
    let request: Request = serde_json::from_slice(&claims).map_err(|e| format!("claims: {e}"))?;
    let signature = b64.decode(signature).map_err(|e| format!("signature: {e}"))?;
    let server = nkeys::KeyPair::from_public_key(&request.iss).map_err(|e| format!("issuer: {e}"))?;
    server.verify(signed.as_bytes(), &signature).map_err(|e| format!("signature: {e}"))?;
    if !request.iss.starts_with('N') || request.iss != request.nats.server_id.id {
        return Err(format!("issued by {}, not the server that asks", request.iss));
    }
    Ok(request)
}

/// Labels of the refusal counter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct RefusalLabels {
    reason: String,
}

/// The keys the callout answers with, and what it counts.
pub(crate) struct Callout {
    issuer: nkeys::KeyPair,
    xkey: nkeys::XKey,
    refusals: Family<RefusalLabels, Counter>,
}

impl std::fmt::Debug for Callout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Callout").field("issuer", &self.issuer.public_key()).finish_non_exhaustive()
    }
}

/// Why a connection was refused: a short reason for the counter, and the whole story for the
/// log.
#[derive(Debug)]
struct Refusal {
    reason: &'static str,
    detail: String,
}

impl Refusal {
    fn new(reason: &'static str, detail: impl Into<String>) -> Refusal {
        Refusal { reason, detail: detail.into() }
    }
}

/// The counter's reason for a token the verifier refused.
fn reason(e: &token::Error) -> &'static str {
    match e {
        token::Error::Malformed(_)
        | token::Error::Algorithm(_)
        | token::Error::Audience
        | token::Error::Issuer
        | token::Error::Claims(_) => "malformed",
        token::Error::UnknownKey(_) => "unknown_key",
        token::Error::BadSignature => "bad_signature",
        token::Error::Expired => "expired",
        token::Error::NotYetValid => "not_yet_valid",
        token::Error::Revoked(_) => "revoked",
        token::Error::Replayed(_) => "replayed",
        token::Error::Key(_) => "key",
    }
}

impl Callout {
    /// The callout with the issuer's account seed and the xkey seed at these paths.
    pub(crate) fn load(issuer_seed: &Path, xkey_seed: &Path) -> Result<Callout, Error> {
        let issuer = bus::read_seed_of(issuer_seed, "SA", "an account nkey seed")?;
        let issuer = nkeys::KeyPair::from_seed(&issuer)
            .map_err(|e| Error::Setting(format!("auth.callout.issuer_seed_file: {e}")))?;
        let xkey = bus::read_seed_of(xkey_seed, "SX", "a curve (xkey) seed")?;
        let xkey =
            nkeys::XKey::from_seed(&xkey).map_err(|e| Error::Setting(format!("auth.callout.xkey_seed_file: {e}")))?;
        Ok(Callout { issuer, xkey, refusals: Family::default() })
    }

    /// The refusal counter, for `/metrics`.
    pub(crate) fn refusals(&self) -> Family<RefusalLabels, Counter> {
        self.refusals.clone()
    }

    /// The (encrypted, where the request was) answer to one authorization request.
    fn answer(&self, auth: &Auth, payload: &[u8], server_xkey: Option<&str>, now_s: u64) -> Result<Vec<u8>, String> {
        let server_xkey = server_xkey
            .map(|k| nkeys::XKey::from_public_key(k).map_err(|e| format!("the server's xkey {k}: {e}")))
            .transpose()?;
        let request = match &server_xkey {
            Some(server) => self.xkey.open(payload, server).map_err(|e| format!("cannot decrypt: {e}"))?,
            None => payload.to_vec(),
        };
        let request = std::str::from_utf8(&request).map_err(|e| format!("not text: {e}"))?;
        // Signed by the server that asks.
        let request = decode_request(request).map_err(|e| format!("not a signed request: {e}"))?;
        let user_nkey = request.nats.user_nkey.clone();
        let server_id = request.nats.server_id.id.clone();
        let token = request.nats.connect_opts.auth_token.as_deref().unwrap_or("");
        let mut response = AuthResponse::generic_claim(user_nkey.clone());
        response.aud = Some(server_id);
        match self.admit(auth, token, &user_nkey, now_s) {
            Ok(jwt) => response.nats.jwt = jwt,
            Err(refusal) => {
                tracing::info!(
                    reason = refusal.reason,
                    detail = %refusal.detail,
                    client = ?request.nats.client_info.name,
                    host = %request.nats.client_info.host,
                    "connection refused"
                );
                self.refusals.get_or_create(&RefusalLabels { reason: refusal.reason.to_owned() }).inc();
                auth.ledger.deny(UNVERIFIED, "connect", "nats", &refusal.detail);
                response.nats.error = format!("not authorized: {}", refusal.reason);
            }
        }
        let response = response.encode(&self.issuer).map_err(|e| format!("cannot sign the response: {e}"))?;
        match &server_xkey {
            Some(server) => self.xkey.seal(response.as_bytes(), server).map_err(|e| format!("cannot encrypt: {e}")),
            None => Ok(response.into_bytes()),
        }
    }

    /// The user JWT for a connection presenting `token`, or why not.
    fn admit(&self, auth: &Auth, token: &str, user_nkey: &str, now_s: u64) -> Result<String, Refusal> {
        if token.is_empty() {
            return Err(Refusal::new("no_token", "no token presented"));
        }
        let claims: Claims = read(&auth.verifier).check(token, now_s).map_err(|e| {
            let detail = match token::unverified_jti(token) {
                Some(jti) => format!("{e} (token {jti})"),
                None => e.to_string(),
            };
            Refusal::new(reason(&e), detail)
        })?;
        let jti = claims.jti.to_string();
        let permissions = access::token_permissions(&jti, &claims.caps);
        // Named by its ancestry and its own id, `<root>/…/<jti>`: the server lists connections
        // by this name, so revoking any of them finds the connection (`kick`).
        let name = claims.chain.iter().map(|t| t.to_string()).chain([jti]).collect::<Vec<_>>().join("/");
        let mut user = User::new_claims(name, user_nkey.to_owned());
        user.aud = Some(Account::Toka.name().to_owned());
        user.exp = Some(i64::try_from(claims.exp).unwrap_or(i64::MAX));
        user.nats.permissions.permissions = NatsPermissions {
            publish: Permission { allow: permissions.publish, deny: Vec::new() },
            subscribe: Permission { allow: permissions.subscribe, deny: Vec::new() },
            resp: None,
        };
        user.nats.generic_fields.tags = Some(vec![format!("sub:{}", claims.sub)]);
        user.encode(&self.issuer).map_err(|e| Refusal::new("internal", format!("cannot sign the user: {e}")))
    }
}

/// Answers authorization requests on `bus` (the callout user's connection) until the task is
/// aborted or the connection closes.
pub(crate) async fn serve(
    auth: Arc<Auth>,
    callout: Arc<Callout>,
    bus: Bus,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let mut requests = bus
        .client()
        .queue_subscribe(access::CALLOUT_SUBJECT, QUEUE.to_owned())
        .await
        .map_err(|e| Error::Subscribe(format!("{}: {e}", access::CALLOUT_SUBJECT)))?;
    Ok(tokio::spawn(async move {
        while let Some(message) = requests.next().await {
            let Some(reply) = message.reply.clone() else { continue };
            let server_xkey = message.headers.as_ref().and_then(|h| h.get(SERVER_XKEY)).map(|v| v.to_string());
            match callout.answer(&auth, &message.payload, server_xkey.as_deref(), toka_runtime::now_us() / 1_000_000) {
                Ok(body) => {
                    if let Err(e) = bus.client().publish(reply, body.into()).await {
                        tracing::warn!(error = %e, "authorization answer not sent");
                    }
                }
                // Not answering: the server refuses the connection when it hears nothing.
                Err(e) => tracing::warn!(error = %e, "an authorization request auth cannot answer"),
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A request JWT as a server signs it: `iss` its key, claims about `server_id`.
    fn signed(server: &nkeys::KeyPair, server_id: &str, token: &str) -> String {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let claims = serde_json::json!({
            "iss": server.public_key(),
            "nats": {
                "user_nkey": "UXXX",
                "server_id": { "id": server_id },
                "client_info": { "host": "127.0.0.1" },
                "connect_opts": { "auth_token": token }
            }
        });
        let body = format!("{header}.{}", b64.encode(claims.to_string()));
        let signature = b64.encode(server.sign(body.as_bytes()).unwrap());
        format!("{body}.{signature}")
    }

    #[test]
    fn a_request_is_read_only_when_the_server_that_asks_signed_it() {
        let server = nkeys::KeyPair::new_server();
        let good = signed(&server, &server.public_key(), "the-token");
        let request = decode_request(&good).unwrap();
        assert_eq!(request.nats.connect_opts.auth_token.as_deref(), Some("the-token"));
        assert_eq!(request.nats.user_nkey, "UXXX");

        // Claims changed after signing.
        let mut parts: Vec<String> = good.split('.').map(String::from).collect();
        let forged = signed(&server, &server.public_key(), "another-token");
        parts[1] = forged.split('.').nth(1).unwrap().to_owned();
        assert!(decode_request(&parts.join(".")).unwrap_err().contains("signature"));
        // Signed by one key, claiming to be another server.
        let other = nkeys::KeyPair::new_server();
        assert!(decode_request(&signed(&server, &other.public_key(), "t")).unwrap_err().contains("not the server"));
        // Signed by a user key, not a server's.
        let user = nkeys::KeyPair::new_user();
        assert!(decode_request(&signed(&user, &user.public_key(), "t")).is_err());
        for garbage in ["", "a.b", "a.b.c", "a.b.c.d"] {
            assert!(decode_request(garbage).is_err(), "{garbage:?}");
        }
    }
}
