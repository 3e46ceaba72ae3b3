//! Browsers: gRPC-Web on the gRPC port, and the HTTP listener (`--http-listen`) that serves the
//! web console, Prometheus metrics and the console's own gRPC-Web calls.
//!
//! Browsers cannot speak HTTP/2 gRPC (no trailers, no control over framing), so they use
//! [gRPC-Web](https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md): the same messages
//! and frames, with the status sent as a last frame in the body (`application/grpc-web`,
//! `+proto`) or the whole body base64-encoded (`application/grpc-web-text`), over HTTP/1.1 or
//! HTTP/2. The `tonic-web` crate translates both ways in front of our services, so every method
//! (the zero-copy Subscribe route included), the auth layer and the permissions answer gRPC-Web
//! exactly as they answer gRPC.
//!
//! Cross-origin pages need CORS: [`cors_layer`] allows the `--cors-origin` origins only (none by
//! default) and answers their preflight `OPTIONS` requests. The console needs none of it: its page
//! and its gRPC-Web calls share one origin, the HTTP listener.
//!
//! Same-origin is not enough against DNS rebinding: both listeners sit behind a
//! [`HostGuard`] (allowed `Host` and `Origin`, `--http-allowed-hosts`).
//! The HTTP listener runs its own connection loop (`serve`): a handshake task per connection,
//! `--http-max-connections`, and hyper's header-read timeout as the idle timeout
//! (`--http-idle-timeout-ms`), none of which `axum::serve` offers.

use std::{
    sync::{atomic::AtomicUsize, Arc},
    time::Duration,
};

use axum::{
    extract::State,
    http::{header, HeaderValue, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::{
    admission::{Slot, CONNECTION_LOGS},
    hosts::HostGuard,
    tls::TlsState,
};
use crate::{
    broker::Broker,
    config::HttpListener,
    metrics::{Metrics, CONTENT_TYPE},
    shutdown::ShutdownToken,
};

/// The console page and its style sheet (served as written), and its script: bundled from
/// `web/src/` by `npm run build` (TypeScript, Connect-ES, esbuild) into `web/dist/` and
/// committed, so `cargo build` needs no npm.
const INDEX_HTML: &[u8] = include_bytes!("../../web/src/index.html");
const CONSOLE_JS: &[u8] = include_bytes!("../../web/dist/console.js");
const CONSOLE_CSS: &[u8] = include_bytes!("../../web/src/console.css");

/// The page may load its own script, style and data only: no CDN, no inline script, no
/// third-party connection.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Request headers a gRPC-Web client sends (Connect-ES, grpc-web, tonic-web's client).
const ALLOWED_HEADERS: [&str; 6] = [
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
    "connect-protocol-version",
];
/// Response headers a browser must let the page read to see a call's status.
const EXPOSED_HEADERS: [&str; 3] = ["grpc-status", "grpc-message", "grpc-status-details-bin"];
/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

/// Checks one `--cors-origin` value: an origin as browsers send it, `scheme://host[:port]`
/// with scheme `http` or `https`, no path and no trailing slash (`https://app.example.com`,
/// `http://127.0.0.1:3000`).
///
/// # Errors
/// A message naming the value and what is wrong with it.
pub fn parse_origin(origin: &str) -> Result<HeaderValue, String> {
    let bad = |why: &str| format!("--cors-origin {origin:?}: {why}");
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with http:// or https://"))?;
    if rest.is_empty() {
        return Err(bad("has no host"));
    }
    if rest.contains(['/', '?', '#']) {
        return Err(bad(
            "must be an origin only (scheme://host[:port]), without a path or a trailing slash",
        ));
    }
    HeaderValue::from_str(origin).map_err(|_| bad("is not a valid header value"))
}

/// The CORS layer for the gRPC port: lets pages from `origins` (exact matches, see
/// [`parse_origin`]) call every method with POST, send the gRPC-Web headers and
/// `authorization`, and read `grpc-status` / `grpc-message`; answers their preflight
/// `OPTIONS` requests itself (cached for 24 h). With no origins, no cross-origin page is
/// allowed: browsers then refuse the call after the preflight.
pub fn cors_layer(origins: &[HeaderValue]) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::POST, Method::OPTIONS])
        .allow_headers(ALLOWED_HEADERS.map(header::HeaderName::from_static))
        .expose_headers(EXPOSED_HEADERS.map(header::HeaderName::from_static))
        .max_age(PREFLIGHT_MAX_AGE)
}

fn asset(content_type: &'static str, body: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

async fn metrics(State(broker): State<Broker>) -> Response {
    let disk = i64::try_from(broker.engine().disk_bytes()).unwrap_or(i64::MAX);
    broker.metrics().disk_bytes.set(disk);
    let reading = i64::try_from(broker.read_budget().in_use()).unwrap_or(i64::MAX);
    broker.metrics().read_buffer_bytes.set(reading);
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        broker.metrics().render(
            broker.address_count(),
            broker.total_retained_bytes(),
            broker.total_retained_messages(),
        ),
    )
        .into_response()
}

