//! Binding and running the gRPC server. `bind` is split from `run` so tests and `main` share one
//! path: tests bind `127.0.0.1:0`, read the port, then run.

use std::{future::Future, net::SocketAddr};

use std::sync::Arc;
use tokio::net::TcpListener;

use tokio_stream::StreamExt;
use tonic::transport::Server;
use tonic_web::GrpcWebLayer;

use super::{
    admin::AdminService,
    admission::{self, Io, Slot, CONNECTION_LOGS},
    auth::{Auth, AuthLayer, Authority},
    connection::StreamLimiter,
    health,
    hosts::HostGuard,
    service::BrokerService,
    tls::{PeerInfo, TlsState},
    web,
    wire::SubscribeRoute,
};
use crate::{
    broker::Broker,
    config::ServerConfig,
    metrics::Metrics,
    pb::{admin_server::AdminServer, broker_server::BrokerServer, FILE_DESCRIPTOR_SET},
    shutdown::{Shutdown, ShutdownToken},
};

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The transport failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The auth file or the TLS material could not be loaded.
    #[error("{0}")]
    Security(String),
    /// Reflection could not load the descriptor set.
    #[error("reflection: {0}")]
    Reflection(String),
}

/// Binds `addr` (port 0 picks a free port). Returns the listener and the address it got.
///
/// # Errors
/// [`ServerError::Bind`] when the address is taken or not local.
pub async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), ServerError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    Ok((listener, local))
}

/// Serves `broker` on `listener`, with gRPC health (`grpc.health.v1.Health`) and server
/// reflection (`grpc.reflection.v1` and `v1alpha`), until `signal` resolves, then shuts down
/// gracefully: reports `NOT_SERVING`, stops accepting, ends open Subscribe streams with `UNAVAILABLE`, returns waiting Recv calls empty,
/// lets unary calls in flight finish, and gives up on connections still open after
/// `config.shutdown_grace`.
///
/// # Errors
/// [`ServerError::Transport`] if the transport fails; [`ServerError::Reflection`] if the
/// embedded descriptor set is unreadable (a build defect).
pub async fn run(
    listener: TcpListener,
    broker: Broker,
    config: ServerConfig,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with_http(listener, None, broker, config, signal).await
}

/// [`run`], and with `http` also serves on that listener (`--http-listen`), until shutdown
/// begins: the web console at `/`, Prometheus metrics at `/metrics`, and the gRPC services
/// over gRPC-Web for the console's own calls (same origin, so no CORS is needed). It speaks
/// HTTP/1.1, with TLS when the gRPC port has it.
///
/// # Errors
/// As [`run`].
pub async fn run_with_http(
    listener: TcpListener,
    http: Option<TcpListener>,
    broker: Broker,
    config: ServerConfig,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let shutdown = Shutdown::new();
    let token = shutdown.token();
    tokio::spawn(broker.clone().run_reclaimer(shutdown.token()));

    let (health_reporter, health_service) = health::service(shutdown.token()).await;
    if broker.on_redis() {
        tokio::spawn(health::follow_redis(
            broker.clone(),
            health_reporter.clone(),
            shutdown.token(),
        ));
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;

    let authority = Authority::new(
        config
            .security
            .auth_file
            .as_deref()
            .map(Auth::load)
            .transpose()
            .map_err(ServerError::Security)?,
    );
    let tls = config
        .security
        .tls
        .clone()
        .map(TlsState::new)
        .transpose()
        .map_err(ServerError::Security)?;
    tokio::spawn(reload_on_sighup(
        config.security.auth_file.clone(),
        authority.clone(),
        tls.clone(),
        shutdown.token(),
    ));
    let streams = StreamLimiter::new(config.max_streams_per_connection);
    let service = BrokerServer::new(
        BrokerService::new(broker.clone(), shutdown.token(), streams.clone())
            .with_authority(authority.clone()),
    )
    .max_decoding_message_size(config.decode_limit())
    .max_encoding_message_size(config.decode_limit());
    let admin = AuthLayer::new(
        AdminServer::new(AdminService::new(broker.clone())),
        authority.clone(),
        Arc::clone(broker.metrics()),
        true,
    );
    let broker_metrics = broker.clone();
    let closing = broker.clone();
    let auth_metrics = Arc::clone(broker.metrics());
    let service = AuthLayer::new(
        SubscribeRoute::new(service, broker, shutdown.token(), streams)
            .with_authority(authority.clone())
            .with_decode_limit(config.decode_limit()),
        authority,
        auth_metrics,
        false,
    );

    if let Some(http) = http {
        let grpc_web = tonic::service::Routes::new(service.clone())
            .add_service(admin.clone())
            .add_service(health_service.clone())
            .prepare()
            .into_axum_router()
            .layer(GrpcWebLayer::new());
        let guard = HostGuard::http_listener(
            config.http.allowed_hosts.clone(),
            http.local_addr().ok(),
            Arc::clone(broker_metrics.metrics()),
        );
        tokio::spawn(web::serve(
            http,
            web::router(broker_metrics.clone(), grpc_web, guard),
            tls.clone()
                .map(|tls| (tls, config.admission.handshake_timeout)),
            config.http.clone(),
            Arc::clone(broker_metrics.metrics()),
            shutdown.token(),
        ));
    }
    // Browsers' gRPC-Web calls on this port carry an Origin: one naming a foreign host (a
    // DNS-rebinding page) is refused; see `grpc::hosts`.
    let origin_guard = HostGuard::grpc_port(
        config.http.allowed_hosts.clone(),
        listener.local_addr().ok(),
        config.cors_origins.clone(),
        Arc::clone(broker_metrics.metrics()),
    );

    let incoming = admission::incoming(
        listener,
        config.admission,
        tls,
        Arc::clone(broker_metrics.metrics()),
        shutdown.token(),
    )
    .map(move |conn| {
        let metrics = Arc::clone(broker_metrics.metrics());
        conn.map(|(io, slot)| LoggedConn::new(io, slot, metrics))
    });

    let serve = Server::builder()
        // gRPC-Web (browsers) over HTTP/1.1 as well as HTTP/2; CORS outermost, so preflight
        // requests are answered before authentication.
        .accept_http1(true)
        .layer(tower_layer::Stack::new(
            tower_layer::Stack::new(
                GrpcWebLayer::new(),
                // Only with --cors-origin: without origins there is nothing to allow, and the
                // layer would add `vary` headers to every response.
                tower::util::option_layer(
                    (!config.cors_origins.is_empty())
                        .then(|| web::cors_layer(&config.cors_origins)),
                ),
            ),
            // Outermost: a foreign Origin is refused before anything else answers.
            origin_guard,
        ))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        // Above our own per-connection stream limit, which answers with a clear status first;
        // the headroom is for unary calls.
        .max_concurrent_streams(
            u32::try_from(config.max_streams_per_connection.saturating_add(256))
                .unwrap_or(u32::MAX),
        )
        .add_service(service)
        .add_service(admin)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, async move {
            signal.await;
            // Health first, so watchers see NOT_SERVING before their streams end.
            health::set_not_serving(&health_reporter).await;
            closing.begin_shutdown();
            shutdown.trigger();
            tracing::info!("shutting down: streams ended, waiting for calls in flight");
        });

    let mut grace_token = token.clone();
    let grace = config.shutdown_grace;
    let deadline = async move {
        grace_token.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        r = serve => r?,
        () = deadline => tracing::warn!(grace_ms = grace.as_millis(), "shutdown grace period over; closing remaining connections"),
    }
    tracing::info!("switchboard stopped");
    Ok(())
}

