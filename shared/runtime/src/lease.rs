//! A lease in a NATS JetStream key-value bucket whose entries expire after a TTL: one holder
//! at a time, which must renew it (compare-and-set on the revision it wrote) well within the
//! TTL. When the holder stops renewing, the entry ages out and another candidate's create
//! succeeds. Auth's rotation lease and the kernel's sequencer lease are both this.

use std::time::Duration;

use async_nats::jetstream::{self, kv};

use crate::bus::Bus;

/// Why the lease bucket could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("lease bucket {bucket}: {reason}")]
pub struct Error {
    /// The bucket.
    pub bucket: String,
    /// Why.
    pub reason: String,
}

/// One candidate for a lease.
pub struct Lease {
    store: kv::Store,
    key: String,
    holder: String,
    ttl: Duration,
    revision: Option<u64>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("holder", &self.holder)
            .field("held", &self.held())
            .finish()
    }
}

impl Lease {
    /// The candidate `holder` for `key` in `bucket`, whose entries live `ttl` (the bucket is
    /// created, or its TTL updated, as needed).
    pub async fn open(bus: &Bus, bucket: &str, key: &str, holder: &str, ttl: Duration) -> Result<Lease, Error> {
        let js = jetstream::new(bus.client().clone());
        let config = kv::Config {
            bucket: bucket.to_owned(),
            description: "Toka leases".to_owned(),
            history: 1,
            max_age: ttl,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let store = js
            .create_or_update_key_value(config)
            .await
            .map_err(|e| Error { bucket: bucket.to_owned(), reason: e.to_string() })?;
        Ok(Lease { store, key: key.to_owned(), holder: holder.to_owned(), ttl, revision: None })
    }

    /// How often to call [`Lease::renew`]: a third of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 3
    }

    /// Whether this candidate held the lease at its last renewal.
    pub fn held(&self) -> bool {
        self.revision.is_some()
    }

    /// Takes the lease if it is free, or renews it if held; whether it is held now. A failed
    /// renewal (another holder, or NATS unreachable) gives it up.
    pub async fn renew(&mut self) -> bool {
        let value = bytes::Bytes::from(self.holder.clone().into_bytes());
        let result = match self.revision {
            Some(revision) => self.store.update(&self.key, value, revision).await.map_err(|e| e.to_string()),
            None => self.store.create(&self.key, value).await.map_err(|e| e.to_string()),
        };
        match result {
            Ok(revision) => {
                if self.revision.is_none() {
                    tracing::info!(key = %self.key, holder = %self.holder, "lease taken");
                }
                self.revision = Some(revision);
            }
            Err(reason) => {
                if self.revision.is_some() {
                    tracing::warn!(key = %self.key, holder = %self.holder, %reason, "lease lost");
                }
                self.revision = None;
            }
        }
        self.held()
    }

    /// Who holds the lease now, if anyone.
    pub async fn holder(&self) -> Option<String> {
        let value = self.store.get(&self.key).await.ok()??;
        String::from_utf8(value.to_vec()).ok()
    }

    /// Gives the lease up at once (on a clean shutdown), so a standby need not wait the TTL.
    pub async fn release(&mut self) {
        if let Some(revision) = self.revision.take() {
            let _ = self.store.delete_expect_revision(&self.key, Some(revision)).await;
        }
    }
}

/// The name a candidate uses in a lease: `configured` if it is one (letters, digits, `-`, `_`),
/// a random one when empty; `Err` names the problem.
pub fn candidate_name(configured: &str) -> Result<String, String> {
    if configured.is_empty() {
        let mut random = [0u8; 6];
        getrandom::getrandom(&mut random).map_err(|e| format!("no random source: {e}"))?;
        return Ok(random.iter().map(|b| format!("{b:02x}")).collect());
    }
    if configured.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        Ok(configured.to_owned())
    } else {
        Err(format!("{configured:?}: use letters, digits, - and _"))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn candidate_names_are_checked_or_made_up() {
        assert_eq!(super::candidate_name("kernel-a_1").unwrap(), "kernel-a_1");
        assert!(super::candidate_name("a.b").is_err());
        let made_up = super::candidate_name("").unwrap();
        assert_eq!(made_up.len(), 12);
        assert_ne!(made_up, super::candidate_name("").unwrap());
    }
}
