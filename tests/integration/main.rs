//! Toka's integration tests: one binary, a module per area.
//!
//! - `docs`: the tables in `ARCHITECTURE.md` and `README.md` agree with the code.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod docs;
