//! Request and reply bodies of every endpoint in [`crate::subject`], one module per service:
//! [`service`] (what every service answers), [`kernel`], [`storage`], [`auth`].
//!
//! A reply body is always wrapped as [`crate::wire::Reply`]: `{"ok": <body>}` or
//! `{"error": …}`. Each body type names its schema through [`crate::schema::Contract`].

/// Paging defaults shared by list endpoints.
pub const DEFAULT_PAGE: u32 = 100;
/// The largest page a list endpoint returns.
pub const MAX_PAGE: u32 = 1000;

fn default_page() -> u32 {
    DEFAULT_PAGE
}

pub mod auth;
pub mod kernel;
pub mod service;
pub mod storage;
