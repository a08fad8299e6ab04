//! The `toka-storage` binary: `toka-storage --help` explains its options and configuration.

fn main() -> std::process::ExitCode {
    toka_runtime::cli::main(toka_storage::SERVICE_NAME, toka_storage::DESCRIPTION, toka_storage::run)
}
