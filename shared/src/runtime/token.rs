//! Toka capability tokens: Ed25519-signed JWTs (EdDSA, `kid` header) carrying
//! [`Claims`], and the verifier every service that accepts tokens uses.
//!
//! Verification refuses, each with its own error: anything but EdDSA (`alg: none`, HS256 made
//! with the public key, …), an unknown `kid`, a bad signature, an expired or not-yet-valid
//! token (with a small configurable leeway), another audience or issuer, claims that contradict
//! themselves, a revoked token or a revoked ancestor, and a second use of a one-time token.
//! Verified tokens are cached by hash; the cache still honours expiry, revocation and one-time
//! use.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};

use crate::TokenId;
use crate::api::auth::{Claims, Jwk, JwksReply};
use crate::wire::{ErrorCode, WireError};

/// The audience of every Toka token.
pub const AUDIENCE: &str = "toka";
/// The issuer of every Toka token.
pub const ISSUER: &str = "toka-auth";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not a compact JWS with a JSON header, or no `kid`.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed with something other than EdDSA.
    #[error("algorithm {0} is not accepted; Toka tokens are EdDSA")]
    Algorithm(String),
    /// Signed with a key the verifier does not know (refetch the JWKS and retry once).
    #[error("unknown signing key {0}")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("bad signature")]
    BadSignature,
    /// Past `exp`.
    #[error("token expired")]
    Expired,
    /// Before `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// Another audience.
    #[error("token is for another audience")]
    Audience,
    /// Another issuer.
    #[error("token is from another issuer")]
    Issuer,
    /// The claims contradict themselves (depth against chain, missing capabilities).
    #[error("inconsistent claims: {0}")]
    Claims(String),
    /// The token or an ancestor is revoked.
    #[error("token {0} is revoked")]
    Revoked(TokenId),
    /// A one-time token presented again.
    #[error("one-time token {0} was already used")]
    Replayed(TokenId),
    /// The key material is unusable.
    #[error("key: {0}")]
    Key(String),
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        WireError::new(ErrorCode::Unauthorized, e.to_string())
    }
}

/// A private Ed25519 signing key with its id.
pub struct SigningKey {
    kid: String,
    seed: [u8; 32],
    /// Kept expanded: `jsonwebtoken::encode` rebuilds the key from PKCS#8 on every call, which
    /// was half of what a signature cost (and a tenth of auth's CPU under load).
    key: ed25519_dalek::SigningKey,
    public: [u8; 32],
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl SigningKey {
    /// A new key from the operating system's random source.
    pub fn generate(kid: &str) -> Result<SigningKey, Error> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| Error::Key(e.to_string()))?;
        Ok(SigningKey::from_seed(kid, seed))
    }

    /// The key with this seed (as stored by auth's key store).
    pub fn from_seed(kid: &str, seed: [u8; 32]) -> SigningKey {
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        let public = key.verifying_key().to_bytes();
        SigningKey { kid: kid.to_owned(), seed, key, public }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private seed, for the key store.
    pub fn seed(&self) -> [u8; 32] {
        self.seed
    }

    /// The public key as a JWK (RFC 8037).
    pub fn jwk(&self) -> Jwk {
        Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            alg: "EdDSA".into(),
            use_: "sig".into(),
            kid: self.kid.clone(),
            x: b64url(&self.public),
        }
    }

    /// Signs `claims`: a compact JWS (RFC 7515) with `jsonwebtoken`'s header, as its `encode`
    /// builds it, signed with the kept key. Verification stays with `jsonwebtoken`.
    pub fn sign(&self, claims: &Claims) -> Result<String, Error> {
        use ed25519_dalek::Signer as _;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let part =
            |json: Result<Vec<u8>, serde_json::Error>| json.map(|j| b64url(&j)).map_err(|e| Error::Key(e.to_string()));
        let message = format!("{}.{}", part(serde_json::to_vec(&header))?, part(serde_json::to_vec(claims))?);
        let signature = self.key.sign(message.as_bytes());
        Ok(format!("{message}.{}", b64url(&signature.to_bytes())))
    }
}

