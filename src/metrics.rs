//! Prometheus metrics (prometheus-client), one registry per broker, served in
//! the OpenMetrics text format on `--metrics-listen` at `/metrics`.
//!
//! No metric has a per-address label: addresses are unbounded, so their figures live in the
//! `switchboard.v1.Admin` RPCs instead.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `switchboard_messages_sent_total` | counter | messages accepted by Send / SendStream |
//! | `switchboard_messages_delivered_total` | counter | messages handed to a subscriber or a Recv caller |
//! | `switchboard_messages_dropped_total` | counter | messages reported lost to consumers (`dropped`, `Dropped`) |
//! | `switchboard_messages_evicted_total` | counter | messages removed by a retention bound |
//! | `switchboard_messages_acked_total` | counter | messages acknowledged (groups with `ack_wait`) |
//! | `switchboard_messages_redelivered_total` | counter | deliveries after the first (lease expired, Nack, stream ended) |
//! | `switchboard_messages_dead_lettered_total` | counter | messages that reached `max_deliveries` |
//! | `switchboard_addresses` | gauge | addresses in the registry |
//! | `switchboard_subscribers` | gauge | open Subscribe streams |
//! | `switchboard_groups` | gauge | consumer groups, default groups included |
//! | `switchboard_retained_messages` / `_bytes` | gauge | what the retention windows hold |
//! | `switchboard_connections` | gauge | client connections open (admitted past the handshake) |
//! | `switchboard_connections_rejected_total{reason}` | counter | connections closed at admission: `max_connections`, `handshake_timeout`, `tls_handshake` on the gRPC port; `http_max_connections`, `http_handshake_timeout`, `http_tls_handshake` on the HTTP listener |
//! | `switchboard_http_requests_refused_total{reason}` | counter | requests refused for a foreign `Host` or `Origin` (DNS rebinding): `host`, `origin` |
//! | `switchboard_auth_failures_total{reason}` | counter | calls refused by authentication: `missing`, `unknown` credentials, `denied` Admin |
//! | `switchboard_rpcs_total{method,code}` | counter | RPCs answered, by gRPC status code (streams: at open) |
//! | `switchboard_streams_closed_total{method,code}` | counter | Subscribe and SendStream streams ended, by final status (`CANCELLED`: the client went away) |
//! | `switchboard_rpc_duration_seconds{method}` | histogram | time to answer (streams: to open) |

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, Histogram},
    },
    registry::Registry,
};

/// The RPC a figure is about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(missing_docs, reason = "the variants are the RPC names")]
pub enum Method {
    Send,
    SendStream,
    SendBatch,
    Recv,
    Subscribe,
    CreateGroup,
    DeleteGroup,
    Ack,
    Nack,
    ExtendLease,
    ListAddresses,
    GetAddress,
    DeleteAddress,
}

impl Method {
    /// Every method, in declaration order.
    pub const ALL: [Self; 13] = [
        Self::Send,
        Self::SendStream,
        Self::SendBatch,
        Self::Recv,
        Self::Subscribe,
        Self::CreateGroup,
        Self::DeleteGroup,
        Self::Ack,
        Self::Nack,
        Self::ExtendLease,
        Self::ListAddresses,
        Self::GetAddress,
        Self::DeleteAddress,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: Method,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: Method,
}

/// The broker's metrics. Counters are cheap atomics, updated on the request paths.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) sent: Counter,
    pub(crate) delivered: Counter,
    pub(crate) dropped: Counter,
    pub(crate) evicted: Counter,
    pub(crate) acked: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) subscribers: Gauge,
    pub(crate) groups: Gauge,
    /// Time of each fdatasync by the disk engine's flusher (one per address per flush round).
    pub(crate) fsync_seconds: Histogram,
    /// Bytes in the disk engine's files (segments and journals).
    pub(crate) disk_bytes: Gauge,
    /// Flush rounds that failed (write or fsync error).
    pub(crate) storage_errors: Counter,
    addresses: Gauge,
    retained_messages: Gauge,
    retained_bytes: Gauge,
    /// Bytes readers hold under `--max-read-buffer-bytes` (set at scrape time).
    pub(crate) read_buffer_bytes: Gauge,
    rpcs: Family<RpcLabels, Counter>,
    streams_closed: Family<RpcLabels, Counter>,
    pub(crate) connections: Gauge,
    connections_rejected: Family<ReasonLabels, Counter>,
    http_requests_refused: Family<ReasonLabels, Counter>,
    auth_failures: Family<ReasonLabels, Counter>,
    rpc_seconds: Family<MethodLabels, Histogram>,
    /// Per method (in [`Method::ALL`] order): its `OK` counter and its histogram, taken out of
    /// the families once so the common path does no label lookup.
    hot: Vec<(Counter, Histogram)>,
}

