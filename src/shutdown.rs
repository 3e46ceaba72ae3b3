//! Shutdown signalling: one [`Shutdown`] trigger, many cheap [`ShutdownToken`]s that every long
//! wait (`Subscribe` streams, Recv long-polls, the reclaimer) `select!`s on.

use tokio::sync::watch;

/// The trigger. Dropping it also counts as shutdown for its tokens.
#[derive(Debug)]
pub struct Shutdown(watch::Sender<bool>);

/// A handle that resolves once shutdown has begun.
#[derive(Clone, Debug)]
pub struct ShutdownToken(watch::Receiver<bool>);

impl Shutdown {
    /// A new, untriggered shutdown.
    pub fn new() -> Self {
        Self(watch::Sender::new(false))
    }

    /// A token that observes this shutdown.
    pub fn token(&self) -> ShutdownToken {
        ShutdownToken(self.0.subscribe())
    }

    /// Begins shutdown. Idempotent.
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl ShutdownToken {
    /// Resolves once shutdown has begun (or the trigger is gone).
    pub async fn cancelled(&mut self) {
        let _ = self.0.wait_for(|s| *s).await;
    }

    /// Whether shutdown has begun.
    pub fn is_cancelled(&self) -> bool {
        *self.0.borrow() || self.0.has_changed().is_err()
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}
