//! The `toka-kernel` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version" | "-V") => {
            println!("{} {}", toka_kernel::SERVICE_NAME, env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "{}: the deterministic state machine and single sequencer for agents and tasks.\nThe service runtime is not built yet; only --version is available.",
                toka_kernel::SERVICE_NAME
            );
            ExitCode::from(64)
        }
    }
}
