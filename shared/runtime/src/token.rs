//! Checking Toka capability tokens: Ed25519-signed JWTs (EdDSA, `kid` header) carrying
//! [`Claims`]. Every service that accepts tokens verifies with [`Verifier`]; signing and
//! delegation belong to auth alone (`toka-auth`).
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
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use toka_contract::TokenId;
use toka_contract::api::auth::{Claims, JwksReply};
use toka_contract::wire::{ErrorCode, WireError};

pub use toka_contract::api::auth::{AUDIENCE, ISSUER};

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

/// A token's claims, read without checking anything.
fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).ok()?;
    serde_json::from_slice(&json).ok()
}

/// The `jti` of a token, read without checking anything: the inbox a client names after its
/// token. Whoever admits the token verifies it.
pub fn unverified_jti(token: &str) -> Option<String> {
    let claims = unverified_claims(token)?;
    let jti = claims.get("jti")?.as_str()?;
    let valid = !jti.is_empty() && jti.bytes().all(|b| b.is_ascii_alphanumeric());
    valid.then(|| jti.to_owned())
}

/// When a token was issued and when it expires (`iat`, `exp`, Unix seconds), read without
/// checking anything: when a client should get a fresh one.
pub fn unverified_lifetime(token: &str) -> Option<(u64, u64)> {
    let claims = unverified_claims(token)?;
    Some((claims.get("iat")?.as_u64()?, claims.get("exp")?.as_u64()?))
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

    /// How many verified tokens the cache holds.
    pub fn cached(&self) -> usize {
        self.cache.lock().map_or(0, |c| c.len())
    }

    /// The claims of `token` if it is valid at `now_s` (seconds since the epoch); a one-time
    /// token is used up.
    pub fn verify(&self, token: &str, now_s: u64) -> Result<Claims, Error> {
        let claims = self.check(token, now_s)?;
        if claims.once {
            let mut used = self.used_once.lock().map_err(|_| Error::Replayed(claims.jti))?;
            if !used.insert(claims.jti) {
                return Err(Error::Replayed(claims.jti));
            }
        }
        Ok(claims)
    }

    /// As [`Verifier::verify`], but a one-time token is not used up: for admitting a connection
    /// that will present the token again with each request.
    pub fn check(&self, token: &str, now_s: u64) -> Result<Claims, Error> {
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

/// Signing keys for tests, signing through `jsonwebtoken` itself: verifiers are checked against
/// the library's tokens, not against auth's signer.
#[cfg(test)]
pub(crate) mod testing {
    #![allow(clippy::unwrap_used)]
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use toka_contract::api::auth::{Claims, Jwk};

    pub(crate) fn b64url(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// A test signing key.
    pub(crate) struct Key {
        pub(crate) kid: &'static str,
        pub(crate) seed: [u8; 32],
    }

    impl Key {
        pub(crate) fn jwk(&self) -> Jwk {
            let public = ed25519_dalek::SigningKey::from_bytes(&self.seed).verifying_key().to_bytes();
            Jwk {
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                alg: "EdDSA".into(),
                use_: "sig".into(),
                kid: self.kid.into(),
                x: b64url(&public),
            }
        }

        pub(crate) fn sign(&self, claims: &Claims) -> String {
            // PKCS#8 v1 wrapping of the seed (RFC 8410).
            let prefix =
                [0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
            let pkcs8 = [&prefix[..], &self.seed[..]].concat();
            let mut header = Header::new(Algorithm::EdDSA);
            header.kid = Some(self.kid.into());
            jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(&pkcs8)).unwrap()
        }
    }

    pub(crate) const KEY: Key = Key { kid: "k1", seed: [7; 32] };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use jsonwebtoken::{EncodingKey, Header};
    use toka_contract::api::auth::Jwk;

    use super::testing::{KEY, Key, b64url};
    use toka_contract::capability::{Action, Capability, Pattern};

    use super::*;

    const NOW: u64 = 1_764_150_000;
    const LEEWAY: u64 = 2;

    fn claims(jti: u128) -> Claims {
        toka_contract::testing::claims(jti, NOW)
    }

    fn verifier() -> Verifier {
        Verifier::new(&JwksReply { keys: vec![KEY.jwk()] }, LEEWAY).unwrap()
    }

    fn forge(header: &str, claims: &Claims, signature: &[u8]) -> String {
        let c = serde_json::to_vec(claims).unwrap();
        format!("{}.{}.{}", b64url(header.as_bytes()), b64url(&c), b64url(signature))
    }

    #[test]
    fn the_id_and_lifetime_of_a_token_are_read_without_a_key() {
        let c = claims(9);
        let token = KEY.sign(&c);
        assert_eq!(unverified_jti(&token), Some(c.jti.to_string()));
        assert_eq!(unverified_lifetime(&token), Some((c.iat, c.exp)));
        for garbage in ["", "a.b.c", "not-a-token"] {
            assert_eq!((unverified_jti(garbage), unverified_lifetime(garbage)), (None, None), "{garbage}");
        }
    }

    #[test]
    fn a_signed_token_verifies_and_is_cached() {
        let verifier = verifier();
        let token = KEY.sign(&claims(1));
        assert_eq!(verifier.verify(&token, NOW).unwrap(), claims(1));
        assert_eq!(verifier.verify(&token, NOW).unwrap(), claims(1), "again, from the cache");
        assert_eq!(verifier.kids().collect::<Vec<_>>(), ["k1"]);
        for jti in 2..=4 {
            verifier.verify(&KEY.sign(&claims(jti)), NOW).unwrap();
        }
        assert_eq!(verifier.cached(), 4, "each token verified once is kept");
        assert!(verifier.verify("not-a-token", NOW).is_err());
        assert_eq!(verifier.cached(), 4, "a refused token is not");
    }

    #[test]
    fn every_attack_is_refused_with_its_own_error() {
        let mut verifier = verifier();
        let good = KEY.sign(&claims(1));
        // alg: none, unsigned.
        let none = forge(r#"{"alg":"none","typ":"JWT","kid":"k1"}"#, &claims(1), b"");
        assert_eq!(verifier.verify(&none, NOW), Err(Error::Algorithm("none".into())));
        // No alg at all.
        let bare = forge(r#"{"kid":"k1"}"#, &claims(1), b"");
        assert_eq!(verifier.verify(&bare, NOW), Err(Error::Algorithm(String::new())));
        // HS256 signed with the public key as the secret (key confusion).
        let public = KEY.jwk().x;
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let confused = jsonwebtoken::encode(&header, &claims(1), &EncodingKey::from_secret(public.as_bytes())).unwrap();
        assert_eq!(verifier.verify(&confused, NOW), Err(Error::Algorithm("HS256".into())));
        // A signature from another key under our kid.
        let impostor = Key { kid: "k1", seed: [9; 32] }.sign(&claims(1));
        assert_eq!(verifier.verify(&impostor, NOW), Err(Error::BadSignature));
        // Unknown kid, and no kid.
        let stranger = Key { kid: "k9", seed: [7; 32] }.sign(&claims(1));
        assert_eq!(verifier.verify(&stranger, NOW), Err(Error::UnknownKey("k9".into())));
        let anonymous = forge(r#"{"alg":"EdDSA"}"#, &claims(1), b"x");
        assert_eq!(verifier.verify(&anonymous, NOW), Err(Error::Malformed("no kid".into())));
        // Another audience, another issuer.
        let elsewhere = KEY.sign(&Claims { aud: "other".into(), ..claims(3) });
        assert_eq!(verifier.verify(&elsewhere, NOW), Err(Error::Audience));
        let foreign = KEY.sign(&Claims { iss: "mallory".into(), ..claims(4) });
        assert_eq!(verifier.verify(&foreign, NOW), Err(Error::Issuer));
        // Tampered claims under a valid signature.
        let parts: Vec<&str> = good.split('.').collect();
        let widened = Claims { caps: vec![Capability::new(Pattern::Tokens, &[Action::Issue])], ..claims(1) };
        let tampered = format!("{}.{}.{}", parts[0], b64url(&serde_json::to_vec(&widened).unwrap()), parts[2]);
        assert_eq!(verifier.verify(&tampered, NOW), Err(Error::BadSignature));
        // Self-contradicting claims, signed: a depth that is not the chain's length, no
        // capability at all.
        let deeper = KEY.sign(&Claims { depth: 2, ..claims(5) });
        assert_eq!(verifier.verify(&deeper, NOW), Err(Error::Claims("depth 2 with 0 ancestors".into())));
        let shallower = KEY.sign(&Claims { chain: vec![TokenId::from_u128(9)], depth: 0, ..claims(5) });
        assert!(matches!(verifier.verify(&shallower, NOW), Err(Error::Claims(_))));
        let empty = KEY.sign(&Claims { caps: Vec::new(), ..claims(5) });
        assert_eq!(verifier.verify(&empty, NOW), Err(Error::Claims("no capabilities".into())));
        // Garbage.
        assert!(matches!(verifier.verify("not-a-token", NOW), Err(Error::Malformed(_))));
        assert!(matches!(verifier.verify("e30.e30.e30", NOW), Err(Error::Algorithm(_))));
        assert!(matches!(verifier.verify("!!.e30.e30", NOW), Err(Error::Malformed(_))));
        assert!(matches!(verifier.verify(&format!("{}.x.y", b64url(b"[")), NOW), Err(Error::Malformed(_))));
        // Revoked, also while cached; a revoked ancestor revokes the child.
        assert!(verifier.verify(&good, NOW).is_ok());
        verifier.revoke(TokenId::from_u128(1));
        assert_eq!(verifier.verify(&good, NOW), Err(Error::Revoked(TokenId::from_u128(1))));
        let child = KEY.sign(&Claims { chain: vec![TokenId::from_u128(1)], depth: 1, ..claims(6) });
        assert_eq!(verifier.verify(&child, NOW), Err(Error::Revoked(TokenId::from_u128(1))));
        let grandchild =
            KEY.sign(&Claims { chain: vec![TokenId::from_u128(1), TokenId::from_u128(6)], depth: 2, ..claims(7) });
        assert_eq!(verifier.verify(&grandchild, NOW), Err(Error::Revoked(TokenId::from_u128(1))));
        // The full set replaces what was there.
        verifier.set_revoked(BTreeSet::from([TokenId::from_u128(6)]));
        assert!(verifier.verify(&good, NOW).is_ok(), "no longer revoked");
        assert_eq!(verifier.verify(&grandchild, NOW), Err(Error::Revoked(TokenId::from_u128(6))));
    }

    #[test]
    fn time_is_checked_to_the_second_with_the_leeway_on_both_sides() {
        let verifier = verifier();
        // exp = NOW + 600: valid through exp + leeway, refused one second later.
        let token = KEY.sign(&claims(1));
        assert!(verifier.verify(&token, NOW + 600 + LEEWAY).is_ok(), "at exp + leeway");
        assert_eq!(verifier.verify(&token, NOW + 600 + LEEWAY + 1), Err(Error::Expired));
        // nbf = NOW + 60: valid from nbf - leeway, refused one second earlier.
        let early = KEY.sign(&Claims { nbf: NOW + 60, ..claims(2) });
        assert!(verifier.verify(&early, NOW + 60 - LEEWAY).is_ok(), "at nbf - leeway");
        assert_eq!(verifier.verify(&early, NOW + 60 - LEEWAY - 1), Err(Error::NotYetValid));
        // Cached tokens are held to the clock too.
        assert_eq!(verifier.verify(&token, NOW + 600 + LEEWAY + 1), Err(Error::Expired));
        // Without leeway the bounds are exp and nbf themselves.
        let strict = Verifier::new(&JwksReply { keys: vec![KEY.jwk()] }, 0).unwrap();
        assert!(strict.verify(&token, NOW + 600).is_ok());
        assert_eq!(strict.verify(&token, NOW + 601), Err(Error::Expired));
        assert!(strict.verify(&early, NOW + 60).is_ok());
        assert_eq!(strict.verify(&early, NOW + 59), Err(Error::NotYetValid));
    }

    #[test]
    fn a_one_time_token_works_once() {
        let verifier = verifier();
        let once = KEY.sign(&Claims { once: true, ..claims(8) });
        assert!(verifier.verify(&once, NOW).is_ok());
        assert_eq!(verifier.verify(&once, NOW), Err(Error::Replayed(TokenId::from_u128(8))));
        // An ordinary token is not spent by use.
        let reusable = KEY.sign(&claims(9));
        assert!(verifier.verify(&reusable, NOW).is_ok());
        assert!(verifier.verify(&reusable, NOW).is_ok());
    }

    #[test]
    fn only_ed25519_signing_keys_are_taken() {
        let good = KEY.jwk();
        for bad in [
            Jwk { kty: "RSA".into(), ..good.clone() },
            Jwk { crv: "X25519".into(), ..good.clone() },
            Jwk { alg: "ES256".into(), ..good.clone() },
            Jwk { use_: "enc".into(), ..good.clone() },
        ] {
            assert!(
                matches!(Verifier::new(&JwksReply { keys: vec![bad.clone()] }, 0), Err(Error::Key(_))),
                "{bad:?} was taken"
            );
        }
        assert!(matches!(
            Verifier::new(&JwksReply { keys: vec![Jwk { x: "!".into(), ..good.clone() }] }, 0),
            Err(Error::Key(_))
        ));
        // A refused key set leaves the one before in place.
        let mut verifier = verifier();
        let rsa = Jwk { kty: "RSA".into(), ..good };
        assert!(verifier.set_keys(&JwksReply { keys: vec![rsa] }).is_err());
        assert!(verifier.verify(&KEY.sign(&claims(1)), NOW).is_ok());
    }

    #[test]
    fn new_keys_replace_the_old_and_empty_the_cache() {
        let mut verifier = verifier();
        let token = KEY.sign(&claims(1));
        assert!(verifier.verify(&token, NOW).is_ok());
        let other = Key { kid: "k2", seed: [8; 32] };
        verifier.set_keys(&JwksReply { keys: vec![other.jwk()] }).unwrap();
        assert_eq!(verifier.verify(&token, NOW), Err(Error::UnknownKey("k1".into())), "not from the cache");
        assert!(verifier.verify(&other.sign(&claims(2)), NOW).is_ok());
    }

    #[test]
    fn a_refusal_is_unauthorized_on_the_wire() {
        let wire = WireError::from(&Error::Expired);
        assert_eq!((wire.code, wire.message.as_str()), (ErrorCode::Unauthorized, "token expired"));
    }
}
