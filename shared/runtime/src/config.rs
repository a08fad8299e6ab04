//! Layered configuration: built-in defaults, then a TOML file, then `TOKA_…` environment
//! variables (`__` separates nesting levels: `TOKA_NATS__URL`), then `--set key=value` on the
//! command line. Unknown keys are errors, and every error names the key.
//!
//! The loader takes the environment as an argument, so tests pass a map instead of touching the
//! process environment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `--set` argument is not `key=value`.
    #[error("--set {0:?}: expected key=value")]
    Override(String),
    /// The sources do not form a valid configuration; the message names the key.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The configuration could not be printed.
    #[error("configuration does not serialize: {0}")]
    Dump(String),
}

/// Loads `T` from its defaults, `file`, the `TOKA_` variables of `env`, and `overrides`.
///
/// Environment variables whose first segment is not a top-level key of `T` are ignored, so
/// unrelated `TOKA_…` variables (`TOKA_REQUIRE_DOCKER`) do not break a service.
pub fn load<T>(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &[String],
) -> Result<T, Error>
where
    T: Serialize + DeserializeOwned + Default,
{
    let invalid = |e: config::ConfigError| Error::Invalid(e.to_string());
    let defaults = config::Config::try_from(&T::default()).map_err(invalid)?;
    let top_level: Vec<String> = match serde_json::to_value(T::default()) {
        Ok(serde_json::Value::Object(map)) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    let env: BTreeMap<String, String> = env
        .into_iter()
        .filter(|(k, _)| {
            k.strip_prefix("TOKA_")
                .and_then(|rest| rest.split("__").next())
                .is_some_and(|first| top_level.iter().any(|t| t.eq_ignore_ascii_case(first)))
        })
        .collect();
    let mut builder = config::Config::builder().add_source(defaults);
    if let Some(path) = file {
        builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml).required(true));
    }
    let env_source = config::Environment::with_prefix("TOKA")
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true)
        .source(Some(env.into_iter().collect()));
    builder = builder.add_source(env_source);
    for o in overrides {
        let (key, value) = o.split_once('=').ok_or_else(|| Error::Override(o.clone()))?;
        builder = builder.set_override(key.trim(), value.trim()).map_err(invalid)?;
    }
    builder.build().map_err(invalid)?.try_deserialize().map_err(invalid)
}

/// The configuration as TOML, for `--dump-config`.
pub fn dump<T: Serialize>(config: &T) -> Result<String, Error> {
    toml::to_string_pretty(config).map_err(|e| Error::Dump(e.to_string()))
}

/// How to reach NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated. Env `TOKA_NATS__URL`.
    pub url: String,
    /// File holding this service's nkey seed (`SU…`), mode 0600; generated per deployment by
    /// `toka nats-config`. Without it the connection is anonymous, which a secured server refuses.
    pub nkey_seed_file: Option<PathBuf>,
    /// How long a request to another service may take, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long to keep retrying the first connection, in milliseconds.
    pub connect_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".to_owned(),
            nkey_seed_file: None,
            request_timeout_ms: 5_000,
            connect_timeout_ms: 10_000,
        }
    }
}

/// The admin HTTP endpoint: `/livez`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to listen on (`127.0.0.1:9101`); port 0 picks a free one.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)) }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when standard output is not a terminal, text when it is.
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable text.
    Text,
}

/// Logs, traces and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `tracing` filter directives (`info`, `toka_storage=debug,info`). Env `RUST_LOG` is not read.
    pub log_filter: String,
    /// Log format.
    pub log_format: LogFormat,
    /// OTLP/HTTP collector base URL (`http://127.0.0.1:4318`); traces and metrics are exported
    /// only when it is set.
    pub otlp_endpoint: Option<String>,
    /// How long to wait for telemetry to flush at exit, in milliseconds.
    pub flush_timeout_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            log_filter: "info".to_owned(),
            log_format: LogFormat::Auto,
            otlp_endpoint: None,
            flush_timeout_ms: 5_000,
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight requests may take to finish after shutdown begins, in milliseconds.
    pub grace_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { grace_ms: 10_000 }
    }
}

crate::service_config! {
    /// The sections every service's configuration has; a service with nothing of its own yet
    /// uses it as its whole configuration.
    pub struct Common {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("toka-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[nats]\nurl = \"nats://file:4222\"\nrequest_timeout_ms = 7\n[shutdown]\ngrace_ms = 1\n")
            .unwrap();
        let c: Common = load(
            Some(&file),
            env(&[("TOKA_NATS__URL", "nats://env:4222"), ("TOKA_SHUTDOWN__GRACE_MS", "2")]),
            &["shutdown.grace_ms=3".into()],
        )
        .unwrap();
        assert_eq!(c.nats.url, "nats://env:4222", "env beats file");
        assert_eq!(c.nats.request_timeout_ms, 7, "file beats defaults");
        assert_eq!(c.shutdown.grace_ms, 3, "CLI beats env");
        assert_eq!(c.telemetry.log_filter, "info", "defaults fill the rest");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let err = load::<Common>(None, env(&[("TOKA_SHUTDOWN__GRACE_MS", "soon")]), &[]).unwrap_err().to_string();
        assert!(err.contains("grace_ms"), "{err}");
        let err = load::<Common>(None, [], &["nats.ulr=x".into()]).unwrap_err().to_string();
        assert!(err.contains("ulr"), "{err}");
        assert!(matches!(load::<Common>(None, [], &["nats.url".into()]), Err(Error::Override(_))));
        let missing = load::<Common>(Some(Path::new("/nonexistent/toka.toml")), [], &[]).unwrap_err().to_string();
        assert!(missing.contains("/nonexistent/toka.toml"), "{missing}");
    }

    #[test]
    fn unrelated_toka_variables_are_ignored() {
        let c: Common = load(None, env(&[("TOKA_REQUIRE_DOCKER", "1"), ("HOME", "/root")]), &[]).unwrap();
        assert_eq!(c, Common::default());
    }

    #[test]
    fn dump_round_trips() {
        let c = Common::default();
        let text = dump(&c).unwrap();
        let dir = std::env::temp_dir().join(format!("toka-dump-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("d.toml"), &text).unwrap();
        assert_eq!(load::<Common>(Some(&dir.join("d.toml")), [], &[]).unwrap(), c);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
