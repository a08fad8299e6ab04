//! The signing keys: a ring of Ed25519 keys kept in `keys.json` under the key directory (mode
//! 0600, written atomically: a temporary file, fsync, rename, fsync of the directory), shared
//! by every auth replica. Only the holder of the rotation lease writes it; the others re-read
//! it.
//!
//! The newest key signs. A rotation adds a key and gives the previous signing key a
//! retirement time at least the longest token lifetime away, so every token it signed expires
//! before it stops verifying; retired keys leave the ring.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::signing::SigningKey;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use toka_contract::api::auth::{JwksReply, RotateReply};

/// Why the key store failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing failed.
    #[error("auth.key_dir: {path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// The file does not hold a key ring.
    #[error("auth.key_dir: {path}: not a Toka key ring: {reason}")]
    Corrupt {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Others may read the keys.
    #[error("auth.key_dir: {path}: mode {mode:o} lets others read the signing keys; chmod 600 it")]
    Exposed {
        /// The file.
        path: String,
        /// Its mode.
        mode: u32,
    },
    /// The random source failed.
    #[error("generating a key: {0}")]
    Random(String),
}

/// One key as stored.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoredKey {
    kid: String,
    /// The Ed25519 seed, base64url.
    seed: String,
    created_at_us: u64,
    /// When it stops verifying; absent for the signing key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retire_at_us: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    version: u32,
    keys: Vec<StoredKey>,
}

/// The ring in memory: stored keys with their signing form.
pub struct KeyRing {
    keys: Vec<(StoredKey, SigningKey)>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|(k, _)| &k.kid)).finish()
    }
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}

fn new_kid(now_us: u64) -> Result<String, Error> {
    let mut random = [0u8; 6];
    getrandom::getrandom(&mut random).map_err(|e| Error::Random(e.to_string()))?;
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("k{}-{hex}", now_us / 1_000_000))
}

impl KeyRing {
    /// An empty ring (no key signs yet).
    pub fn empty() -> KeyRing {
        KeyRing { keys: Vec::new() }
    }

    fn from_file(file: KeyFile, path: &Path) -> Result<KeyRing, Error> {
        let corrupt = |reason: String| Error::Corrupt { path: path.display().to_string(), reason };
        if file.version != 1 {
            return Err(corrupt(format!("version {} (this build reads 1)", file.version)));
        }
        let mut keys = Vec::new();
        for k in file.keys {
            let seed: [u8; 32] = b64()
                .decode(&k.seed)
                .ok()
                .and_then(|s| s.try_into().ok())
                .ok_or_else(|| corrupt(format!("key {}: the seed is not 32 bytes of base64url", k.kid)))?;
            let signing = SigningKey::from_seed(&k.kid, seed);
            keys.push((k, signing));
        }
        Ok(KeyRing { keys })
    }

    fn to_file(&self) -> KeyFile {
        KeyFile { version: 1, keys: self.keys.iter().map(|(k, _)| k.clone()).collect() }
    }

    /// The key that signs new tokens.
    pub fn signing(&self) -> Option<&SigningKey> {
        self.keys.iter().rev().find(|(k, _)| k.retire_at_us.is_none()).map(|(_, s)| s)
    }

    /// When the signing key was created.
    pub fn signing_since_us(&self) -> Option<u64> {
        self.keys.iter().rev().find(|(k, _)| k.retire_at_us.is_none()).map(|(k, _)| k.created_at_us)
    }

    /// Every key that verifies at `now_us`, the signing key first.
    pub fn jwks(&self, now_us: u64) -> JwksReply {
        let mut keys: Vec<_> = self
            .keys
            .iter()
            .rev()
            .filter(|(k, _)| k.retire_at_us.is_none_or(|t| now_us < t))
            .map(|(_, s)| s.jwk())
            .collect();
        keys.sort_by_key(|k| Some(k.kid.as_str()) != self.signing().map(SigningKey::kid));
        JwksReply { keys }
    }

    /// Adds a new signing key; the previous one verifies for `overlap_us` more.
    pub fn rotate(&mut self, now_us: u64, overlap_us: u64) -> Result<RotateReply, Error> {
        let kid = new_kid(now_us)?;
        let signing = SigningKey::generate(&kid).map_err(|e| Error::Random(e.to_string()))?;
        let retire_at_us = now_us.saturating_add(overlap_us);
        let mut previous_kid = None;
        for (k, _) in &mut self.keys {
            if k.retire_at_us.is_none() {
                k.retire_at_us = Some(retire_at_us);
                previous_kid = Some(k.kid.clone());
            }
        }
        let stored = StoredKey {
            kid: kid.clone(),
            seed: b64().encode(signing.seed()),
            created_at_us: now_us,
            retire_at_us: None,
        };
        self.keys.push((stored, signing));
        let retire_at_us = previous_kid.as_ref().map(|_| retire_at_us);
        Ok(RotateReply { kid, previous_kid, retire_at_us })
    }

    /// Drops keys retired by `now_us`; their ids.
    pub fn retire(&mut self, now_us: u64) -> Vec<String> {
        let (gone, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.keys).into_iter().partition(|(k, _)| k.retire_at_us.is_some_and(|t| now_us >= t));
        self.keys = kept;
        gone.into_iter().map(|(k, _)| k.kid).collect()
    }

    /// The ids of every key held, oldest first.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|(k, _)| k.kid.clone()).collect()
    }
}

/// The key ring's home: `dir/keys.json`.
#[derive(Debug, Clone)]
pub struct KeyStore {
    dir: PathBuf,
}

