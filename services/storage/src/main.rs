//! The `toka-storage` binary.

use std::process::ExitCode;

fn main() -> ExitCode {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version" | "-V") => {
            println!("{} {}", toka_storage::SERVICE_NAME, env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "{}: the write-ahead log: named, hash-chained logs on SQLite (default) or FoundationDB.\nThe service runtime is not built yet; only --version is available.",
                toka_storage::SERVICE_NAME
            );
            ExitCode::from(64)
        }
    }
}
