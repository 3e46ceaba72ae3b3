//! Validated configuration. No clap types past this module: `cli` builds these structs and
//! everything else reads them.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

/// One mebibyte, in bytes.
pub const MIB: usize = 1024 * 1024;

/// The hard ceiling for `--max-message-bytes` (64 MiB).
pub const MAX_MESSAGE_BYTES_CEILING: usize = 64 * MIB;

/// Bytes charged per retained message on top of its payload and headers, for the broker's own
/// bookkeeping (message struct, sequence, timestamp, queue entries). Without it, empty payloads
/// would be free and the retention byte bounds would not bound memory.
pub const MESSAGE_OVERHEAD_BYTES: usize = 128;

/// Retention and size limits, in force for every address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted by Send, in bytes. Default 4 MiB, at most 64 MiB.
    pub max_message_bytes: usize,
    /// Most messages one address retains, consumed or not (retention is history). Default
    /// 65,536.
    pub retention_messages: usize,
    /// Most bytes one address retains (payload + headers + [`MESSAGE_OVERHEAD_BYTES`] per
    /// message). Default 64 MiB.
    pub retention_bytes: usize,
    /// Oldest a retained message may get before it is evicted; zero: no age bound (the
    /// default). Checked at the front of each window on every append and read, and swept
    /// every `idle_address / 2` (at most every second).
    pub retention_age: Duration,
    /// How long a Send's `message_id` is remembered for deduplication (while its message is
    /// retained); zero turns deduplication off. Default 2 minutes (NATS JetStream's duplicate
    /// window).
    pub dedup_window: Duration,
    /// Most bytes retained across all addresses. Default 1 GiB. When a Send would exceed it, the
    /// oldest retained messages broker-wide are evicted first.
    pub max_retained_bytes: usize,
    /// How long an address with nothing retained, no subscriber and no waiting Recv stays before
    /// it is reclaimed. Default 10 s.
    pub idle_address: Duration,
    /// Most addresses the broker holds; creating one more is refused. Default 1,000,000.
    pub max_addresses: usize,
    /// Most Subscribe streams one address may have open. Default 10,000.
    pub max_subscribers_per_address: usize,
    /// Most named consumer groups one address holds (the default group is not counted);
    /// creating one more (CreateGroup, or a Recv or Subscribe naming a new group) is refused
    /// with `RESOURCE_EXHAUSTED`. Default 1,000 (each group holds ~600 bytes plus its leases).
    pub max_groups_per_address: usize,
    /// How long a group created by a read (not by CreateGroup) may go unread before it is
    /// removed, position and all, like Kafka's `offsets.retention.minutes` (7 days) or a
    /// Google Pub/Sub subscription's expiration policy; a later read creates it again at the
    /// end. Zero: never. Default 7 days.
    pub idle_group: Duration,
    /// Most bytes of messages readers hold broker-wide outside retention's accounting: read
    /// for fan-out subscribers and not yet handed to their streams, and read ahead by
    /// SendStreams of their durable responses (see `broker::read_budget`). Readers wait
    /// while it is spent. Default 256 MiB; at least the largest gRPC message.
    pub max_read_buffer_bytes: usize,
}

impl Limits {
    /// The largest gRPC message the broker decodes or encodes, in bytes:
    /// `max_message_bytes` plus room for headers, the address and framing (96 KiB). Also the
    /// ceiling of a Recv's `max_bytes`.
    pub fn grpc_message_bytes(&self) -> usize {
        self.max_message_bytes + crate::validate::MAX_HEADER_BYTES * 2 + 64 * 1024
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * MIB,
            retention_messages: 65_536,
            retention_bytes: 64 * MIB,
            retention_age: Duration::ZERO,
            dedup_window: Duration::from_secs(120),
            max_retained_bytes: 1024 * MIB,
            idle_address: Duration::from_secs(10),
            max_addresses: 1_000_000,
            max_subscribers_per_address: 10_000,
            max_groups_per_address: 1_000,
            idle_group: Duration::from_secs(7 * 24 * 3600),
            max_read_buffer_bytes: 256 * MIB,
        }
    }
}

impl Limits {
    /// Checks the limits against each other and their ranges.
    ///
    /// # Errors
    /// A message naming the flag and the allowed range.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_bytes > MAX_MESSAGE_BYTES_CEILING {
            return Err(format!(
                "--max-message-bytes: {} is above the ceiling of {MAX_MESSAGE_BYTES_CEILING} bytes (64 MiB)",
                self.max_message_bytes
            ));
        }
        if self.retention_messages == 0 {
            return Err("--retention-messages: must be at least 1".into());
        }
        if self.retention_bytes < self.max_message_bytes {
            return Err(format!(
                "--retention-bytes: {} is below --max-message-bytes ({}); the largest message must fit",
                self.retention_bytes, self.max_message_bytes
            ));
        }
        if self.max_read_buffer_bytes < self.grpc_message_bytes() {
            return Err(format!(
                "--max-read-buffer-bytes: {} is below the largest message with its headers ({} bytes, from --max-message-bytes)",
                self.max_read_buffer_bytes,
                self.grpc_message_bytes()
            ));
        }
        if self.max_retained_bytes < self.retention_bytes {
            return Err(format!(
                "--max-retained-bytes: {} is below --retention-bytes ({})",
                self.max_retained_bytes, self.retention_bytes
            ));
        }
        Ok(())
    }
}

