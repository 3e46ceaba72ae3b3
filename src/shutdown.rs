//! Shutdown signalling: one [`Shutdown`] trigger, many cheap [`ShutdownToken`]s that every long
//! wait (`Subscribe` streams, Recv long-polls, the reclaimer) `select!`s on.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use tokio::sync::watch;

/// The trigger. Dropping it also counts as shutdown for its tokens.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
    /// Mirrors the channel for [`ShutdownToken::is_cancelled`], which streams check once per
    /// message: an atomic load instead of the watch channel's lock.
    flag: Arc<AtomicBool>,
}

/// A handle that resolves once shutdown has begun.
#[derive(Clone, Debug)]
pub struct ShutdownToken {
    rx: watch::Receiver<bool>,
    flag: Arc<AtomicBool>,
}

impl Shutdown {
    /// A new, untriggered shutdown.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(false),
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A token that observes this shutdown.
    pub fn token(&self) -> ShutdownToken {
        ShutdownToken {
            rx: self.tx.subscribe(),
            flag: Arc::clone(&self.flag),
        }
    }

    /// Begins shutdown. Idempotent.
    pub fn trigger(&self) {
        self.flag.store(true, Ordering::Release);
        self.tx.send_replace(true);
    }
}

impl Drop for Shutdown {
    fn drop(&mut self) {
        self.flag.store(true, Ordering::Release);
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
        let _ = self.rx.wait_for(|s| *s).await;
    }

    /// Whether shutdown has begun (or its [`Shutdown`] was dropped).
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Acquire)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tokens_see_the_trigger_and_the_drop() {
        let s = Shutdown::new();
        let mut t = s.token();
        assert!(!t.is_cancelled());
        s.trigger();
        assert!(t.is_cancelled());
        t.cancelled().await;

        let s = Shutdown::new();
        let mut t = s.token();
        drop(s);
        assert!(t.is_cancelled(), "a dropped trigger counts as shutdown");
        t.cancelled().await;
    }
}
