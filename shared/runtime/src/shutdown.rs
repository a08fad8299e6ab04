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

/// Runs `work` unless `shutdown` resolves first (`None` then).
pub async fn unless<T>(
    shutdown: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        _ = shutdown.as_mut() => None,
        out = work => Some(out),
    }
}

/// Retries `attempt` with backoff (100 ms doubling to 2 s, each failure logged as waiting for
/// `what`) until it succeeds, or `None` once `shutdown` resolves: how a service waits for the
/// peers it cannot start without.
pub async fn patiently<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    shutdown: &mut std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        match unless(shutdown, attempt()).await? {
            Ok(value) => return Some(value),
            Err(e) => tracing::warn!(error = %e, "waiting for {what}"),
        }
        unless(shutdown, tokio::time::sleep(wait)).await?;
        wait = (wait * 2).min(std::time::Duration::from_secs(2));
    }
}
