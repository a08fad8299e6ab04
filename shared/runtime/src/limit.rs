//! Rate limits per principal and operation class: GCRA token buckets from `governor`, one
//! keyed limiter per class. Over the limit, the error carries the `rate_limited` code and how
//! long to wait (`retry_after_ms`). Auth limits its endpoints with it and the kernel its submit
//! path.

use std::collections::BTreeMap;
use std::num::NonZeroU32;

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};

use toka_contract::wire::{ErrorCode, WireError};

/// One class's limit: a sustained rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Requests per second, sustained (at least 1).
    pub per_second: u32,
    /// Requests allowed at once after a quiet spell (at least 1).
    pub burst: u32,
}

impl Rate {
    /// `per_second` sustained, `burst` at once.
    pub const fn new(per_second: u32, burst: u32) -> Rate {
        Rate { per_second, burst }
    }
}

/// Why the limits could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit for class {class}: per_second and burst must be at least 1")]
pub struct Error {
    /// The class.
    pub class: String,
}

/// Keyed GCRA limiters, one per operation class, each keyed by principal.
pub struct Limits {
    classes: BTreeMap<String, DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").field("classes", &self.classes.keys().collect::<Vec<_>>()).finish()
    }
}

impl Limits {
    /// A limiter per class of `rates`.
    pub fn new(rates: &BTreeMap<String, Rate>) -> Result<Limits, Error> {
        let mut classes = BTreeMap::new();
        for (class, rate) in rates {
            let bad = || Error { class: class.clone() };
            let per_second = NonZeroU32::new(rate.per_second).ok_or_else(bad)?;
            let burst = NonZeroU32::new(rate.burst).ok_or_else(bad)?;
            classes.insert(class.clone(), RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)));
        }
        Ok(Limits { classes, clock: DefaultClock::default() })
    }

    /// Takes one request of `class` for `principal`; over the limit, the `rate_limited` error
    /// with the wait. A class without a configured rate is not limited.
    pub fn check(&self, class: &str, principal: &str) -> Result<(), WireError> {
        let Some(limiter) = self.classes.get(class) else { return Ok(()) };
        // The principal is owned only on the first request of a bucket; a hit borrows nothing
        // it does not need.
        limiter.check_key(&principal.to_owned()).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            WireError::new(ErrorCode::RateLimited, format!("{principal} is over the {class} rate limit"))
                .with_retry_after_ms(ms)
        })
    }

    /// `refusal`, or the `rate_limited` error once `class`'s budget for `key` is spent: how a
    /// request that is refused anyway (its credential does not verify) is limited.
    pub fn refuse_within(&self, class: &str, key: &str, refusal: WireError) -> WireError {
        self.check(class, key).err().unwrap_or(refusal)
    }

    /// Forgets principals whose buckets are full again, so the key space stays bounded.
    pub fn forget_idle(&self) {
        for limiter in self.classes.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_limit_says_when_to_retry() {
        let limits = Limits::new(&BTreeMap::from([("issue".to_owned(), Rate::new(2, 3))])).unwrap();
        for _ in 0..3 {
            limits.check("issue", "alice").unwrap();
        }
        let refused = limits.check("issue", "alice").unwrap_err();
        assert_eq!(refused.code, ErrorCode::RateLimited);
        let wait = refused.retry_after_ms.unwrap();
        assert!((1..=500).contains(&wait), "about half a second at 2/s, got {wait} ms");
        limits.check("issue", "bob").expect("another principal has its own bucket");
        limits.check("read", "alice").expect("an unconfigured class is not limited");
        std::thread::sleep(std::time::Duration::from_millis(wait + 5));
        limits.check("issue", "alice").expect("after the wait one more passes");
        limits.forget_idle();
    }

    #[test]
    fn a_zero_rate_is_refused() {
        let err = Limits::new(&BTreeMap::from([("submit".to_owned(), Rate::new(0, 1))])).unwrap_err();
        assert_eq!(err.class, "submit");
    }
}