/// Checks tokens against a key set, the revocations it has heard of, and one-time use.
pub struct Verifier {
    keys: BTreeMap<String, DecodingKey>,
    leeway_s: u64,
    revoked: BTreeSet<TokenId>,
    used_once: Mutex<BTreeSet<TokenId>>,
    cache: Mutex<BTreeMap<[u8; 32], Claims>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

/// The most verified tokens kept in the cache before it is emptied.
const CACHE_LIMIT: usize = 100_000;

impl Verifier {
    /// A verifier for the keys of `jwks` (only Ed25519 / EdDSA signing keys are taken), with
    /// `leeway_s` seconds of clock skew allowed on `exp` and `nbf`.
    pub fn new(jwks: &JwksReply, leeway_s: u64) -> Result<Verifier, Error> {
        let mut verifier = Verifier {
            keys: BTreeMap::new(),
            leeway_s,
            revoked: BTreeSet::new(),
            used_once: Mutex::default(),
            cache: Mutex::default(),
        };
        verifier.set_keys(jwks)?;
        Ok(verifier)
    }

    /// Replaces the key set.
    pub fn set_keys(&mut self, jwks: &JwksReply) -> Result<(), Error> {
        let mut keys = BTreeMap::new();
        for k in &jwks.keys {
            if k.kty != "OKP" || k.crv != "Ed25519" || k.alg != "EdDSA" || k.use_ != "sig" {
                return Err(Error::Key(format!("key {} is not an Ed25519 signing key", k.kid)));
            }
            keys.insert(k.kid.clone(), DecodingKey::from_ed_components(&k.x).map_err(|e| Error::Key(e.to_string()))?);
        }
        self.keys = keys;
        self.clear_cache();
        Ok(())
    }

    /// Records a revocation (of a token and, through the chain check, its descendants).
    pub fn revoke(&mut self, jti: TokenId) {
        self.revoked.insert(jti);
    }

    /// Replaces the revocations with the full set (fetched at start-up or after a missed one).
    pub fn set_revoked(&mut self, revoked: BTreeSet<TokenId>) {
        self.revoked = revoked;
    }

    /// The ids of the keys it accepts.
    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    fn clear_cache(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
    }

    /// The claims of `token` if it is valid at `now_s` (seconds since the epoch).
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, Error> {
        let digest = *blake3::hash(token.as_bytes()).as_bytes();
        let cached = self.cache.lock().ok().and_then(|c| c.get(&digest).cloned());
        let claims = match cached {
            Some(claims) => claims,
            None => {
                let claims = self.check_signature(token)?;
                if let Ok(mut cache) = self.cache.lock() {
                    if cache.len() >= CACHE_LIMIT {
                        cache.clear();
                    }
                    cache.insert(digest, claims.clone());
                }
                claims
            }
        };
        self.check_claims(&claims, now_s)?;
        if claims.once {
            let mut used = self.used_once.lock().map_err(|_| Error::Replayed(claims.jti))?;
            if !used.insert(claims.jti) {
                return Err(Error::Replayed(claims.jti));
            }
        }
        Ok(claims)
    }

    /// Header, algorithm, key and signature; the registered claims' shape.
    fn check_signature(&self, token: &str) -> Result<Claims, Error> {
        // Read the header by hand first: `alg` values the library does not know (`none`)
        // must be refused as algorithms, not as parse errors.
        let header_b64 = token.split('.').next().ok_or_else(|| Error::Malformed("no header".into()))?;
        let header_json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header_b64)
            .map_err(|e| Error::Malformed(format!("header is not base64url: {e}")))?;
        let header: serde_json::Value =
            serde_json::from_slice(&header_json).map_err(|e| Error::Malformed(format!("header is not JSON: {e}")))?;
        let alg = header["alg"].as_str().unwrap_or("");
        if alg != "EdDSA" {
            return Err(Error::Algorithm(alg.to_owned()));
        }
        let kid = header["kid"].as_str().ok_or_else(|| Error::Malformed("no kid".into()))?;
        let key = self.keys.get(kid).ok_or_else(|| Error::UnknownKey(kid.to_owned()))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        // Time is checked by `check_claims` against the caller's clock, also for cached tokens.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            match e.kind() {
                InvalidSignature => Error::BadSignature,
                InvalidAudience => Error::Audience,
                InvalidIssuer => Error::Issuer,
                InvalidAlgorithm => Error::Algorithm(alg.to_owned()),
                _ => Error::Malformed(e.to_string()),
            }
        })?;
        let claims = data.claims;
        if usize::from(claims.depth) != claims.chain.len() {
            return Err(Error::Claims(format!("depth {} with {} ancestors", claims.depth, claims.chain.len())));
        }
        if claims.caps.is_empty() {
            return Err(Error::Claims("no capabilities".into()));
        }
        Ok(claims)
    }

    /// Time and revocation: what may change after a token was verified.
    fn check_claims(&self, claims: &Claims, now_s: u64) -> Result<(), Error> {
        if now_s > claims.exp.saturating_add(self.leeway_s) {
            return Err(Error::Expired);
        }
        if now_s.saturating_add(self.leeway_s) < claims.nbf {
            return Err(Error::NotYetValid);
        }
        if let Some(jti) = std::iter::once(&claims.jti).chain(&claims.chain).find(|j| self.revoked.contains(j)) {
            return Err(Error::Revoked(*jti));
        }
        Ok(())
    }
}