/// Where TLS material comes from (`--tls-cert`, `--tls-key`, `--tls-client-ca`,
/// `--tls-client-auth`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that client certificates must chain to; `None`: no client certificates.
    pub client_ca: Option<PathBuf>,
    /// With a client CA: whether clients without a certificate may still connect (and then
    /// authenticate with a token), as browsers must.
    pub client_auth_optional: bool,
}

/// Authentication and TLS (see `grpc::auth`, `grpc::tls`); both off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// `--auth-file`: principals and their permissions (TOML).
    pub auth_file: Option<PathBuf>,
    /// `--tls-cert` and friends.
    pub tls: Option<TlsFiles>,
}

/// Connection admission (see `grpc::admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// Longest a new connection may take to send the HTTP/2 preface. Default 10 s.
    pub handshake_timeout: Duration,
    /// Most client connections open at once. Default 65,536 (NATS's default).
    pub max_connections: usize,
}

/// The HTTP listener's bounds (`--http-listen`: console, `/metrics`, gRPC-Web; see `grpc::web`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpListener {
    /// Most connections open at once on the HTTP listener (`--http-max-connections`); beyond
    /// it new ones are closed at once. Default [`HTTP_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// How long a connection may wait for (the whole header of) its next request before it is
    /// closed (`--http-idle-timeout-ms`): idle keep-alive sockets and silent ones. Default
    /// [`HTTP_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// Host names and IPs allowed in `Host` / `Origin` besides loopback and the listener's own
    /// address (`--http-allowed-hosts`).
    pub allowed_hosts: crate::grpc::hosts::AllowedHosts,
}

/// Default `--http-max-connections`: a console and a scraper need a handful (a browser opens
/// up to six per origin), so this leaves room for many operators and keeps the listener's file
/// descriptors a small part of the process's.
pub const HTTP_MAX_CONNECTIONS: usize = 256;
/// Default `--http-idle-timeout-ms` (hyper's own default header-read timeout).
pub const HTTP_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for HttpListener {
    fn default() -> Self {
        Self {
            max_connections: HTTP_MAX_CONNECTIONS,
            idle_timeout: HTTP_IDLE_TIMEOUT,
            allowed_hosts: crate::grpc::hosts::AllowedHosts::default(),
        }
    }
}

/// Everything `switchboard serve` needs besides the listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Retention and size limits.
    pub limits: Limits,
    /// How long shutdown waits for open calls to finish before the server stops anyway.
    pub shutdown_grace: Duration,
    /// Most long-lived streams (Subscribe, SendStream) one client connection may hold open.
    pub max_streams_per_connection: usize,
    /// How often an idle HTTP/2 connection is pinged.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection (and its subscribers) is dropped.
    pub keepalive_timeout: Duration,
    /// Handshake timeout and connection limit (see `grpc::admission`).
    pub admission: Admission,
    /// Authentication and TLS.
    pub security: Security,
    /// The disk engine's settings (`--data-dir`); `None`: the in-memory engine.
    pub storage: Option<crate::engine::disk::DiskConfig>,
    /// The Redis engine's settings (`--engine redis`); `None`: not on Redis.
    pub redis: Option<crate::engine::redis::RedisConfig>,
    /// Origins whose pages may call the gRPC port with gRPC-Web (`--cors-origin`, exact
    /// matches, see `grpc::web::parse_origin`); empty: none.
    pub cors_origins: Vec<http::HeaderValue>,
    /// The HTTP listener's connection limit, idle timeout and allowed hosts (the allowed hosts
    /// also bound the `Origin` of gRPC-Web calls on the gRPC port).
    pub http: HttpListener,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(5),
            max_streams_per_connection: 1_000,
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(10),
            admission: Admission {
                handshake_timeout: Duration::from_secs(10),
                max_connections: 65_536,
            },
            security: Security::default(),
            storage: None,
            redis: None,
            cors_origins: Vec::new(),
            http: HttpListener::default(),
        }
    }
}

impl ServerConfig {
    /// The largest gRPC request message decoded, in bytes: `--max-message-bytes` plus room for
    /// headers, the address and framing (96 KiB), so that a payload just over the limit is
    /// decoded and refused by our own check naming the field. A message declared larger is
    /// refused from its length prefix, unread (`grpc::frame_limit`), also with
    /// `RESOURCE_EXHAUSTED`. Also bounds a SendBatch request.
    pub fn decode_limit(&self) -> usize {
        self.limits.grpc_message_bytes()
    }
}

/// The default listen address.
pub fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}
