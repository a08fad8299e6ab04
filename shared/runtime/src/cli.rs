//! The `main` every service binary shares: parse the command line, load the configuration
//! (errors go to stderr with exit code 64, before logging exists), start observability,
//! connect to NATS, run the service until SIGTERM/SIGINT, flush telemetry.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _, Parser};
use serde::Serialize;
use serde::de::DeserializeOwned;

use toka_contract::access::{INBOXES, Role};

use super::bus::Bus;
use super::config::{self, AdminConfig, NatsConfig, ShutdownConfig, TelemetryConfig};
use super::{observe, shutdown};

/// Exit code for a bad command line or configuration (BSD `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;
/// Exit code when NATS cannot be reached (BSD `EX_UNAVAILABLE`).
pub const EXIT_UNAVAILABLE: u8 = 69;

/// A service's configuration: the common sections plus its own.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default + Send + 'static {
    /// NATS.
    fn nats(&self) -> &NatsConfig;
    /// Admin HTTP.
    fn admin(&self) -> &AdminConfig;
    /// Logs, traces, metrics.
    fn telemetry(&self) -> &TelemetryConfig;
    /// Graceful shutdown.
    fn shutdown(&self) -> &ShutdownConfig;
}

/// Declares a service's configuration: the sections every service has (`nats`, `admin`,
/// `telemetry`, `shutdown`) and the service's own, given as fields, each a section of the TOML
/// file; implements [`ServiceConfig`] for it.
///
/// ```ignore
/// toka_runtime::service_config! {
///     /// The service's configuration.
///     pub struct Config {
///         /// The write-ahead log.
///         storage: StorageConfig,
///     }
/// }
/// ```
#[macro_export]
macro_rules! service_config {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident { $($(#[$field_meta:meta])* $field:ident: $ty:ty),* $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(default, deny_unknown_fields)]
        $vis struct $name {
            /// NATS connection.
            pub nats: $crate::config::NatsConfig,
            /// Admin HTTP probes and metrics.
            pub admin: $crate::config::AdminConfig,
            /// Logs, traces and metrics.
            pub telemetry: $crate::config::TelemetryConfig,
            /// Graceful shutdown.
            pub shutdown: $crate::config::ShutdownConfig,
            $($(#[$field_meta])* pub $field: $ty,)*
        }

        impl $crate::cli::ServiceConfig for $name {
            fn nats(&self) -> &$crate::config::NatsConfig {
                &self.nats
            }
            fn admin(&self) -> &$crate::config::AdminConfig {
                &self.admin
            }
            fn telemetry(&self) -> &$crate::config::TelemetryConfig {
                &self.telemetry
            }
            fn shutdown(&self) -> &$crate::config::ShutdownConfig {
                &self.shutdown
            }
        }
    };
}

const AFTER_HELP: &str = "\
Configuration is layered, later layers winning:
  1. built-in defaults            (see them all with --dump-config)
  2. the TOML file given with --config
  3. environment variables TOKA_<SECTION>__<KEY>, e.g. TOKA_NATS__URL=nats://10.0.0.5:4222
  4. --set <section>.<key>=<value>, e.g. --set admin.listen=0.0.0.0:9101
An invalid configuration exits with code 64 and names the key.
SIGTERM or SIGINT stops the service gracefully: it stops taking requests, lets in-flight
ones finish within shutdown.grace_ms, drains NATS and flushes telemetry.";

#[derive(Debug, Parser)]
#[command(version, after_help = AFTER_HELP)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    dump_config: bool,
    /// Override one key, e.g. `--set nats.url=nats://127.0.0.1:4222` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

/// The future a service's `run` receives: resolves when the service should stop.
pub type ShutdownSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Runs a service binary. `run` gets the configuration, the connected bus and the shutdown
/// signal, and returns when the service has stopped.
pub fn main<C, F, Fut, E>(name: &'static str, about: &'static str, run: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, Bus, ShutdownSignal) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let matches = Args::command().name(name).about(about).get_matches();
    let args = Args::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let config: C = match config::load(args.config.as_deref(), std::env::vars(), &args.set) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.dump_config {
        return match config::dump(&config) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let telemetry = match observe::init(config.telemetry(), name) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
        tracing::info!(service = name, version = env!("CARGO_PKG_VERSION"), "starting");
        let inbox = Role::of_service(name).map_or_else(|| INBOXES.to_owned(), Role::inbox);
        let bus = match Bus::connect(config.nats(), name, &inbox).await {
            Ok(bus) => bus,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                telemetry.shutdown().await;
                return ExitCode::from(EXIT_UNAVAILABLE);
            }
        };
        let result = run(config, bus, Box::pin(shutdown::signal())).await;
        let code = match result {
            Ok(()) => {
                tracing::info!(service = name, "stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                tracing::error!(service = name, error = %e, "failed");
                ExitCode::FAILURE
            }
        };
        telemetry.shutdown().await;
        code
    })
}