/// Why a delegation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DelegationError {
    /// A requested capability is not covered by any single capability of the parent.
    #[error("capability {0} is not covered by the parent token")]
    Widened(String),
    /// The chain would grow past the depth cap.
    #[error("delegation depth {depth} exceeds the cap of {cap}")]
    TooDeep {
        /// The child's depth.
        depth: usize,
        /// The cap.
        cap: u8,
    },
    /// Nothing requested.
    #[error("a delegated token needs at least one capability")]
    Empty,
    /// The lifetime asked for is zero.
    #[error("a delegated token needs a lifetime")]
    NoLifetime,
    /// The child would outlive its parent.
    #[error("the child would expire at {child_exp}, after its parent at {parent_exp}")]
    Outlives {
        /// When the child would expire (seconds since the epoch).
        child_exp: u64,
        /// When the parent expires.
        parent_exp: u64,
    },
}

/// The claims of a child of `parent`: a subset of its capabilities, a lifetime that ends no
/// later than the parent's (a longer one is refused, not shortened), one more link in the chain, under the depth cap. `lineage` answers
/// descent between agents where the caller knows the tree (the kernel); auth, which does not,
/// passes [`crate::capability::NoLineage`].
#[allow(clippy::too_many_arguments)]
pub fn delegate(
    parent: &Claims,
    sub: Option<crate::spec::Principal>,
    caps: Vec<crate::capability::Capability>,
    ttl_s: u64,
    once: bool,
    jti: TokenId,
    now_s: u64,
    max_depth: u8,
    lineage: &impl crate::capability::Lineage,
) -> Result<Claims, DelegationError> {
    if caps.is_empty() {
        return Err(DelegationError::Empty);
    }
    if ttl_s == 0 {
        return Err(DelegationError::NoLifetime);
    }
    if let Some(wider) = crate::capability::first_uncovered(&caps, &parent.caps, lineage) {
        return Err(DelegationError::Widened(format!("{} {:?}", wider.resource, wider.actions)));
    }
    let depth = parent.chain.len() + 1;
    if depth > usize::from(max_depth) {
        return Err(DelegationError::TooDeep { depth, cap: max_depth });
    }
    let exp = now_s.saturating_add(ttl_s);
    if exp > parent.exp {
        return Err(DelegationError::Outlives { child_exp: exp, parent_exp: parent.exp });
    }
    let mut chain = parent.chain.clone();
    chain.push(parent.jti);
    Ok(Claims {
        iss: parent.iss.clone(),
        sub: sub.unwrap_or_else(|| parent.sub.clone()),
        aud: parent.aud.clone(),
        exp,
        nbf: now_s.max(parent.nbf),
        iat: now_s,
        jti,
        caps,
        chain,
        depth: depth as u8,
        once,
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::EncodingKey;

    use super::*;
    use crate::capability::{Action, Capability, Pattern};

    #[test]
    fn a_signature_is_the_one_jsonwebtoken_makes() {
        // Ed25519 signatures are deterministic: the kept key must give the library's token,
        // byte for byte (PKCS#8 v1 wrapping of the seed, RFC 8410).
        let seed = [5; 32];
        let pkcs8 = [
            &[0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20][..],
            &seed[..],
        ]
        .concat();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        let library = jsonwebtoken::encode(&header, &claims(4), &EncodingKey::from_ed_der(&pkcs8)).unwrap();
        assert_eq!(SigningKey::from_seed("k1", seed).sign(&claims(4)).unwrap(), library);
    }

    const NOW: u64 = 1_764_150_000;

    fn claims(jti: u128) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: "operator".parse().unwrap(),
            aud: AUDIENCE.into(),
            exp: NOW + 600,
            nbf: NOW - 5,
            iat: NOW - 5,
            jti: TokenId::from_u128(jti),
            caps: vec![Capability::new(Pattern::AnyAgent, &[Action::Spawn])],
            chain: Vec::new(),
            depth: 0,
            once: false,
        }
    }

    fn setup() -> (SigningKey, Verifier) {
        let key = SigningKey::from_seed("k1", [7; 32]);
        let verifier = Verifier::new(&JwksReply { keys: vec![key.jwk()] }, 2).unwrap();
        (key, verifier)
    }

    fn forge(header: &str, claims: &Claims, signature: &[u8]) -> String {
        let c = serde_json::to_vec(claims).unwrap();
        format!("{}.{}.{}", b64url(header.as_bytes()), b64url(&c), b64url(signature))
    }

    #[test]
    fn a_signed_token_verifies_and_is_cached() {
        let (key, verifier) = setup();
        let token = key.sign(&claims(1)).unwrap();
        assert_eq!(verifier.verify(&token, NOW).unwrap(), claims(1));
        assert_eq!(verifier.verify(&token, NOW).unwrap(), claims(1), "again, from the cache");
    }

    #[test]
    fn every_attack_is_refused_with_its_own_error() {
        let (key, mut verifier) = setup();
        let good = key.sign(&claims(1)).unwrap();
        // alg: none, unsigned.
        let none = forge(r#"{"alg":"none","typ":"JWT"}"#, &claims(1), b"");
        assert_eq!(verifier.verify(&none, NOW), Err(Error::Algorithm("none".into())));
        // HS256 signed with the public key as the secret (key confusion).
        let public = key.jwk().x;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let confused = jsonwebtoken::encode(&header, &claims(1), &EncodingKey::from_secret(public.as_bytes())).unwrap();
        assert_eq!(verifier.verify(&confused, NOW), Err(Error::Algorithm("HS256".into())));
        // A signature from another key under our kid.
        let impostor = SigningKey::from_seed("k1", [9; 32]).sign(&claims(1)).unwrap();
        assert_eq!(verifier.verify(&impostor, NOW), Err(Error::BadSignature));
        // Unknown kid.
        let stranger = SigningKey::from_seed("k9", [7; 32]).sign(&claims(1)).unwrap();
        assert_eq!(verifier.verify(&stranger, NOW), Err(Error::UnknownKey("k9".into())));
        // Expired and not yet valid, beyond the leeway.
        assert_eq!(verifier.verify(&good, NOW + 600 + 3), Err(Error::Expired));
        assert!(verifier.verify(&good, NOW + 600 + 2).is_ok(), "within the leeway");
        let early = key.sign(&Claims { nbf: NOW + 60, ..claims(2) }).unwrap();
        assert_eq!(verifier.verify(&early, NOW), Err(Error::NotYetValid));
        // Another audience, another issuer.
        let elsewhere = key.sign(&Claims { aud: "other".into(), ..claims(3) }).unwrap();
        assert_eq!(verifier.verify(&elsewhere, NOW), Err(Error::Audience));
        let foreign = key.sign(&Claims { iss: "mallory".into(), ..claims(4) }).unwrap();
        assert_eq!(verifier.verify(&foreign, NOW), Err(Error::Issuer));
        // Tampered claims under a valid signature.
        let parts: Vec<&str> = good.split('.').collect();
        let widened = Claims { caps: vec![Capability::new(Pattern::Tokens, &[Action::Issue])], ..claims(1) };
        let tampered = format!("{}.{}.{}", parts[0], b64url(&serde_json::to_vec(&widened).unwrap()), parts[2]);
        assert_eq!(verifier.verify(&tampered, NOW), Err(Error::BadSignature));
        // Self-contradicting claims, signed.
        let odd = key.sign(&Claims { depth: 2, ..claims(5) }).unwrap();
        assert!(matches!(verifier.verify(&odd, NOW), Err(Error::Claims(_))));
        // Garbage.
        assert!(matches!(verifier.verify("not-a-token", NOW), Err(Error::Malformed(_))));
        // Revoked, also while cached; a revoked ancestor revokes the child.
        assert!(verifier.verify(&good, NOW).is_ok());
        verifier.revoke(TokenId::from_u128(1));
        assert_eq!(verifier.verify(&good, NOW), Err(Error::Revoked(TokenId::from_u128(1))));
        let child = key.sign(&Claims { chain: vec![TokenId::from_u128(1)], depth: 1, ..claims(6) }).unwrap();
        assert_eq!(verifier.verify(&child, NOW), Err(Error::Revoked(TokenId::from_u128(1))));
    }

    #[test]
    fn a_one_time_token_works_once() {
        let (key, verifier) = setup();
        let once = key.sign(&Claims { once: true, ..claims(8) }).unwrap();
        assert!(verifier.verify(&once, NOW).is_ok());
        assert_eq!(verifier.verify(&once, NOW), Err(Error::Replayed(TokenId::from_u128(8))));
    }

    #[test]
    fn delegation_narrows_shortens_and_deepens() {
        use crate::capability::NoLineage;
        let parent = Claims {
            caps: vec![
                Capability::new(Pattern::AnyAgent, &[Action::Spawn, Action::Read]),
                Capability::new(Pattern::AnyQueue, &[Action::Claim]),
            ],
            ..claims(1)
        };
        let child_caps = vec![Capability::new(Pattern::Agent(crate::AgentId::mint(1, 1, 0)), &[Action::Read])];
        assert_eq!(
            delegate(&parent, None, child_caps.clone(), 3_600, false, TokenId::from_u128(2), NOW, 5, &NoLineage),
            Err(DelegationError::Outlives { child_exp: NOW + 3_600, parent_exp: parent.exp }),
            "never outlives its parent"
        );
        let child =
            delegate(&parent, None, child_caps.clone(), 600, false, TokenId::from_u128(2), NOW, 5, &NoLineage).unwrap();
        assert_eq!(
            (child.depth, child.chain.clone(), child.exp, child.sub.clone()),
            (1, vec![parent.jti], parent.exp, parent.sub.clone()),
            "its whole lifetime inside the parent's"
        );
        let grandchild =
            delegate(&child, None, child_caps.clone(), 60, true, TokenId::from_u128(3), NOW, 5, &NoLineage).unwrap();
        assert_eq!((grandchild.depth, grandchild.chain.len(), grandchild.exp, grandchild.once), (2, 2, NOW + 60, true));
        let wider = vec![Capability::new(Pattern::AnyAgent, &[Action::Terminate])];
        assert!(matches!(
            delegate(&parent, None, wider, 60, false, TokenId::from_u128(4), NOW, 5, &NoLineage),
            Err(DelegationError::Widened(_))
        ));
        assert_eq!(
            delegate(&grandchild, None, child_caps.clone(), 60, false, TokenId::from_u128(5), NOW, 2, &NoLineage),
            Err(DelegationError::TooDeep { depth: 3, cap: 2 })
        );
        assert_eq!(
            delegate(&parent, None, Vec::new(), 60, false, TokenId::from_u128(6), NOW, 5, &NoLineage),
            Err(DelegationError::Empty)
        );
        assert_eq!(
            delegate(&parent, None, child_caps, 0, false, TokenId::from_u128(7), NOW, 5, &NoLineage),
            Err(DelegationError::NoLifetime)
        );
        // A delegated token verifies, and revoking its parent revokes it.
        let (key, mut verifier) = setup();
        let token = key.sign(&child).unwrap();
        assert_eq!(verifier.verify(&token, NOW).unwrap(), child);
        verifier.revoke(parent.jti);
        assert_eq!(verifier.verify(&token, NOW), Err(Error::Revoked(parent.jti)));
    }

    #[test]
    fn keys_round_trip_through_their_seed_and_jwk() {
        let key = SigningKey::generate("k2").unwrap();
        let again = SigningKey::from_seed("k2", key.seed());
        assert_eq!(key.jwk(), again.jwk());
        assert_eq!(key.jwk().x.len(), 43);
        let rsa = Jwk { kty: "RSA".into(), ..key.jwk() };
        assert!(Verifier::new(&JwksReply { keys: vec![rsa] }, 0).is_err());
        assert_ne!(SigningKey::generate("a").unwrap().seed(), SigningKey::generate("b").unwrap().seed());
    }
}
