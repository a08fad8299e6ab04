//! The `toka-telemetry` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version" | "-V") => {
            println!("{} {}", toka_telemetry::SERVICE_NAME, env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "{}: OpenTelemetry export, Prometheus metrics, dashboard and event analyzers.\nThe service runtime is not built yet; only --version is available.",
                toka_telemetry::SERVICE_NAME
            );
            ExitCode::from(64)
        }
    }
}
