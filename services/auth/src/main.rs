//! The `toka-auth` binary: `toka-auth --help` explains its options and configuration.

fn main() -> std::process::ExitCode {
    toka_runtime::cli::main(toka_auth::SERVICE_NAME, toka_auth::DESCRIPTION, toka_auth::run)
}