/// Reloads the auth file and the TLS material on SIGHUP (open streams carry on; a reload that
/// fails keeps the old material and logs why).
async fn reload_on_sighup(
    auth_file: Option<std::path::PathBuf>,
    authority: Authority,
    tls: Option<TlsState>,
    mut shutdown: ShutdownToken,
) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP: no reloads");
            return;
        };
        loop {
            tokio::select! {
                r = hup.recv() => if r.is_none() { return },
                () = shutdown.cancelled() => return,
            }
            if let Some(path) = &auth_file {
                match Auth::load(path) {
                    Ok(auth) => {
                        authority.replace(auth);
                        tracing::info!(path = %path.display(), "auth file reloaded");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "auth file reload failed; the old one stays in force")
                    }
                }
            }
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS reload failed; the old certificate stays in force")
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (auth_file, authority, tls);
        shutdown.cancelled().await;
    }
}

/// The client address of a request, from its connection's [`PeerInfo`].
pub(crate) fn peer_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions.get::<PeerInfo>().and_then(|p| p.remote)
}

/// A client connection, logged when it opens and when it closes.
struct LoggedConn {
    io: Io,
    info: PeerInfo,
    metrics: Arc<Metrics>,
    /// Held while the connection is open: counts against `--max-connections`.
    _slot: Slot,
}

impl LoggedConn {
    fn new(io: Io, slot: Slot, metrics: Arc<Metrics>) -> Self {
        // Small messages must not wait for Nagle's algorithm.
        if let Err(e) = io.tcp().set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let remote = io.tcp().peer_addr().ok();
        let subject = match &io {
            Io::Tls(_, subject) => subject.clone(),
            Io::Plain(_) => None,
        };
        if CONNECTION_LOGS.allow("connection opened") {
            let peer = remote.map_or_else(|| "unknown".to_string(), |p| p.to_string());
            tracing::info!(peer = %peer, tls = matches!(io, Io::Tls(..)), "connection opened");
        }
        metrics.connections.inc();
        Self {
            io,
            info: PeerInfo { remote, subject },
            metrics,
            _slot: slot,
        }
    }
}

impl Drop for LoggedConn {
    fn drop(&mut self) {
        self.metrics.connections.dec();
        if CONNECTION_LOGS.allow("connection closed") {
            let peer = self
                .info
                .remote
                .map_or_else(|| "unknown".to_string(), |p| p.to_string());
            tracing::info!(peer = %peer, "connection closed");
        }
    }
}

impl tonic::transport::server::Connected for LoggedConn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

macro_rules! io_dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.io {
            Io::Plain($s) => {
                let $s = std::pin::Pin::new($s);
                $e
            }
            Io::Tls($s, _) => {
                let $s = std::pin::Pin::new($s.as_mut());
                $e
            }
        }
    };
}

impl tokio::io::AsyncRead for LoggedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(self, s => s.poll_read(cx, buf))
    }
}

impl tokio::io::AsyncWrite for LoggedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        io_dispatch!(self, s => s.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        io_dispatch!(self, s => s.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(self, s => s.poll_flush(cx))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        io_dispatch!(self, s => s.poll_shutdown(cx))
    }
}
