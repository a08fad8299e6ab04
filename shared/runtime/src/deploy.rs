//! Per-deployment NATS credentials and server configuration: one nkey user per [`Role`], seeds
//! written with mode 0600 and never overwritten, the server configuration rendered from
//! [`toka_contract::access`]. There is no default secret: a deployment that has not run this has no
//! credentials, and a secured server refuses anonymous connections.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use toka_contract::access::{self, Role, ServerSettings};

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
    /// An existing seed file is not a valid user seed.
    #[error("{0}: not a valid nkey user seed; remove it to generate a new one")]
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

/// Creates (or reuses) a seed per role and the auth admin key (`admin.key`) under
/// `dir/creds/`, and writes `dir/nats.conf`.
pub fn generate(dir: &Path, settings: &ServerSettings) -> Result<Generated, Error> {
    let creds = dir.join("creds");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&creds).map_err(io(&creds))?;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o700)).map_err(io(&creds))?;
    let mut seeds = BTreeMap::new();
    let mut public_keys = BTreeMap::new();
    for role in Role::ALL {
        let path = creds.join(format!("{}.nk", role.name()));
        let public = if path.exists() {
            let seed = std::fs::read_to_string(&path).map_err(io(&path))?;
            public_key(&seed).map_err(|_| Error::BadSeed(path.display().to_string()))?
        } else {
            let (seed, public) = new_user_key()?;
            write_secret(&path, &format!("{seed}\n"))?;
            public
        };
        seeds.insert(role, path);
        public_keys.insert(role, public);
    }
    let admin_key = creds.join("admin.key");
    if !admin_key.exists() {
        write_secret(&admin_key, &format!("{}\n", new_admin_key()?))?;
    }
    let users: Vec<(Role, String)> = public_keys.iter().map(|(r, k)| (*r, k.clone())).collect();
    let server_config = dir.join("nats.conf");
    std::fs::write(&server_config, access::render_server_config(settings, &users)).map_err(io(&server_config))?;
    Ok(Generated { server_config, seeds, public_keys, admin_key })
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
        let again = generate(&dir, &settings).unwrap();
        assert_eq!(again.public_keys, first.public_keys, "a second run keeps the deployment's keys");
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
