//! The state's canonical binary encoding, its hash, and restore.
//!
//! ```text
//! snapshot = "TOKAKSTATE" ‖ format version (u16, little endian) ‖ postcard(State)
//! hash     = BLAKE3-derive-key("toka kernel state v1", snapshot)
//! ```
//!
//! postcard writes fields in declaration order and ordered maps in key order, so equal states
//! encode to equal bytes. Contract types whose JSON form omits default fields (operations and
//! events kept for idempotent retries) are embedded as their JSON text, which is canonical too.
//! A change to the state layout bumps [`FORMAT_VERSION`]; restore refuses other versions.

use toka_contract::Hash;

use super::State;

const MAGIC: &[u8; 10] = b"TOKAKSTATE";

/// The version of the state layout.
pub const FORMAT_VERSION: u16 = 1;

const HASH_CONTEXT: &str = "toka kernel state v1";

/// Why a snapshot cannot be made or restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// The bytes are not a Toka kernel snapshot.
    #[error("not a Toka kernel snapshot")]
    NotASnapshot,
    /// A snapshot of another layout version.
    #[error("snapshot format version {0}, this kernel reads version {FORMAT_VERSION}")]
    Version(u16),
    /// The snapshot is damaged.
    #[error("snapshot does not decode: {0}")]
    Decode(String),
    /// The state could not be encoded.
    #[error("state does not encode: {0}")]
    Encode(String),
}

impl State {
    /// The canonical encoding of the state.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let mut out = Vec::with_capacity(4096);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        postcard::to_extend(self, out).map_err(|e| SnapshotError::Encode(e.to_string()))
    }

    /// The state from its canonical encoding.
    pub fn decode(bytes: &[u8]) -> Result<State, SnapshotError> {
        let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or(SnapshotError::NotASnapshot)?;
        let (version, body) = rest.split_first_chunk::<2>().ok_or(SnapshotError::NotASnapshot)?;
        let version = u16::from_le_bytes(*version);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Version(version));
        }
        match postcard::take_from_bytes::<State>(body) {
            Ok((state, [])) => Ok(state),
            Ok((_, trailing)) => Err(SnapshotError::Decode(format!("{} trailing bytes", trailing.len()))),
            Err(e) => Err(SnapshotError::Decode(e.to_string())),
        }
    }

    /// The hash of the canonical encoding: equal states, equal hashes.
    pub fn hash(&self) -> Result<Hash, SnapshotError> {
        Ok(hash_encoded(&self.encode()?))
    }
}

/// The state hash of an encoded state.
pub fn hash_encoded(encoded: &[u8]) -> Hash {
    let mut hasher = blake3::Hasher::new_derive_key(HASH_CONTEXT);
    hasher.update(encoded);
    Hash(*hasher.finalize().as_bytes())
}

/// Serde adapter: a value as its JSON text (for types whose JSON form skips defaults, which a
/// non-self-describing format such as postcard cannot read back).
pub(super) mod as_json {
    use serde::de::{DeserializeOwned, Error as _};
    use serde::ser::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(in crate::machine) fn serialize<T: Serialize, S: Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
        let text = serde_json::to_string(value).map_err(S::Error::custom)?;
        s.serialize_str(&text)
    }

    pub(in crate::machine) fn deserialize<'de, T: DeserializeOwned, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let text = String::deserialize(d)?;
        serde_json::from_str(&text).map_err(D::Error::custom)
    }
}
