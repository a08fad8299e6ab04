//! Auth's configuration (`toka-auth --dump-config` prints every key with its default).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use toka_runtime::limit::Rate;

/// Auth's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Where the signing keys are kept (`keys.json`, mode 0600); every replica mounts the same
    /// directory.
    pub key_dir: PathBuf,
    /// A file (mode 0600) holding the admin key, the credential that may issue the first
    /// tokens. Without it, only tokens holding `issue` on `token:*` can issue.
    pub admin_key_file: Option<PathBuf>,
    /// The principal the admin key acts as, in audit records.
    pub admin_principal: String,
    /// How often the signing key rotates, in milliseconds.
    pub rotate_every_ms: u64,
    /// The longest lifetime of a token, in milliseconds; a retired key keeps verifying this
    /// long (plus the leeway) after its rotation.
    pub max_token_ttl_ms: u64,
    /// The deepest delegation chain.
    pub max_delegation_depth: u8,
    /// The most revocations one `toka.auth.v1.revocations` reply carries; verifiers read the set
    /// page by page.
    pub revocations_page: u32,
    /// Clock skew allowed on `exp` and `nbf`, in seconds.
    pub leeway_s: u64,
    /// How often the revocation heartbeat is published, in milliseconds.
    pub heartbeat_ms: u64,
    /// The rotation lease's time to live, in milliseconds (renewed every third of it).
    pub lease_ttl_ms: u64,
    /// How often aggregated denials are written (and the audit log re-read), in milliseconds.
    pub audit_interval_ms: u64,
    /// This replica's name (letters, digits, `-`, `_`); random when empty.
    pub instance: String,
    /// Rate limits for each operation class: `issue`, `rotate` (per caller), `delegate`,
    /// `revoke` (per token root), `read` (JWKS and revocations, per root of the client's
    /// token), `service_read` (the same for the services' verifiers, on their own subjects) and
    /// `unverified` (per endpoint, shared by every request whose credential does not verify,
    /// or that reads the keys without a token).
    pub rate_limits: BTreeMap<String, Rate>,
    /// The NATS auth callout, which admits clients connecting with a token.
    pub callout: CalloutConfig,
}

/// The NATS auth callout's credentials, all written by `toka nats-config`. With none set, auth
/// does not answer authorization requests and no client can connect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CalloutConfig {
    /// The seed of the callout user, alone in the `AUTH` account (`auth-callout.nk`).
    pub nkey_seed_file: Option<PathBuf>,
    /// The account seed that signs the users the callout mints (`auth-issuer.nk`, `SA…`).
    pub issuer_seed_file: Option<PathBuf>,
    /// The curve seed the server encrypts authorization requests to (`auth-xkey.nk`, `SX…`).
    pub xkey_seed_file: Option<PathBuf>,
    /// The seed of auth's system user (`auth-system.nk`, the `SYS` account), which closes the
    /// open connections of revoked tokens.
    pub system_nkey_seed_file: Option<PathBuf>,
}

impl AuthConfig {
    /// How long a retired key keeps verifying after its rotation: the longest token lifetime
    /// plus the leeway, in microseconds.
    pub fn overlap_us(&self) -> u64 {
        self.max_token_ttl_ms.saturating_mul(1_000).saturating_add(self.leeway_s.saturating_mul(1_000_000))
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            key_dir: PathBuf::from("data/auth"),
            admin_key_file: None,
            admin_principal: "admin".to_owned(),
            rotate_every_ms: 24 * 3_600_000,
            max_token_ttl_ms: 24 * 3_600_000,
            max_delegation_depth: 5,
            revocations_page: 1_000,
            leeway_s: 5,
            heartbeat_ms: 1_000,
            lease_ttl_ms: 15_000,
            audit_interval_ms: 1_000,
            instance: String::new(),
            rate_limits: BTreeMap::from([
                ("issue".to_owned(), Rate::new(100, 200)),
                ("delegate".to_owned(), Rate::new(1_000, 2_000)),
                ("revoke".to_owned(), Rate::new(100, 200)),
                ("rotate".to_owned(), Rate::new(1, 3)),
                ("read".to_owned(), Rate::new(1_000, 2_000)),
                ("service_read".to_owned(), Rate::new(1_000, 2_000)),
                ("unverified".to_owned(), Rate::new(20, 50)),
            ]),
            callout: CalloutConfig::default(),
        }
    }
}

toka_runtime::service_config! {
    /// The service's configuration.
    pub struct Config {
        /// Tokens and keys.
        auth: AuthConfig,
    }
}
