//! Shutdown on SIGTERM (what Kubernetes and Docker send) or SIGINT (Ctrl-C).

/// Resolves when the process receives SIGTERM or SIGINT. If the handlers cannot be installed,
/// resolves at once, so the caller shuts down rather than running unstoppable.
pub async fn signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; shutting down");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received; shutting down"),
    }
}
