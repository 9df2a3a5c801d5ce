//! The shutdown signal: SIGTERM (orchestrators) or SIGINT (a terminal).

use std::future::Future;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// The shutdown signal, listened for from the moment it is made: a worker
/// asked to stop while it still waits for its database at start exits at
/// once, with 0, as it does later.
#[derive(Debug, Clone)]
pub(crate) struct Shutdown {
    requested: CancellationToken,
}

impl Shutdown {
    /// Listens for SIGTERM and SIGINT from now on.
    pub(crate) fn listen() -> Self {
        let requested = CancellationToken::new();
        let trigger = requested.clone();
        tokio::spawn(async move {
            signal().await;
            trigger.cancel();
        });
        Self { requested }
    }

    /// `work`'s output, or `None` if the stop was asked for first (then
    /// `work` is dropped where it waits).
    pub(crate) async fn unless_requested<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            () = self.requested.cancelled() => {
                info!("Stopped before starting to consume");
                None
            }
            output = work => Some(output),
        }
    }

    /// Resolves when the stop is asked for.
    pub(crate) fn requested(&self) -> impl Future<Output = ()> + Send + 'static {
        let requested = self.requested.clone();
        async move { requested.cancelled().await }
    }
}

/// Resolves when the process is asked to stop.
pub async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!(signal = "SIGINT", "Shutting down"),
        () = term => info!(signal = "SIGTERM", "Shutting down"),
    }
}