/// The HTTP listener's routes: the console (`/`, `/console.js`, `/console.css`), `/metrics`, and
/// `grpc_web` (the gRPC services, already behind the gRPC-Web translation) for every other path;
/// all behind `guard` (allowed `Host` and `Origin`, see `grpc::hosts`).
pub(crate) fn router(broker: Broker, grpc_web: Router, guard: HostGuard) -> Router {
    let console = Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", CONSOLE_JS) }),
        )
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", CONSOLE_CSS) }),
        )
        .route("/metrics", get(metrics))
        .with_state(broker);
    console
        .merge(grpc_web)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found: the console is at /\n") })
        .layer(guard)
}

/// Serves `app` on `listener` (with TLS when the broker has it) until shutdown begins; open
/// Subscribe streams end at shutdown like those on the gRPC port.
///
/// Each connection runs in a task of its own from the moment it is accepted, its TLS handshake
/// included (bounded by `--handshake-timeout-ms`), so a silent socket never holds up the
/// next. At most `limits.max_connections` are open at once (those in their handshake count);
/// beyond it a new connection is closed at once, counted and logged within the connection log
/// budget. A connection waiting longer than `limits.idle_timeout` for its next request's
/// header is closed (hyper's header-read timeout, which covers keep-alive idleness too); a
/// request being answered, such as a live tail's stream, is not cut.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<(TlsState, Duration)>,
    limits: HttpListener,
    metrics: Arc<Metrics>,
    mut shutdown: ShutdownToken,
) {
    if let Ok(addr) = listener.local_addr() {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(listen = %addr, max_connections = limits.max_connections, idle_timeout_ms = limits.idle_timeout.as_millis(), "console at {scheme}://{addr}/, metrics at {scheme}://{addr}/metrics");
    }
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.idle_timeout)
        .keep_alive(true);
    let open = Arc::new(AtomicUsize::new(0));
    loop {
        let Some((stream, peer)) =
            super::admission::accept(&listener, &mut shutdown, "HTTP listener: accept failed")
                .await
        else {
            return;
        };
        let Some(slot) = Slot::try_acquire(&open, limits.max_connections) else {
            metrics.connection_rejected("http_max_connections");
            if CONNECTION_LOGS.allow("http connection refused") {
                tracing::info!(peer = %peer, limit = limits.max_connections, "HTTP listener: connection refused: --http-max-connections reached");
            }
            continue; // dropped: closed
        };
        let connection = Connection {
            http: http.clone(),
            app: app.clone(),
            metrics: Arc::clone(&metrics),
            shutdown: shutdown.clone(),
            peer,
            _slot: slot,
        };
        match &tls {
            None => {
                tokio::spawn(connection.serve(stream));
            }
            Some((tls, handshake_timeout)) => {
                // The HTTP listener speaks HTTP/1.1 only.
                let mut config = (*tls.current()).clone();
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
                let handshake_timeout = *handshake_timeout;
                tokio::spawn(async move {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => connection.serve(stream).await,
                        Ok(Err(e)) => {
                            connection.metrics.connection_rejected("http_tls_handshake");
                            if CONNECTION_LOGS.allow("http tls handshake failed") {
                                tracing::info!(peer = %connection.peer, error = %e, "HTTP listener: TLS handshake failed");
                            }
                        }
                        Err(_) => {
                            connection
                                .metrics
                                .connection_rejected("http_handshake_timeout");
                            if CONNECTION_LOGS.allow("http handshake timeout") {
                                tracing::info!(peer = %connection.peer, "HTTP listener: connection closed: no TLS handshake within --handshake-timeout-ms");
                            }
                        }
                    }
                });
            }
        }
    }
}

/// One accepted connection of the HTTP listener, holding its slot until it closes.
struct Connection {
    http: hyper::server::conn::http1::Builder,
    app: Router,
    metrics: Arc<Metrics>,
    shutdown: ShutdownToken,
    peer: std::net::SocketAddr,
    _slot: Slot,
}

impl Connection {
    /// Serves HTTP/1.1 on `io` until the peer closes, the idle timeout passes, or shutdown
    /// begins (then the request in flight finishes and the connection closes).
    async fn serve<I>(mut self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper_util::service::TowerToHyperService::new(self.app.clone());
        let conn = self
            .http
            .serve_connection(hyper_util::rt::TokioIo::new(io), service);
        tokio::pin!(conn);
        let served = tokio::select! {
            r = conn.as_mut() => r,
            () = self.shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = served {
            // Idle past the timeout, a malformed request, a peer gone mid-response: the
            // connection's own business.
            tracing::debug!(peer = %self.peer, error = %e, "HTTP listener: connection ended");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked() {
        assert!(parse_origin("https://app.example.com").is_ok());
        assert!(parse_origin("http://127.0.0.1:3000").is_ok());
        let e = parse_origin("app.example.com").unwrap_err();
        assert!(e.contains("http:// or https://"), "{e}");
        let e = parse_origin("https://app.example.com/").unwrap_err();
        assert!(e.contains("trailing slash"), "{e}");
        assert!(parse_origin("https://").is_err());
    }
}
