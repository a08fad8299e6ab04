//! Per-deployment NATS credentials and server configuration: one nkey user per [`Role`], seeds
//! written with mode 0600 and never overwritten, the server configuration rendered from
//! [`toka_contract::access`]. There is no default secret: a deployment that has not run this has no
//! credentials, and a secured server refuses anonymous connections.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use toka_contract::access::{self, CalloutKeys, Role, ServerSettings};

/// Why credentials could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {reason}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// An existing seed file is not a valid seed of its kind.
    #[error("{0}: not a valid nkey seed; remove it to generate a new one")]
    BadSeed(String),
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: path.display().to_string(), reason: e.to_string() }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The server configuration file.
    pub server_config: PathBuf,
    /// Each role's seed file.
    pub seeds: BTreeMap<Role, PathBuf>,
    /// Each role's public key.
    pub public_keys: BTreeMap<Role, String>,
    /// The auth admin key (the credential that issues the first tokens).
    pub admin_key: PathBuf,
    /// The account seed auth's callout signs the users it mints with (`SA…`).
    pub callout_issuer: PathBuf,
    /// The curve seed authorization requests are encrypted to (`SX…`).
    pub callout_xkey: PathBuf,
    /// Their public keys, as the server configuration names them.
    pub callout: CalloutKeys,
}

/// The kinds of key a deployment holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    User,
    Account,
    Curve,
}

/// A new seed of `kind`, as (seed, public key).
fn new_key(kind: Kind) -> Result<(String, String), Error> {
    let bad = |e: nkeys::error::Error| Error::BadSeed(e.to_string());
    match kind {
        Kind::User => new_user_key(),
        Kind::Account => {
            let pair = nkeys::KeyPair::new_account();
            Ok((pair.seed().map_err(bad)?, pair.public_key()))
        }
        Kind::Curve => {
            let pair = nkeys::XKey::new();
            Ok((pair.seed().map_err(bad)?, pair.public_key()))
        }
    }
}

/// The public key of the seed at `path` if it is of `kind`, or a new seed written there.
fn keep_or_create(path: &Path, kind: Kind) -> Result<String, Error> {
    if !path.exists() {
        let (seed, public) = new_key(kind)?;
        write_secret(path, &format!("{seed}\n"))?;
        return Ok(public);
    }
    let seed = std::fs::read_to_string(path).map_err(io(path))?;
    let bad = |_| Error::BadSeed(path.display().to_string());
    let public = match kind {
        Kind::Curve => nkeys::XKey::from_seed(seed.trim()).map(|k| k.public_key()).map_err(bad)?,
        _ => public_key(&seed).map_err(|_| Error::BadSeed(path.display().to_string()))?,
    };
    let prefix = match kind {
        Kind::User => 'U',
        Kind::Account => 'A',
        Kind::Curve => 'X',
    };
    if !public.starts_with(prefix) {
        return Err(Error::BadSeed(path.display().to_string()));
    }
    Ok(public)
}

/// A new user key pair, as (seed, public key).
pub fn new_user_key() -> Result<(String, String), Error> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair.seed().map_err(|e| Error::BadSeed(e.to_string()))?;
    Ok((seed, pair.public_key()))
}

/// The public key of a user seed.
pub fn public_key(seed: &str) -> Result<String, Error> {
    nkeys::KeyPair::from_seed(seed.trim()).map(|p| p.public_key()).map_err(|e| Error::BadSeed(e.to_string()))
}

/// Writes `contents` to a new file readable by its owner only.
pub fn write_secret(path: &Path, contents: &str) -> Result<(), Error> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io(path))?;
    file.write_all(contents.as_bytes()).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

/// A new admin key: 32 random bytes, base64url (43 characters).
pub fn new_admin_key() -> Result<String, Error> {
    use base64::Engine as _;
    let mut random = [0u8; 32];
    getrandom::getrandom(&mut random)
        .map_err(|e| Error::Io { path: "the random source".into(), reason: e.to_string() })?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random))
}

/// Creates (or reuses) a seed per role, auth's callout keys (`auth-issuer.nk`, `auth-xkey.nk`)
/// and the auth admin key (`admin.key`) under `dir/creds/`, and writes `dir/nats.conf`.
pub fn generate(dir: &Path, settings: &ServerSettings) -> Result<Generated, Error> {
    let creds = dir.join("creds");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&creds).map_err(io(&creds))?;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).map_err(io(&creds))?;
    let mut seeds = BTreeMap::new();
    let mut public_keys = BTreeMap::new();
    for role in Role::ALL {
        let path = creds.join(format!("{}.nk", role.name()));
        public_keys.insert(role, keep_or_create(&path, Kind::User)?);
        seeds.insert(role, path);
    }
    let callout_issuer = creds.join("auth-issuer.nk");
    let callout_xkey = creds.join("auth-xkey.nk");
    let callout = CalloutKeys {
        issuer: keep_or_create(&callout_issuer, Kind::Account)?,
        xkey: keep_or_create(&callout_xkey, Kind::Curve)?,
    };
    let admin_key = creds.join("admin.key");
    if !admin_key.exists() {
        write_secret(&admin_key, &format!("{}\n", new_admin_key()?))?;
    }
    let users: Vec<(Role, String)> = public_keys.iter().map(|(r, k)| (*r, k.clone())).collect();
    let server_config = dir.join("nats.conf");
    let text = access::render_server_config(settings, &users, &callout);
    std::fs::write(&server_config, text).map_err(io(&server_config))?;
    Ok(Generated { server_config, seeds, public_keys, admin_key, callout_issuer, callout_xkey, callout })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_private_unique_and_kept() {
        let dir = std::env::temp_dir().join(format!("toka-deploy-{}", std::process::id()));
        let settings = ServerSettings {
            listen: "127.0.0.1:4222".into(),
            monitor: None,
            store_dir: "js".into(),
            max_payload: 1 << 20,
        };
        let first = generate(&dir, &settings).unwrap();
        for path in first.seeds.values() {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        let keys: std::collections::BTreeSet<_> = first.public_keys.values().collect();
        assert_eq!(keys.len(), Role::ALL.len(), "every role has its own key");
        assert!(first.callout.issuer.starts_with('A') && first.callout.xkey.starts_with('X'));
        for path in [&first.callout_issuer, &first.callout_xkey] {
            assert_eq!(std::fs::metadata(path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let again = generate(&dir, &settings).unwrap();
        assert_eq!(again.public_keys, first.public_keys, "a second run keeps the deployment's keys");
        assert_eq!(again.callout, first.callout, "and the callout's");
        let conf = std::fs::read_to_string(&first.server_config).unwrap();
        assert!(first.public_keys.values().all(|k| conf.contains(k.as_str())));
        assert!(write_secret(&first.seeds[&Role::Kernel], "x").is_err(), "never overwrites a seed");
        let admin = std::fs::read_to_string(&first.admin_key).unwrap();
        assert_eq!(
            (admin.trim().len(), std::fs::metadata(&first.admin_key).unwrap().permissions().mode() & 0o777),
            (43, 0o600)
        );
        generate(&dir, &settings).unwrap();
        assert_eq!(std::fs::read_to_string(&first.admin_key).unwrap(), admin, "the admin key is kept too");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
