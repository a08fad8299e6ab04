//! The `toka-telemetry` binary: `toka-telemetry --help` explains its options and configuration.

fn main() -> std::process::ExitCode {
    toka_runtime::cli::main(toka_telemetry::SERVICE_NAME, toka_telemetry::DESCRIPTION, toka_telemetry::run)
}
