//! Signing tokens: the private Ed25519 keys auth keeps, each with its id, and the compact JWS
//! (RFC 7515) they sign. Verification is every service's (`toka_runtime::token`); only auth
//! signs.

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Header};
use toka_contract::api::auth::{Claims, Jwk};

/// Why a key could not be made or could not sign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The operating system's random source failed.
    #[error("no random source: {0}")]
    Random(String),
    /// The header or the claims do not encode.
    #[error("encoding a token: {0}")]
    Encode(String),
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
        getrandom::getrandom(&mut seed).map_err(|e| Error::Random(e.to_string()))?;
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
        let part = |json: Result<Vec<u8>, serde_json::Error>| {
            json.map(|j| b64url(&j)).map_err(|e| Error::Encode(e.to_string()))
        };
        let message = format!("{}.{}", part(serde_json::to_vec(&header))?, part(serde_json::to_vec(claims))?);
        let signature = self.key.sign(message.as_bytes());
        Ok(format!("{message}.{}", b64url(&signature.to_bytes())))
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::EncodingKey;
    use toka_contract::api::auth::JwksReply;
    use toka_runtime::token::Verifier;

    use super::*;

    const NOW: u64 = 1_764_150_000;

    fn claims(jti: u128) -> Claims {
        toka_contract::testing::claims(jti, NOW)
    }

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

    #[test]
    fn a_signed_token_verifies_with_its_jwk_only() {
        let key = SigningKey::from_seed("k1", [7; 32]);
        let verifier = Verifier::new(&JwksReply { keys: vec![key.jwk()] }, 0).unwrap();
        assert_eq!(verifier.verify(&key.sign(&claims(1)).unwrap(), NOW).unwrap(), claims(1));
        let other = SigningKey::from_seed("k1", [8; 32]);
        assert!(verifier.verify(&other.sign(&claims(1)).unwrap(), NOW).is_err());
    }

    #[test]
    fn keys_round_trip_through_their_seed_and_jwk() {
        let key = SigningKey::generate("k2").unwrap();
        let again = SigningKey::from_seed("k2", key.seed());
        assert_eq!(key.jwk(), again.jwk());
        assert_eq!(key.kid(), "k2");
        let jwk = key.jwk();
        assert_eq!(
            (jwk.kty.as_str(), jwk.crv.as_str(), jwk.alg.as_str(), jwk.use_.as_str(), jwk.x.len()),
            ("OKP", "Ed25519", "EdDSA", "sig", 43)
        );
        assert_ne!(SigningKey::generate("a").unwrap().seed(), SigningKey::generate("b").unwrap().seed());
    }
}
