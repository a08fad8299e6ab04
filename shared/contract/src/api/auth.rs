//! Auth's endpoints.

use serde::{Deserialize, Serialize};

/// The audience of every Toka token (`aud`).
pub const AUDIENCE: &str = "toka";
/// The issuer of every Toka token (`iss`).
pub const ISSUER: &str = "toka-auth";

use crate::capability::Capability;
use crate::spec::Principal;
use crate::{AgentId, TokenId};

/// How a caller of an administrative endpoint proves itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Credential {
    /// A token holding the needed `token:*` action.
    Token(String),
    /// The admin key configured at deploy time.
    AdminKey(String),
}

/// `toka.auth.v1.issue`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    /// Who asks (admin key, or a token with `issue` on `token:*`).
    pub credential: Credential,
    /// The new token's subject.
    pub sub: Principal,
    /// What it allows (at least one).
    pub capabilities: Vec<Capability>,
    /// Lifetime in milliseconds, at most the configured maximum.
    pub ttl_ms: u64,
    /// Whether verifiers accept it only once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_time: bool,
}

/// A token handed out by issue or delegate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenReply {
    /// The JWT.
    pub token: String,
    /// Its id.
    pub jti: TokenId,
    /// When it expires.
    pub expires_at_us: u64,
    /// Its delegation depth (0 for an issued token).
    pub depth: u8,
}

/// `toka.auth.v1.agent_token`: a token for an agent the kernel has just spawned, delegated from
/// the spawner's with the subject `agent:<agent>`. Only the kernel's NATS user may publish
/// this subject, which is how auth knows the name is the kernel's word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentTokenRequest {
    /// The spawner's token.
    pub token: String,
    /// The agent spawned.
    pub agent: AgentId,
    /// What the agent's token allows; each must be covered by one of the spawner's.
    pub capabilities: Vec<Capability>,
    /// Lifetime in milliseconds; never past the spawner's token.
    pub ttl_ms: u64,
}

/// `toka.auth.v1.delegate`: a child of `token` with a subset of its capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegateRequest {
    /// The parent token, held by the caller.
    pub token: String,
    /// The child's subject: the parent's (the default) or a name under it,
    /// `<parent's sub>/<suffix>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<Principal>,
    /// What the child allows; each must be covered by one of the parent's.
    pub capabilities: Vec<Capability>,
    /// Lifetime in milliseconds; the child never outlives its parent.
    pub ttl_ms: u64,
    /// Whether verifiers accept it only once (always, when the parent is one-time).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub one_time: bool,
}

/// `toka.auth.v1.revoke`: revoke a token and every token delegated from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// Who asks: the admin key, a token with `revoke` on `token:*`, or the token itself or
    /// an ancestor of it.
    pub credential: Credential,
    /// The token to revoke.
    pub jti: TokenId,
    /// Why.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// The outcome of a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeReply {
    /// The revoked token.
    pub jti: TokenId,
    /// The revocation epoch now.
    pub epoch: u64,
}

/// `toka.auth.v1.jwks`: RFC 7517 key set. A client names itself with its token and reads
/// within its root's `read` budget; without one (`{}`), or with one that does not verify, it
/// shares the small `unverified` budget of the endpoint with every such request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksRequest {
    /// The caller's token, for its own budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// One public key (RFC 8037 OKP, Ed25519).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    /// Always `OKP`.
    pub kty: String,
    /// Always `Ed25519`.
    pub crv: String,
    /// Always `EdDSA`.
    pub alg: String,
    /// Always `sig`.
    #[serde(rename = "use")]
    pub use_: String,
    /// The key id, as in tokens' `kid` header.
    pub kid: String,
    /// The public key, base64url without padding.
    pub x: String,
}

/// The key set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksReply {
    /// Every key that verifies now, the signing key first.
    pub keys: Vec<Jwk>,
}

/// `toka.auth.v1.rotate`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// Who asks (admin key, or a token with `rotate` on `token:*`).
    pub credential: Credential,
}

/// The outcome of a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateReply {
    /// The new signing key.
    pub kid: String,
    /// The key it replaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_kid: Option<String>,
    /// When the previous key stops verifying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at_us: Option<u64>,
}

/// `toka.auth.v1.revocations`: a page of the revocations in force, in `jti` order (the first
/// page for `{}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationsRequest {
    /// The caller's token, for its own budget (as for `jwks`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The page after this `jti` (a reply's `next`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<TokenId>,
    /// At most this many (auth caps it at its page size, `auth.revocations_page`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// One revocation in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    /// The revoked token.
    pub jti: TokenId,
    /// When.
    pub revoked_at_us: u64,
    /// When the token would have expired; the entry can be dropped after.
    pub expires_at_us: u64,
}

/// A page of the revocations in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationsReply {
    /// The revocation epoch (how many revocations ever).
    pub epoch: u64,
    /// The revocations of this page, in `jti` order.
    pub revoked: Vec<Revocation>,
    /// Where the next page starts (`after`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<TokenId>,
}

/// Published on [`crate::subject::AUTH_HEARTBEAT`] every `interval_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The revocation epoch.
    pub epoch: u64,
    /// Auth's clock when sent.
    pub time_us: u64,
    /// The heartbeat interval.
    pub interval_ms: u64,
}

/// The claims of a Toka token (the JWT payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The issuer (the deployment's auth).
    pub iss: String,
    /// The subject.
    pub sub: Principal,
    /// The audience.
    pub aud: String,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Not before, seconds since the epoch.
    pub nbf: u64,
    /// Issued at, seconds since the epoch.
    pub iat: u64,
    /// The token id.
    pub jti: TokenId,
    /// What it allows.
    pub caps: Vec<Capability>,
    /// Ancestors' ids, the issued root first; empty for an issued token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<TokenId>,
    /// Delegation depth: `chain.len()`.
    #[serde(default, skip_serializing_if = "crate::spec::is_default")]
    pub depth: u8,
    /// Accepted only once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub once: bool,
    /// The principal at the top of the chain (the issued token's subject); absent on an issued
    /// token, whose `sub` it is. Rate limits are kept per root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Principal>,
}

impl Claims {
    /// The principal at the top of the chain: what limits are kept by.
    pub fn root(&self) -> &Principal {
        self.root.as_ref().unwrap_or(&self.sub)
    }
}
