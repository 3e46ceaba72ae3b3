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

/// The process's shutdown signals, handled from the moment [`Signals::install`] returns.
///
/// Until a handler is installed, SIGTERM, SIGINT and SIGHUP keep their default action, which
/// ends the process at once, by the signal: no drain, and an exit status that a service manager
/// reads as a failure. Install them before announcing "listening", so a supervisor or a test
/// that signals right after that line gets a graceful shutdown. tokio never uninstalls a
/// handler: from here on these signals never kill the process.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    /// Held only so that SIGHUP, whose default action also ends the process, is handled from
    /// here on; the reload task (`grpc::server`) listens for it once the server runs. A SIGHUP
    /// before then reloads nothing: the material was just loaded.
    #[cfg(unix)]
    _hangup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Installs the handlers now (not on the first poll, as `tokio::signal::ctrl_c` would).
    /// Must run inside the tokio runtime.
    ///
    /// # Errors
    /// The operating system refused a handler.
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
                _hangup: signal(SignalKind::hangup())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// Resolves on the first SIGINT (Ctrl-C) or SIGTERM since [`Signals::install`], logging
    /// which.
    pub async fn recv(self) {
        #[cfg(unix)]
        {
            let Self {
                mut interrupt,
                mut terminate,
                _hangup,
            } = self;
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received, shutting down"),
                _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = self;
            match tokio::signal::ctrl_c().await {
                Ok(()) => tracing::info!("Ctrl-C received, shutting down"),
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for Ctrl-C");
                    std::future::pending::<()>().await;
                }
            }
        }
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
