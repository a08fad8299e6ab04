//! Endpoints every service has.

use serde::{Deserialize, Serialize};

/// `toka.<service>.v1.health` (the request body is `{}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthRequest {}

/// A service instance's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthReply {
    /// The service name (`toka-kernel`).
    pub service: String,
    /// Its version.
    pub version: String,
    /// The instance's id in the NATS services API.
    pub instance: String,
    /// Whether it is ready to serve (false while recovering or starting).
    pub ready: bool,
    /// Time since it started, in milliseconds.
    pub uptime_ms: u64,
}