/// The canonical upper-case name of a gRPC status code (`INVALID_ARGUMENT`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let m = Self {
            sent: Counter::default(),
            delivered: Counter::default(),
            dropped: Counter::default(),
            evicted: Counter::default(),
            acked: Counter::default(),
            redelivered: Counter::default(),
            dead_lettered: Counter::default(),
            subscribers: Gauge::default(),
            groups: Gauge::default(),
            // 10 µs to ~80 s.
            fsync_seconds: Histogram::new(exponential_buckets(0.000_01, 2.0, 23)),
            disk_bytes: Gauge::default(),
            storage_errors: Counter::default(),
            addresses: Gauge::default(),
            retained_messages: Gauge::default(),
            retained_bytes: Gauge::default(),
            read_buffer_bytes: Gauge::default(),
            rpcs: Family::default(),
            streams_closed: Family::default(),
            connections: Gauge::default(),
            connections_rejected: Family::default(),
            http_requests_refused: Family::default(),
            auth_failures: Family::default(),
            rpc_seconds: Family::new_with_constructor(|| {
                // 50 µs to ~100 s.
                Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
            }),
            registry: Registry::default(),
            hot: Vec::new(),
        };
        registry.register(
            "messages_sent",
            "Messages accepted by Send and SendStream",
            m.sent.clone(),
        );
        registry.register(
            "messages_delivered",
            "Messages handed to a subscriber or a Recv caller",
            m.delivered.clone(),
        );
        registry.register(
            "messages_dropped",
            "Messages reported lost to consumers that fell behind retention",
            m.dropped.clone(),
        );
        registry.register(
            "messages_evicted",
            "Messages removed by a retention bound (count, bytes, or broker-wide bytes)",
            m.evicted.clone(),
        );
        registry.register(
            "messages_acked",
            "Messages acknowledged by consumers of groups with ack_wait",
            m.acked.clone(),
        );
        registry.register(
            "messages_redelivered",
            "Deliveries after the first: lease expired, Nack, or the holding stream ended",
            m.redelivered.clone(),
        );
        registry.register(
            "messages_dead_lettered",
            "Messages that reached max_deliveries (sent to the dead-letter address, or dropped)",
            m.dead_lettered.clone(),
        );
        registry.register(
            "fsync_duration_seconds",
            "Time of each fdatasync of the disk engine (group commit: one per address per flush)",
            m.fsync_seconds.clone(),
        );
        registry.register(
            "disk_bytes",
            "Bytes in the disk engine's segment and journal files",
            m.disk_bytes.clone(),
        );
        registry.register(
            "storage_errors",
            "Flushes of an address that failed with a write or fsync error (their Sends got UNAVAILABLE)",
            m.storage_errors.clone(),
        );
        registry.register(
            "addresses",
            "Addresses in the registry",
            m.addresses.clone(),
        );
        registry.register(
            "subscribers",
            "Open Subscribe streams",
            m.subscribers.clone(),
        );
        registry.register(
            "groups",
            "Consumer groups, default groups included",
            m.groups.clone(),
        );
        registry.register(
            "retained_messages",
            "Messages held by retention windows",
            m.retained_messages.clone(),
        );
        registry.register(
            "retained_bytes",
            "Bytes held by retention windows (payload + headers + 128 per message)",
            m.retained_bytes.clone(),
        );
        registry.register(
            "read_buffer_bytes",
            "Bytes of messages readers hold beyond retention (read for subscribers, read ahead by SendStreams), bounded by --max-read-buffer-bytes",
            m.read_buffer_bytes.clone(),
        );
        registry.register(
            "rpcs",
            "RPCs answered, by method and gRPC status code",
            m.rpcs.clone(),
        );
        registry.register(
            "connections",
            "Client connections open (past the HTTP/2 handshake)",
            m.connections.clone(),
        );
        registry.register(
            "connections_rejected",
            "Connections closed at admission, by reason (max_connections, handshake_timeout, \
             tls_handshake; http_ prefixed on the HTTP listener)",
            m.connections_rejected.clone(),
        );
        registry.register(
            "http_requests_refused",
            "Requests refused for a foreign Host or Origin (DNS rebinding), by reason (host, origin)",
            m.http_requests_refused.clone(),
        );
        registry.register(
            "auth_failures",
            "Calls refused by authentication or the Admin permission, by reason (missing, unknown, denied)",
            m.auth_failures.clone(),
        );
        registry.register(
            "streams_closed",
            "Subscribe and SendStream streams ended, by method and final gRPC status code",
            m.streams_closed.clone(),
        );
        registry.register(
            "rpc_duration_seconds",
            "Time to answer an RPC (streams: until the stream opened)",
            m.rpc_seconds.clone(),
        );
        let hot = Method::ALL
            .iter()
            .map(|&method| {
                let ok = m
                    .rpcs
                    .get_or_create(&RpcLabels { method, code: "OK" })
                    .clone();
                let seconds = m
                    .rpc_seconds
                    .get_or_create(&MethodLabels { method })
                    .clone();
                (ok, seconds)
            })
            .collect();
        Self { registry, hot, ..m }
    }

    /// Records one call refused by authentication (`missing`, `unknown`) or by the Admin
    /// permission (`denied`).
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records one connection closed at admission (`max_connections`, `handshake_timeout`,
    /// `tls_handshake`; `http_`-prefixed on the HTTP listener).
    pub fn connection_rejected(&self, reason: &'static str) {
        self.connections_rejected
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records one request refused for a foreign `Host` or `Origin` (`host`, `origin`).
    pub fn http_request_refused(&self, reason: &'static str) {
        self.http_requests_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Records one stream (Subscribe, SendStream) that ended with `code` (`Cancelled` when the
    /// client went away first).
    pub fn observe_stream_closed(&self, method: Method, code: tonic::Code) {
        self.streams_closed
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
    }

    /// Records one answered RPC.
    pub fn observe_rpc(&self, method: Method, code: tonic::Code, elapsed: Duration) {
        let hot = Method::ALL
            .iter()
            .position(|m| *m == method)
            .and_then(|i| self.hot.get(i));
        match hot {
            Some((ok, seconds)) => {
                if code == tonic::Code::Ok {
                    ok.inc();
                } else {
                    self.rpcs
                        .get_or_create(&RpcLabels {
                            method,
                            code: code_name(code),
                        })
                        .inc();
                }
                seconds.observe(elapsed.as_secs_f64());
            }
            None => {
                self.rpcs
                    .get_or_create(&RpcLabels {
                        method,
                        code: code_name(code),
                    })
                    .inc();
            }
        }
    }

    /// The OpenMetrics text of every metric, with the gauges set first from the figures given
    /// (addresses held, retained bytes, retained messages).
    pub fn render(
        &self,
        addresses: usize,
        retained_bytes: usize,
        retained_messages: usize,
    ) -> String {
        let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.addresses.set(gauge(addresses));
        self.retained_bytes.set(gauge(retained_bytes));
        self.retained_messages.set(gauge(retained_messages));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// The OpenMetrics content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
