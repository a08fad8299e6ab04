//! The `toka-kernel` binary: `toka-kernel --help` explains its options and configuration.

fn main() -> std::process::ExitCode {
    toka_runtime::cli::main(toka_kernel::SERVICE_NAME, toka_kernel::DESCRIPTION, toka_kernel::run)
}
