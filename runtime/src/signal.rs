//! The shutdown signal both programs stop on: SIGTERM (systemd, a
//! container runtime) or SIGINT (Ctrl-C).

use std::future::Future;
use tokio::signal::unix::{SignalKind, signal};

/// Completes at the first SIGTERM or SIGINT. The handlers are installed
/// when this is called (inside a Tokio runtime), so a signal arriving
/// before the future is first polled still counts. Without handlers (which
/// only happens when the process is out of resources) it never completes,
/// and says so.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("Cannot install signal handlers; stop the process with SIGKILL.");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "Signal received."),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "Signal received."),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{Signal, raise};
    use std::time::Duration;

    #[tokio::test]
    async fn sigterm_and_sigint_complete_the_shutdown_future() {
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            let shutdown = shutdown_signal();
            raise(sig).unwrap();
            tokio::time::timeout(Duration::from_secs(5), shutdown)
                .await
                .unwrap_or_else(|_| panic!("{sig} did not complete the future"));
        }
    }
}
