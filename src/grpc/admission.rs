//! Connection admission: which TCP connections reach the gRPC server, and how much they may
//! log.
//!
//! - **Handshake timeout**: a connection must send the 24-byte HTTP/2 client preface (with TLS:
//!   complete the TLS handshake) within `--handshake-timeout-ms` (default 10 s), or it is closed
//!   without ever reaching tonic. A socket that connects and stays silent otherwise holds
//!   memory forever (HTTP/2 keepalive only starts after the preface).
//! - **`--max-connections`** (default 65,536, NATS's default): connections beyond it are
//!   accepted and closed at once; the open ones keep working. Silent connections waiting for
//!   their preface count too.
//! - **Log budget**: connection and rejection events are logged at INFO, but at most
//!   [`LOG_LINES_PER_SECOND`] lines of each kind per second; the rest are counted and reported
//!   in one summary line per second, so a flood of connections or bad requests cannot fill a
//!   disk with logs.
//!
//! Every refused connection is counted in `switchboard_connections_rejected_total{reason}`.

use std::{
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

use super::tls::{subject_of, TlsState};
use crate::{config::Admission, metrics::Metrics, shutdown::ShutdownToken};

/// An admitted connection's byte stream.
#[derive(Debug)]
pub(crate) enum Io {
    /// Plaintext HTTP/2.
    Plain(TcpStream),
    /// TLS; the client certificate's subject, if one was presented.
    Tls(
        Box<tokio_rustls::server::TlsStream<TcpStream>>,
        Option<String>,
    ),
}

impl Io {
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(s) => s,
            Self::Tls(s, _) => s.get_ref().0,
        }
    }
}

/// The HTTP/2 client connection preface (RFC 9113 §3.4), which every gRPC client sends first.
const PREFACE_BYTES: usize = 24;
/// Lines of one kind of connection or rejection event logged per second before the rest are
/// only counted.
pub const LOG_LINES_PER_SECOND: u64 = 20;

/// A per-second budget of log lines of one kind. See the module docs.
#[derive(Debug, Default)]
pub struct LogBudget {
    /// The second (since the epoch) the counts are for.
    second: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
}

