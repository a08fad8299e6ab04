//! The `toka-auth` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version" | "-V") => {
            println!("{} {}", toka_auth::SERVICE_NAME, env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "{}: Ed25519 capability tokens: issue, delegate, revoke, rotate, rate-limit, audit.\nThe service runtime is not built yet; only --version is available.",
                toka_auth::SERVICE_NAME
            );
            ExitCode::from(64)
        }
    }
}
