//! Entity identifiers.
//!
//! Every identifier Toka mints (agents, tasks, operations, token ids) is a
//! [ULID](https://github.com/ulid/spec) written in lowercase Crockford base32: 26 characters that
//! sort by creation time and are safe as a single NATS subject token. The one pattern all of them
//! satisfy is [`ID_PATTERN`]; `schemas/common/defs.v1.json` spells the same regex and a test
//! proves the two agree.
//!
//! The kernel derives the ids it mints from the sequencer's clock and the log position
//! ([`Ulid::from_parts`] with `seq << 16 | idx`), so minting is deterministic under replay.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ulid::Ulid;

/// The regex every identifier matches (the first character is at most `7` because a ULID is 128
/// bits spread over 130).
pub const ID_PATTERN: &str = "^[0-7][0-9a-hjkmnp-tv-z]{25}$";

/// Length of an encoded identifier.
pub const ID_LEN: usize = ulid::ULID_LEN;

/// Why a string is not an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid id {input:?}: expected 26 lowercase Crockford base32 characters matching {ID_PATTERN}")]
pub struct Error {
    input: String,
}

/// Checks `s` against [`ID_PATTERN`] without a regex engine.
fn parse(s: &str) -> Result<Ulid, Error> {
    let bytes = s.as_bytes();
    let well_formed = bytes.len() == ID_LEN
        && (b'0'..=b'7').contains(&bytes[0])
        && bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'h' | b'j' | b'k' | b'm' | b'n' | b'p'..=b't' | b'v'..=b'z'));
    if !well_formed {
        return Err(Error { input: s.chars().take(64).collect() });
    }
    Ulid::from_string(s).map_err(|_| Error { input: s.to_owned() })
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Ulid);

        impl $name {
            /// The id minted at log position `seq.idx` by a sequencer whose clock read
            /// `time_us` microseconds since the Unix epoch. Deterministic: replay mints the same id.
            pub const fn mint(time_us: u64, seq: u64, idx: u16) -> Self {
                Self(Ulid::from_parts(time_us / 1000, ((seq as u128) << 16) | idx as u128))
            }

            /// The id from its 128-bit value.
            pub const fn from_u128(value: u128) -> Self {
                Self(Ulid(value))
            }

            /// The 128-bit value of the id.
            pub const fn as_u128(self) -> u128 {
                self.0.0
            }

            /// Writes the lowercase form into `buf` and returns it, without allocating.
            pub fn encode<'b>(&self, buf: &'b mut [u8; ID_LEN]) -> &'b str {
                let s = self.0.array_to_str(buf);
                s.make_ascii_lowercase();
                s
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self, Error> {
                parse(s).map(Self)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.encode(&mut [0; ID_LEN]))
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.encode(&mut [0; ID_LEN]))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// An agent, minted by the kernel when it applies `agent.spawn`.
    AgentId
);
id_type!(
    /// A task, minted by the kernel when it applies `task.schedule`.
    TaskId
);
id_type!(
    /// An operation's idempotency key, chosen by the client: a retry with the same id returns the
    /// first result instead of applying twice.
    OpId
);
id_type!(
    /// A token's `jti`, minted by auth.
    TokenId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_in_lowercase() {
        let id = AgentId::mint(1_764_000_000_000_000, 42, 3);
        let text = id.to_string();
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<AgentId>(), Ok(id));
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{text}\""));
    }

    #[test]
    fn minting_is_deterministic_and_ordered_by_position() {
        let a = TaskId::mint(5_000, 7, 0);
        assert_eq!(a, TaskId::mint(5_000, 7, 0));
        assert!(a < TaskId::mint(5_000, 7, 1));
        assert!(TaskId::mint(5_000, 7, 1) < TaskId::mint(5_000, 8, 0));
    }

    #[test]
    fn rejects_non_canonical_spellings() {
        for bad in [
            "",
            "01H0000000000000000000000",   // 25 chars
            "01h00000000000000000000000a", // 27 chars
            "01H00000000000000000000000",  // uppercase
            "01h0000000000000000000000i",  // i is not Crockford
            "01h0000000000000000000000l",  // l is not Crockford
            "01h0000000000000000000000o",  // o is not Crockford
            "01h0000000000000000000000u",  // u is not Crockford
            "81h00000000000000000000000",  // overflows 128 bits
            "01h0000000000000000000000.",  // NATS token separator
        ] {
            assert!(bad.parse::<OpId>().is_err(), "{bad:?} accepted");
        }
    }
}