impl LogBudget {
    /// Whether one more line may be logged this second. When a new second begins and lines
    /// were suppressed in the last one, logs one summary line for `what` first.
    pub fn allow(&self, what: &'static str) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let second = self.second.load(Ordering::Relaxed);
        if now != second
            && self
                .second
                .compare_exchange(second, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.used.store(0, Ordering::Relaxed);
            let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
            if suppressed > 0 {
                tracing::info!(
                    event = what,
                    suppressed,
                    "log lines suppressed in the last second(s)"
                );
            }
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < LOG_LINES_PER_SECOND {
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// Log budgets for connection events and rejected requests.
pub(crate) static CONNECTION_LOGS: LogBudget = LogBudget {
    second: AtomicU64::new(0),
    used: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};
/// Log budget for rejected requests.
pub(crate) static REJECTION_LOGS: LogBudget = LogBudget {
    second: AtomicU64::new(0),
    used: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};

/// Log budget for panics (see [`install_panic_log`]).
static PANIC_LOGS: LogBudget = LogBudget {
    second: AtomicU64::new(0),
    used: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};

/// Replaces the default panic output (stderr, with a backtrace per panic under
/// `RUST_BACKTRACE=1`) with one `error` log line per panic under the same per-second budget as
/// other events ([`LOG_LINES_PER_SECOND`]), so a request that reaches a bug cannot flood the
/// log. No request path is meant to panic; a panic inside a request's task fails that call
/// (tonic answers it) and the broker goes on.
pub fn install_panic_log() {
    std::panic::set_hook(Box::new(|info| {
        if !PANIC_LOGS.allow("panic") {
            return;
        }
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(%location, %message, "panic (a bug: please report it)");
    }));
}

/// One admitted connection's slot; frees it when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// Takes one of `max` slots counted by `open`; `None` when all are taken.
    pub(crate) fn try_acquire(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        if open.fetch_add(1, Ordering::AcqRel) >= max {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(Arc::clone(open)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The next connection on `listener`, or `None` once `shutdown` fires. An accept error (out of
/// file descriptors and the like) is logged within the connection log budget as `what` and
/// retried after 10 ms, so the loop never spins.
pub(crate) async fn accept(
    listener: &TcpListener,
    shutdown: &mut ShutdownToken,
    what: &'static str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shutdown.cancelled() => return None,
        };
        match accepted {
            Ok(a) => return Some(a),
            Err(e) => {
                if CONNECTION_LOGS.allow(what) {
                    tracing::warn!(error = %e, "{what}");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Accepts connections on `listener` until `shutdown`, and yields those that sent their
/// preface in time, with their slot. Runs the accept loop and each handshake wait in tasks of
/// their own, so one slow connection never holds up another.
pub(crate) fn incoming(
    listener: TcpListener,
    admission: Admission,
    tls: Option<TlsState>,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownToken,
) -> ReceiverStream<std::io::Result<(Io, Slot)>> {
    let (tx, rx) = mpsc::channel(128);
    let open = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        loop {
            let Some((stream, _)) = accept(&listener, &mut shutdown, "accept failed").await else {
                return;
            };
            let Some(slot) = Slot::try_acquire(&open, admission.max_connections) else {
                metrics.connection_rejected("max_connections");
                if CONNECTION_LOGS.allow("connection refused") {
                    let peer = stream
                        .peer_addr()
                        .map(|p| p.to_string())
                        .unwrap_or_default();
                    tracing::info!(peer = %peer, limit = admission.max_connections, "connection refused: --max-connections reached");
                }
                continue; // dropped: closed
            };
            let tx = tx.clone();
            let metrics = Arc::clone(&metrics);
            let tls = tls.clone();
            tokio::spawn(async move {
                let peer = stream
                    .peer_addr()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                let handshake = async {
                    match &tls {
                        None => preface(&stream).await.map(|()| Io::Plain(stream)),
                        Some(tls) => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
                            let s = acceptor.accept(stream).await?;
                            let subject = s
                                .get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|c| c.first())
                                .and_then(subject_of);
                            Ok(Io::Tls(Box::new(s), subject))
                        }
                    }
                };
                match tokio::time::timeout(admission.handshake_timeout, handshake).await {
                    Ok(Ok(io)) => {
                        let _ = tx.send(Ok((io, slot))).await;
                    }
                    Ok(Err(e)) => {
                        // Closed before the preface, or a failed TLS handshake (plaintext
                        // client, unknown CA, no client certificate where one is required).
                        if tls.is_some() {
                            metrics.connection_rejected("tls_handshake");
                            if CONNECTION_LOGS.allow("tls handshake failed") {
                                tracing::info!(peer = %peer, error = %e, "TLS handshake failed");
                            }
                        }
                    }
                    Err(_) => {
                        metrics.connection_rejected("handshake_timeout");
                        if CONNECTION_LOGS.allow("handshake timeout") {
                            tracing::info!(peer = %peer, "connection closed: no HTTP/2 preface within --handshake-timeout-ms");
                        }
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Waits until the peer has sent at least the preface's length of bytes (left unread for the
/// HTTP/2 server), or closed.
async fn preface(stream: &TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; PREFACE_BYTES];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if n >= PREFACE_BYTES {
            return Ok(());
        }
        // Part of it: peek returns at once while those bytes sit unread, so pause.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_allows_its_lines_per_second_then_counts() {
        let b = LogBudget::default();
        let allowed = (0..100).filter(|_| b.allow("test")).count() as u64;
        // Usually all in one second; across a second boundary, up to twice the budget.
        assert!((LOG_LINES_PER_SECOND..=2 * LOG_LINES_PER_SECOND).contains(&allowed));
        assert!(b.suppressed.load(Ordering::Relaxed) <= 100 - LOG_LINES_PER_SECOND);
    }
}
