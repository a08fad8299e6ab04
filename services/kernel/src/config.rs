//! The kernel's configuration (`toka-kernel --dump-config` prints every key with its default).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toka_runtime::limit::Rate;
use toka_runtime::verifier::VerifierConfig;

use crate::machine;

/// The kernel's settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KernelConfig {
    /// This instance's name in the lease (letters, digits, `-`, `_`); random when empty.
    pub instance: String,
    /// The sequencer lease's time to live, in milliseconds (renewed every third of it); a
    /// standby takes over this long after the active instance stops renewing.
    pub lease_ttl_ms: u64,
    /// How often the sequencer looks for passed task deadlines (and logs a tick), in ms.
    pub tick_ms: u64,
    /// The most records in one storage append.
    pub max_batch_records: usize,
    /// The most bytes of records in one storage append (under NATS's 1 MiB payload limit).
    pub max_batch_bytes: usize,
    /// The most bytes of one record of the kernel log (its compact JSON): an operation whose
    /// record could be larger is refused with `too_large` before it changes anything, and a tick
    /// fires only as many deadlines as fit (the rest at the next). At least 16384, and at most
    /// the NATS server's max_payload less 4096.
    pub max_record_bytes: usize,
    /// Storage appends in flight at once.
    pub max_in_flight: usize,
    /// Operations and queries waiting for the sequencer; beyond, callers get `unavailable`.
    pub queue_limit: usize,
    /// A snapshot is stored after this many records (0: never).
    pub snapshot_every: u64,
    /// How far back, in sequence numbers, a repeated operation id returns the first result.
    pub idempotency_window: u64,
    /// Rate limits: `submit` (each operation) and `query` per root of the caller's token
    /// (the principal at the top of its chain); `unverified`, per endpoint class, shared by
    /// every request whose token does not verify.
    pub rate_limits: BTreeMap<String, Rate>,
    /// The longest lifetime of a spawned agent's token, in milliseconds (never past the
    /// spawner's own token).
    pub agent_token_ttl_ms: u64,
    /// How often aggregated denials are written to the audit log, in milliseconds.
    pub audit_interval_ms: u64,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            instance: String::new(),
            lease_ttl_ms: 6_000,
            tick_ms: 100,
            max_batch_records: 2_000,
            max_batch_bytes: 800_000,
            max_record_bytes: 512 * 1024,
            max_in_flight: 2,
            queue_limit: 20_000,
            snapshot_every: 100_000,
            idempotency_window: machine::DEFAULT_IDEMPOTENCY_WINDOW,
            rate_limits: BTreeMap::from([
                ("submit".to_owned(), Rate::new(20_000, 40_000)),
                ("query".to_owned(), Rate::new(5_000, 10_000)),
                ("unverified".to_owned(), Rate::new(20, 50)),
            ]),
            agent_token_ttl_ms: 3_600_000,
            audit_interval_ms: 1_000,
        }
    }
}

toka_runtime::service_config! {
    /// The service's configuration.
    pub struct Config {
        /// The sequencer.
        kernel: KernelConfig,
        /// Token verification.
        verifier: VerifierConfig,
    }
}