impl KeyStore {
    /// The store in `dir`, created with mode 0700 if missing.
    pub fn open(dir: &Path) -> Result<KeyStore, Error> {
        let io = |e: std::io::Error| Error::Io { path: dir.display().to_string(), reason: e.to_string() };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        Ok(KeyStore { dir: dir.to_owned() })
    }

    fn path(&self) -> PathBuf {
        self.dir.join("keys.json")
    }

    /// The ring as stored (empty before the first key).
    pub fn load(&self) -> Result<KeyRing, Error> {
        let path = self.path();
        let io = |e: std::io::Error| Error::Io { path: path.display().to_string(), reason: e.to_string() };
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(KeyRing::empty()),
            Err(e) => return Err(io(e)),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::Exposed { path: path.display().to_string(), mode });
        }
        let bytes = std::fs::read(&path).map_err(io)?;
        let file: KeyFile = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
        KeyRing::from_file(file, &path)
    }

    /// Replaces the stored ring with `ring`, atomically and durably.
    pub fn save(&self, ring: &KeyRing) -> Result<(), Error> {
        let path = self.path();
        // A name of its own for every save: replicas sharing the directory may have the same
        // process id (each is pid 1 in its container; tests run several in one process), and a
        // shared name let one replica's save delete or rename another's half-written file.
        let mut nonce = [0u8; 8];
        getrandom::getrandom(&mut nonce).map_err(|e| Error::Random(e.to_string()))?;
        let tmp = self.dir.join(format!(".keys.json.{}.{:016x}.tmp", std::process::id(), u64::from_le_bytes(nonce)));
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |e: std::io::Error| Error::Io { path: p.clone(), reason: e.to_string() }
        };
        let body = serde_json::to_vec_pretty(&ring.to_file())
            .map_err(|e| Error::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
        let mut file =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
        let written = file
            .write_all(&body)
            .and_then(|()| file.sync_all())
            .map_err(io(&tmp))
            .and_then(|()| std::fs::rename(&tmp, &path).map_err(io(&path)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const HOUR_US: u64 = 3_600_000_000;

    #[test]
    fn rotation_keeps_the_old_key_for_the_overlap_then_retires_it() {
        let mut ring = KeyRing::empty();
        assert!(ring.signing().is_none());
        let first = ring.rotate(0, HOUR_US).unwrap();
        assert_eq!((first.previous_kid.clone(), first.retire_at_us), (None, None));
        let second = ring.rotate(10, HOUR_US).unwrap();
        assert_eq!(second.previous_kid.as_deref(), Some(first.kid.as_str()));
        assert_eq!(second.retire_at_us, Some(10 + HOUR_US));
        assert_eq!(ring.signing().unwrap().kid(), second.kid);
        let jwks = ring.jwks(20);
        assert_eq!(
            jwks.keys.iter().map(|k| k.kid.as_str()).collect::<Vec<_>>(),
            [second.kid.as_str(), first.kid.as_str()],
            "the signing key first, the retiring one still verifies"
        );
        assert_eq!(ring.jwks(10 + HOUR_US).keys.len(), 1, "gone from the JWKS at its retirement");
        assert!(ring.retire(10 + HOUR_US - 1).is_empty());
        assert_eq!(ring.retire(10 + HOUR_US), vec![first.kid]);
        assert_eq!(ring.kids(), vec![second.kid]);
    }

    #[test]
    fn replicas_saving_at_once_in_one_process_never_break_each_other() {
        let dir = std::env::temp_dir().join(format!("toka-keys-race-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut ring = KeyRing::empty();
        ring.rotate(5, HOUR_US).unwrap();
        KeyStore::open(&dir).unwrap().save(&ring).unwrap();
        let savers: Vec<_> = (0..4)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || {
                    let store = KeyStore::open(&dir).unwrap();
                    let ring = store.load().unwrap();
                    (0..200).map(|_| store.save(&ring)).filter(Result::is_err).count()
                })
            })
            .collect();
        let failures: usize = savers.into_iter().map(|s| s.join().unwrap()).sum();
        assert_eq!(failures, 0, "every save of every replica succeeds");
        let store = KeyStore::open(&dir).unwrap();
        assert_eq!(store.load().unwrap().jwks(6), ring.jwks(6));
        let leftovers =
            std::fs::read_dir(&dir).unwrap().filter(|e| e.as_ref().unwrap().file_name() != "keys.json").count();
        assert_eq!(leftovers, 0, "no temporary file is left behind");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_store_survives_a_reload_and_refuses_exposed_files() {
        let dir = std::env::temp_dir().join(format!("toka-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = KeyStore::open(&dir).unwrap();
        assert!(store.load().unwrap().signing().is_none(), "nothing stored yet");
        let mut ring = KeyRing::empty();
        ring.rotate(5, HOUR_US).unwrap();
        ring.rotate(6, HOUR_US).unwrap();
        store.save(&ring).unwrap();
        let again = store.load().unwrap();
        assert_eq!(again.jwks(7), ring.jwks(7));
        assert_eq!(again.signing().unwrap().seed(), ring.signing().unwrap().seed());
        let path = dir.join("keys.json");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(store.load(), Err(Error::Exposed { mode: 0o644, .. })));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"{\"version\":1,\"keys\":[{\"kid\":\"x\",\"seed\":\"short\",\"created_at_us\":1}]}")
            .unwrap();
        assert!(matches!(store.load(), Err(Error::Corrupt { .. })));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
