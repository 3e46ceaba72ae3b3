//! Binding and running the gRPC server. `bind` is split from `run` so tests and `main` share one
//! path: tests bind `127.0.0.1:0`, read the port, then run.

use std::{future::Future, net::SocketAddr};

use std::sync::Arc;
use tokio::net::TcpListener;

use tokio_stream::StreamExt;
use tonic::transport::Server;

use super::{
    admin::AdminService,
    admission::{self, Slot, CONNECTION_LOGS},
    connection::StreamLimiter,
    health,
    service::BrokerService,
    wire::SubscribeRoute,
};
use crate::{
    broker::Broker,
    config::ServerConfig,
    metrics::{Metrics, CONTENT_TYPE},
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
    run_with_metrics(listener, None, broker, config, signal).await
}

/// [`run`], and with `metrics` also serves Prometheus metrics at `/metrics` on that listener
/// until shutdown begins.
///
/// # Errors
/// As [`run`].
pub async fn run_with_metrics(
    listener: TcpListener,
    metrics: Option<TcpListener>,
    broker: Broker,
    config: ServerConfig,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let shutdown = Shutdown::new();
    if let Some(metrics) = metrics {
        tokio::spawn(serve_metrics(metrics, broker.clone(), shutdown.token()));
    }
    let token = shutdown.token();
    tokio::spawn(broker.clone().run_reclaimer(shutdown.token()));

    let (health_reporter, health_service) = health::service(shutdown.token()).await;
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

    let streams = StreamLimiter::new(config.max_streams_per_connection);
    let service = BrokerServer::new(BrokerService::new(
        broker.clone(),
        shutdown.token(),
        streams.clone(),
    ))
    .max_decoding_message_size(config.decode_limit())
    .max_encoding_message_size(config.decode_limit());
    let admin = AdminServer::new(AdminService::new(broker.clone()));
    let broker_metrics = broker.clone();
    let closing = broker.clone();
    let service = SubscribeRoute::new(service, broker, shutdown.token(), streams);

    let incoming = admission::incoming(
        listener,
        config.admission,
        Arc::clone(broker_metrics.metrics()),
        shutdown.token(),
    )
    .map(move |conn| {
        let metrics = Arc::clone(broker_metrics.metrics());
        conn.map(|(stream, slot)| LoggedConn::new(stream, slot, metrics))
    });

    let serve = Server::builder()
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

/// Serves `GET /metrics` (OpenMetrics text) until shutdown begins.
async fn serve_metrics(listener: TcpListener, broker: Broker, mut shutdown: ShutdownToken) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(
            |axum::extract::State(broker): axum::extract::State<Broker>| async move {
                (
                    [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                    broker.metrics().render(
                        broker.address_count(),
                        broker.total_retained_bytes(),
                        broker.total_retained_messages(),
                    ),
                )
            },
        )
        .with_state(broker),
    );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "metrics listening");
    }
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "metrics endpoint failed");
    }
}

/// A client connection, logged when it opens and when it closes.
struct LoggedConn {
    inner: tokio::net::TcpStream,
    peer: String,
    metrics: Arc<Metrics>,
    /// Held while the connection is open: counts against `--max-connections`.
    _slot: Slot,
}

impl LoggedConn {
    fn new(inner: tokio::net::TcpStream, slot: Slot, metrics: Arc<Metrics>) -> Self {
        // Small messages must not wait for Nagle's algorithm.
        if let Err(e) = inner.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let peer = inner
            .peer_addr()
            .map_or_else(|_| "unknown".to_string(), |p| p.to_string());
        if CONNECTION_LOGS.allow("connection opened") {
            tracing::info!(peer = %peer, "connection opened");
        }
        metrics.connections.inc();
        Self {
            inner,
            peer,
            metrics,
            _slot: slot,
        }
    }
}

impl Drop for LoggedConn {
    fn drop(&mut self) {
        self.metrics.connections.dec();
        if CONNECTION_LOGS.allow("connection closed") {
            tracing::info!(peer = %self.peer, "connection closed");
        }
    }
}

impl tonic::transport::server::Connected for LoggedConn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl tokio::io::AsyncRead for LoggedConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LoggedConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
