//! Command-line interface (clap derive). Every flag has a default, a unit in its name where it
//! has one, and a `SWITCHBOARD_*` environment variable. Nothing past this module sees clap types.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::config::{Limits, ServerConfig};

/// switchboard: a gRPC pub/sub message broker.
#[derive(Debug, Parser)]
#[command(name = "switchboard", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the broker (service switchboard.v1.Broker) until SIGINT or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Send one message to ADDRESS and print its sequence.
    Send(SendArgs),
    /// Pull messages from a consumer group of ADDRESS and print them.
    ///
    /// Exit code 0 when messages came, 3 when the wait ended with none, 1 on an error.
    Recv(RecvArgs),
    /// Print messages sent to ADDRESS as they arrive, until Ctrl-C or --count messages.
    Subscribe(SubscribeArgs),
    /// List addresses (optionally those starting with PREFIX) with what they retain.
    Addresses(AddressesArgs),
    /// Show one address and each consumer group's lag and dropped count.
    Inspect(InspectArgs),
    /// Create or delete a named consumer group.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Make a bearer token: prints a fresh random token (256 bits, URL-safe) on its first line,
    /// then the `[[principal]]` entry (with its SHA-256) to paste into the --auth-file.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Acknowledge messages of a group with an ack wait; prints the sequences that were not
    /// pending (`not pending: ...`), if any.
    Ack(SettleArgs),
    /// Give messages of a group with an ack wait back for redelivery (counts as an attempt).
    Nack(NackArgs),
}

impl Command {
    /// The client flags of a client command; `None` for `serve` and `token`.
    pub fn client(&self) -> Option<&ClientArgs> {
        match self {
            Self::Serve(_) | Self::Token(_) => None,
            Self::Send(a) => Some(&a.client),
            Self::Recv(a) => Some(&a.client),
            Self::Subscribe(a) => Some(&a.client),
            Self::Addresses(a) => Some(&a.client),
            Self::Inspect(a) => Some(&a.client),
            Self::Group(GroupCommand::Create(a)) => Some(&a.client),
            Self::Group(GroupCommand::Delete(a)) => Some(&a.client),
            Self::Ack(a) => Some(&a.client),
            Self::Nack(a) => Some(&a.settle.client),
        }
    }
}

/// `switchboard token ...`.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// A new token for principal NAME.
    New {
        /// The principal's name.
        name: String,
    },
}

/// `switchboard group ...`.
#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create GROUP on ADDRESS at a start position (default: only messages sent from now on);
    /// prints `created NEXT` or `exists NEXT` (NEXT: the sequence it hands out next).
    Create(GroupCreateArgs),
    /// Delete GROUP of ADDRESS: its position is forgotten, its streams and waiting Recv calls
    /// end with NOT_FOUND.
    Delete(GroupDeleteArgs),
}

/// Flags of `switchboard group create`.
#[derive(Debug, Args)]
pub struct GroupCreateArgs {
    /// The address.
    pub address: String,
    /// The group (1-255 bytes).
    pub group: String,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub start: StartArgs,

    /// Acknowledged delivery: lease every message handed out for this long (`30s`, `5m`;
    /// 1s-12h) and hand it out again unless acknowledged. Without it: at most once.
    #[arg(long, value_name = "DURATION", value_parser = parse_age)]
    pub ack_wait: Option<Duration>,

    /// With --ack-wait: deliveries of one message before it is dead-lettered (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub max_deliveries: u32,

    /// With --max-deliveries: the address that receives dead-lettered messages (without it they
    /// are dropped and counted).
    #[arg(long = "dead-letter", value_name = "ADDRESS")]
    pub dead_letter: Option<String>,

    /// With --ack-wait: most messages handed out and not acknowledged (0: 1,000).
    #[arg(long, default_value_t = 0)]
    pub max_ack_pending: u32,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Flags of `switchboard group delete`.
#[derive(Debug, Args)]
pub struct GroupDeleteArgs {
    /// The address.
    pub address: String,
    /// The group.
    pub group: String,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Where a stream or a group starts (default: only messages sent from now on).
#[derive(Debug, Args, Clone, Copy)]
pub struct StartArgs {
    /// Start at this sequence (replay from the retained history; older than what is retained:
    /// a `dropped N` line first says how many are gone).
    #[arg(long = "from", value_name = "SEQ", value_parser = clap::value_parser!(u64).range(1..))]
    pub from: Option<u64>,

    /// Start at the first retained message sent at or after this time: a duration ago (`10m`,
    /// `1h`) or an RFC 3339 time (`2026-12-01T10:00:00Z`).
    #[arg(long, value_name = "AGO|RFC3339", conflicts_with = "from", value_parser = parse_since)]
    pub since: Option<std::time::SystemTime>,
}

impl StartArgs {
    /// As the request fields `start_sequence` and `start_time`.
    pub fn fields(self) -> (u64, Option<prost_types::Timestamp>) {
        (
            self.from.unwrap_or(0),
            self.since.map(prost_types::Timestamp::from),
        )
    }
}

fn parse_since(s: &str) -> Result<std::time::SystemTime, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t);
    }
    let ago = humantime::parse_duration(s)
        .map_err(|_| format!("{s:?} is neither a duration (10m, 1h) nor an RFC 3339 time"))?;
    std::time::SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| format!("{s:?} reaches before the clock's range"))
}

/// Flags of `switchboard addresses`.
#[derive(Debug, Args)]
pub struct AddressesArgs {
    /// Only addresses starting with this.
    #[arg(default_value = "")]
    pub prefix: String,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Flags of `switchboard inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The address to show.
    pub address: String,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Whether client certificates are required (`--tls-client-auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Every client presents a certificate signed by --tls-client-ca.
    Required,
    /// Clients may connect without one and authenticate with a token.
    Optional,
}

/// Where messages and consumer groups live (`--engine`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// In this process's memory: fastest, lost on exit (the default without --data-dir).
    Memory,
    /// Segment files in --data-dir, fsynced: survives crashes (the default with --data-dir).
    Disk,
    /// Streams in Redis at --redis-url: any number of nodes on one Redis serve the same
    /// addresses, groups and replay.
    Redis,
}

/// When the disk engine fsyncs (`--fsync`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Fsync {
    /// Before a Send (or an Ack, a group change) is answered: nothing acknowledged is ever
    /// lost, even to a power cut. Concurrent Sends share fsyncs (group commit).
    Always,
    /// Every --fsync-interval-ms: faster, but a machine crash or power cut can lose the
    /// last interval of acknowledged writes (a broker crash alone loses nothing).
    Interval,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Flags shared by the client commands.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The broker to talk to: `HOST:PORT`, `http://HOST:PORT` (plaintext) or
    /// `https://HOST:PORT` (TLS). A bare HOST:PORT is plaintext, or TLS when --ca-cert or
    /// --cert is given.
    #[arg(
        long,
        env = "SWITCHBOARD_SERVER",
        value_name = "[SCHEME://]HOST:PORT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,

    /// Print one JSON object per line (address, sequence, sent_at as RFC 3339, headers, payload
    /// in base64) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Bearer token sent as `authorization: Bearer TOKEN` (brokers with --auth-file).
    #[arg(long, env = "SWITCHBOARD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// PEM CA bundle to verify a TLS broker with: the CA that signed its certificate (no CA is
    /// trusted by default, so TLS needs it). Makes a bare --server HOST:PORT use TLS.
    #[arg(long, env = "SWITCHBOARD_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<std::path::PathBuf>,

    /// PEM client certificate for mTLS (with --key). Makes a bare --server HOST:PORT use TLS.
    #[arg(long, env = "SWITCHBOARD_CERT", value_name = "PATH", requires = "key")]
    pub cert: Option<std::path::PathBuf>,

    /// PEM private key of --cert.
    #[arg(long, env = "SWITCHBOARD_KEY", value_name = "PATH", requires = "cert")]
    pub key: Option<std::path::PathBuf>,
}

/// Flags of `switchboard send`.
#[derive(Debug, Args)]
pub struct SendArgs {
    /// The address to send to.
    pub address: String,

    /// The payload; `-` reads it from stdin (binary-safe); omitted sends an empty payload.
    pub payload: Option<String>,

    /// A header, `KEY=VALUE`; repeat for more.
    #[arg(long = "header", value_name = "KEY=VALUE", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,

    /// Deduplicate: a Send with the same id to the same address within the broker's dedup
    /// window stores nothing and prints the first Send's sequence followed by `duplicate`.
    #[arg(long, value_name = "ID", conflicts_with = "lines")]
    pub message_id: Option<String>,

    /// With PAYLOAD `-`: send each line of stdin as one message (without its newline), in
    /// batches (SendBatch, up to 1,000 lines or 64 KiB of the lines ready at once); prints one
    /// sequence per line. A refused line is reported on stderr and skipped.
    #[arg(long)]
    pub lines: bool,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Flags of `switchboard recv`.
#[derive(Debug, Args)]
pub struct RecvArgs {
    /// The address to pull from.
    pub address: String,

    /// Consumer group; empty is the address's default group.
    #[arg(long, default_value = "")]
    pub group: String,

    /// Most messages to take (1-1000).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub max: u32,

    /// How long to wait when nothing is waiting: `500ms`, `5s`, `1m`; at most 60s.
    #[arg(long, default_value = "0s", value_parser = parse_wait)]
    pub wait: Duration,

    /// Acknowledge the messages after printing them (groups with an ack wait). Without it a
    /// message of such a group is delivered again once its lease expires.
    #[arg(long)]
    pub ack: bool,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Flags of `switchboard ack` and `switchboard nack`.
#[derive(Debug, Args)]
pub struct SettleArgs {
    /// The address.
    pub address: String,
    /// The group (one created with an ack wait).
    pub group: String,
    /// Sequences (1 to 1,000).
    #[arg(required = true, num_args = 1..=1000)]
    pub sequences: Vec<u64>,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

/// Flags of `switchboard nack`.
#[derive(Debug, Args)]
pub struct NackArgs {
    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub settle: SettleArgs,

    /// Deliver them again after this long (`0s`: at once; at most 12h).
    #[arg(long, default_value = "0s", value_parser = parse_age)]
    pub delay: Duration,
}

/// Flags of `switchboard subscribe`.
#[derive(Debug, Args)]
pub struct SubscribeArgs {
    /// The address to watch, or a pattern (fan-out only): tokens split by `.`, `*` matches one
    /// token, `>` one or more trailing tokens (`'orders.*.created'`, `'metrics.>'`; quote it in
    /// the shell).
    pub address: String,

    /// Join this consumer group (share its messages) instead of getting every message.
    #[arg(long, default_value = "")]
    pub group: String,

    /// Stop after this many messages.
    #[arg(long)]
    pub count: Option<u64>,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub start: StartArgs,

    #[command(flatten)]
    #[allow(missing_docs, reason = "flattened; its fields are documented")]
    pub client: ClientArgs,
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

fn parse_age(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (try 0, 30s, 10m, 1h, 7d)"))
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| format!("{s:?}: {e} (try 500ms, 5s, 1m)"))?;
    if d > crate::validate::MAX_WAIT {
        return Err(format!("{s:?} is longer than the server's limit of 60s"));
    }
    Ok(d)
}

/// Flags of `switchboard serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Largest payload a Send accepts, in bytes (at most 67108864 = 64 MiB).
    #[arg(long, env = "SWITCHBOARD_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Most messages one address retains. Retention is history: a message stays, consumed or
    /// not, until a bound removes it (the oldest leaves when a new one would exceed this).
    #[arg(long, env = "SWITCHBOARD_RETENTION_MESSAGES", default_value_t = 65_536)]
    pub retention_messages: usize,

    /// Most bytes one address retains (payload + headers + 128 bytes per message).
    #[arg(long, env = "SWITCHBOARD_RETENTION_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub retention_bytes: usize,

    /// Oldest a retained message may get before it is evicted: `30s`, `10m`, `1h`, `7d`; `0`
    /// (the default) sets no age bound.
    #[arg(long, env = "SWITCHBOARD_RETENTION_AGE", default_value = "0", value_parser = parse_age)]
    pub retention_age: Duration,

    /// How long a Send's `message_id` is remembered to drop duplicates (`2m`; `0` turns
    /// deduplication off). An id is remembered only while its message is retained, so its
    /// memory (the id's bytes plus ~100 bytes) is bounded by retention.
    #[arg(long, env = "SWITCHBOARD_DEDUP_WINDOW", default_value = "2m", value_parser = parse_age)]
    pub dedup_window: Duration,

    /// Most bytes retained across all addresses; past it the oldest messages broker-wide are
    /// evicted first. The default bounds fill with history, so a busy broker's memory grows
    /// to about this plus ~64 MiB of runtime overhead: size it to the memory you give the
    /// broker.
    #[arg(long, env = "SWITCHBOARD_MAX_RETAINED_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub max_retained_bytes: usize,

    /// Milliseconds an address with nothing retained, no subscriber and no waiting Recv stays
    /// before it is reclaimed.
    #[arg(long, env = "SWITCHBOARD_IDLE_ADDRESS_MS", default_value_t = 10_000)]
    pub idle_address_ms: u64,

    /// Most addresses the broker holds; a request that would create one more gets
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "SWITCHBOARD_MAX_ADDRESSES", default_value_t = 1_000_000)]
    pub max_addresses: usize,

    /// Most Subscribe streams one address may have open.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_SUBSCRIBERS_PER_ADDRESS",
        default_value_t = 10_000
    )]
    pub max_subscribers_per_address: usize,

    /// Most named consumer groups one address holds; CreateGroup, or a Recv or Subscribe
    /// naming a new group, past it gets RESOURCE_EXHAUSTED. Each group holds ~600 bytes plus
    /// its leases.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_GROUPS_PER_ADDRESS",
        default_value_t = 1_000
    )]
    pub max_groups_per_address: usize,

    /// How long a group made by its first Recv or Subscribe (not by CreateGroup) may go
    /// unread, with no group stream or waiting Recv on its address, before it is removed with
    /// its position (Kafka's offsets retention); a later read creates it again at the end.
    /// `1h`, `7d`; `0` keeps such groups for ever.
    #[arg(long, env = "SWITCHBOARD_IDLE_GROUP", default_value = "7d", value_parser = parse_age)]
    pub idle_group: Duration,

    /// Most bytes of messages readers hold broker-wide beyond what retention counts: messages
    /// read for fan-out subscribers (a replay from disk, or messages since evicted) and not
    /// yet handed to their streams, and SendStream requests read ahead of their durable
    /// responses. Readers wait while it is spent (backpressure). At least the largest
    /// message plus 96 KiB.
    #[arg(long, env = "SWITCHBOARD_MAX_READ_BUFFER_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub max_read_buffer_bytes: usize,

    /// Most long-lived streams (Subscribe, SendStream) one client connection may hold open.
    #[arg(
        long,
        env = "SWITCHBOARD_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 1_000
    )]
    pub max_streams_per_connection: usize,

    /// Milliseconds between HTTP/2 keepalive pings on a connection.
    #[arg(
        long,
        env = "SWITCHBOARD_KEEPALIVE_INTERVAL_MS",
        default_value_t = 20_000
    )]
    pub keepalive_interval_ms: u64,

    /// Milliseconds a keepalive ping may go unanswered before the connection is closed and its
    /// subscribers freed (detects vanished peers and half-open TCP).
    #[arg(
        long,
        env = "SWITCHBOARD_KEEPALIVE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub keepalive_timeout_ms: u64,

    /// Milliseconds a new connection may take to send the HTTP/2 preface (the TLS handshake
    /// too, once TLS is on) before it is closed; silent sockets otherwise stay open forever.
    /// Also bounds TLS handshakes on the HTTP listener.
    #[arg(
        long,
        env = "SWITCHBOARD_HANDSHAKE_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub handshake_timeout_ms: u64,

    /// Most client connections open at once on the gRPC port; beyond it new connections are
    /// closed at once (counted in switchboard_connections_rejected_total) and the open ones
    /// keep working. Each is a file descriptor: at start the broker raises its open-file soft
    /// limit to the hard limit and warns if this, plus --http-max-connections, plus 1,024 for
    /// files, exceeds it.
    #[arg(long, env = "SWITCHBOARD_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,

    /// Principals and their permissions (TOML; see README "Security"). Without it every client
    /// may do everything. Reloaded on SIGHUP.
    #[arg(long, env = "SWITCHBOARD_AUTH_FILE", value_name = "PATH")]
    pub auth_file: Option<std::path::PathBuf>,

    /// Serve TLS with this PEM certificate chain (with --tls-key). Reloaded on SIGHUP.
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// Require client certificates signed by this PEM CA bundle (mTLS).
    #[arg(
        long,
        env = "SWITCHBOARD_TLS_CLIENT_CA",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// With --tls-client-ca: `required` (default), or `optional` so clients without a
    /// certificate (browsers) may connect and authenticate with a token.
    #[arg(long, env = "SWITCHBOARD_TLS_CLIENT_AUTH", value_enum, default_value_t = ClientAuth::Required)]
    pub tls_client_auth: ClientAuth,

    /// Serve HTTP on ADDR (off unless given): the web console at http://ADDR/, Prometheus
    /// metrics at http://ADDR/metrics, and the gRPC services over gRPC-Web for the console's
    /// own calls (HTTPS with the broker's certificate when --tls-cert is set). Bind it to
    /// loopback or put it behind --auth-file: the console can send, read and delete. It
    /// answers only the hosts --http-allowed-hosts allows (loopback and its own address by
    /// default), within --http-max-connections and --http-idle-timeout-ms.
    #[arg(long, env = "SWITCHBOARD_HTTP_LISTEN", value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,

    /// The older name of --http-listen, still accepted (the same listener: console, metrics).
    #[arg(
        long,
        env = "SWITCHBOARD_METRICS_LISTEN",
        value_name = "ADDR",
        conflicts_with = "http_listen"
    )]
    pub metrics_listen: Option<SocketAddr>,

    /// Host names or IPs the HTTP listener answers to besides `localhost`, loopback IPs and its
    /// own bound address (any IP when bound to 0.0.0.0 or ::), with any port: a request whose
    /// `Host` names another host gets 421, one whose `Origin` does gets 403, so a page on a
    /// DNS-rebinding domain cannot use the console, /metrics or gRPC-Web through a browser.
    /// Also bounds the `Origin` of gRPC-Web calls on the gRPC port (beside --cors-origin).
    /// Repeatable, or comma-separated in the environment variable; `*` allows any host.
    #[arg(
        long = "http-allowed-hosts",
        env = "SWITCHBOARD_HTTP_ALLOWED_HOSTS",
        value_name = "HOST",
        value_delimiter = ','
    )]
    pub http_allowed_hosts: Vec<String>,

    /// Most connections open at once on the HTTP listener (console, metrics, gRPC-Web);
    /// beyond it new connections are closed at once (counted in
    /// switchboard_connections_rejected_total{reason="http_max_connections"}). Connections
    /// still in their TLS handshake count.
    #[arg(
        long,
        env = "SWITCHBOARD_HTTP_MAX_CONNECTIONS",
        default_value_t = crate::config::HTTP_MAX_CONNECTIONS
    )]
    pub http_max_connections: usize,

    /// Milliseconds an HTTP listener connection may wait for its next request (its whole
    /// header) before it is closed: idle keep-alive sockets and silent ones (1 to 3600000).
    /// A request being answered (a live tail's stream) is not cut.
    #[arg(
        long,
        env = "SWITCHBOARD_HTTP_IDLE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub http_idle_timeout_ms: u64,

    /// Let web pages from ORIGIN (`https://app.example.com`, `http://127.0.0.1:3000`: scheme,
    /// host and port, no path) call the gRPC port with gRPC-Web. Repeatable, or comma-separated
    /// in the environment variable; none by default (the console on --http-listen needs none).
    #[arg(
        long = "cors-origin",
        env = "SWITCHBOARD_CORS_ORIGINS",
        value_name = "ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,

    /// Log format on stderr (`RUST_LOG` sets the level; default `switchboard=info`).
    #[arg(long, env = "SWITCHBOARD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Milliseconds shutdown waits for open calls to finish before closing connections.
    #[arg(long, env = "SWITCHBOARD_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    pub shutdown_grace_ms: u64,

    /// Keep messages and consumer groups in this directory (the disk engine): everything
    /// acknowledged survives a restart, a crash or a power cut. Without it the broker keeps
    /// everything in memory and loses it on exit. One broker per directory (a LOCK file).
    #[arg(long, env = "SWITCHBOARD_DATA_DIR", value_name = "PATH")]
    pub data_dir: Option<std::path::PathBuf>,

    /// The storage engine: `memory`, `disk` (needs --data-dir) or `redis` (uses --redis-url).
    /// Default: `disk` with --data-dir, else `memory`.
    #[arg(long, env = "SWITCHBOARD_ENGINE", value_enum)]
    pub engine: Option<EngineKind>,

    /// With --engine redis: where Redis is, `redis://[user:password@]host:port[/db]` or
    /// `rediss://` for TLS. With --redis-cluster, the seed nodes, comma-separated.
    #[arg(
        long,
        env = "SWITCHBOARD_REDIS_URL",
        value_delimiter = ',',
        default_value = "redis://127.0.0.1:6379"
    )]
    pub redis_url: Vec<String>,

    /// With --engine redis: Redis is a Redis Cluster (every key of an address shares a hash
    /// slot, so each operation stays on one node).
    #[arg(long, env = "SWITCHBOARD_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// With --engine redis: the prefix of every key this broker uses; brokers with different
    /// namespaces share one Redis as separate brokers (1-64 bytes of letters, digits, `-`,
    /// `_`, `.`).
    #[arg(long, env = "SWITCHBOARD_REDIS_NAMESPACE", default_value = "sb")]
    pub redis_namespace: String,

    /// With --engine redis and a `rediss://` URL: PEM CA certificate(s) to verify Redis's
    /// certificate with (default: the system's trust store).
    #[arg(long, env = "SWITCHBOARD_REDIS_CA_CERT", value_name = "PATH")]
    pub redis_ca_cert: Option<std::path::PathBuf>,

    /// With --data-dir: `always` (default) fsyncs before answering; `interval` fsyncs every
    /// --fsync-interval-ms and can lose that much to a power cut.
    #[arg(long, env = "SWITCHBOARD_FSYNC", value_enum, default_value_t = Fsync::Always, requires = "data_dir")]
    pub fsync: Fsync,

    /// With --fsync interval: milliseconds between fsyncs (1 to 60,000).
    #[arg(long, env = "SWITCHBOARD_FSYNC_INTERVAL_MS", default_value_t = 100)]
    pub fsync_interval_ms: u64,

    /// With --data-dir: bytes after which an address starts a new segment file; retention
    /// deletes whole segments (1 MiB to 1 GiB).
    #[arg(long, env = "SWITCHBOARD_SEGMENT_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub segment_bytes: u64,

    /// With --data-dir: bytes of retained messages kept in memory with their payload and
    /// headers (payload + headers + 128 per message); older messages are read back from their
    /// segments when a replay, a lagging subscriber or a redelivery needs them. Out of the
    /// cache a message has no entry of its own: a sparse index keeps ~64 bytes per run of up
    /// to 256 messages (or 1 MiB) of a segment.
    #[arg(long, env = "SWITCHBOARD_CACHE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cache_bytes: usize,

    /// With --data-dir: bytes past which an address's consumer-group journal (positions,
    /// leases, acks) is rewritten as a snapshot of its groups (4 KiB to 1 GiB).
    #[arg(long, env = "SWITCHBOARD_JOURNAL_COMPACT_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub journal_compact_bytes: u64,

    /// With --data-dir: start even when a log is corrupt (not merely cut short by a crash,
    /// which is always repaired) or ends before its high-water mark (a deleted or truncated
    /// segment), keeping the records before the corrupt one and removing the rest of that
    /// address's log; if acknowledged messages were lost that way, the address continues after
    /// its high-water mark and its remaining segments are set aside (kept, not served), so no
    /// sequence is given out twice. Without it the broker refuses to start and names the
    /// address, sequence and file.
    #[arg(long, env = "SWITCHBOARD_REPAIR", requires = "data_dir")]
    pub repair: bool,
}

impl ServeArgs {
    /// The HTTP listener's address: `--http-listen`, or its older name `--metrics-listen`.
    pub fn http_listen(&self) -> Option<SocketAddr> {
        self.http_listen.or(self.metrics_listen)
    }

    /// The validated server configuration.
    ///
    /// # Errors
    /// A message naming the flag and the allowed range.
    pub fn config(&self) -> Result<ServerConfig, String> {
        let limits = Limits {
            max_message_bytes: self.max_message_bytes,
            retention_messages: self.retention_messages,
            retention_bytes: self.retention_bytes,
            retention_age: self.retention_age,
            dedup_window: self.dedup_window,
            max_retained_bytes: self.max_retained_bytes,
            idle_address: Duration::from_millis(self.idle_address_ms),
            max_addresses: self.max_addresses,
            max_subscribers_per_address: self.max_subscribers_per_address,
            max_groups_per_address: self.max_groups_per_address,
            idle_group: self.idle_group,
            max_read_buffer_bytes: self.max_read_buffer_bytes,
        };
        limits.validate()?;
        if !(1..=60_000).contains(&self.fsync_interval_ms) {
            return Err(format!(
                "--fsync-interval-ms: {} is outside 1 to 60000",
                self.fsync_interval_ms
            ));
        }
        if !(1 << 20..=1 << 30).contains(&self.segment_bytes) {
            return Err(format!(
                "--segment-bytes: {} is outside 1048576 (1 MiB) to 1073741824 (1 GiB)",
                self.segment_bytes
            ));
        }
        if !(4096..=1 << 30).contains(&self.journal_compact_bytes) {
            return Err(format!(
                "--journal-compact-bytes: {} is outside 4096 to 1073741824 (1 GiB)",
                self.journal_compact_bytes
            ));
        }
        let storage = self
            .data_dir
            .as_ref()
            .map(|dir| crate::engine::disk::DiskConfig {
                dir: dir.clone(),
                fsync: match self.fsync {
                    Fsync::Always => crate::engine::disk::FsyncMode::Always,
                    Fsync::Interval => crate::engine::disk::FsyncMode::Interval(
                        Duration::from_millis(self.fsync_interval_ms),
                    ),
                },
                segment_bytes: self.segment_bytes,
                repair: self.repair,
                journal_compact_bytes: self.journal_compact_bytes,
                cache_bytes: self.cache_bytes,
            });
        let engine = match (self.engine, &self.data_dir) {
            (Some(EngineKind::Disk) | None, Some(_)) | (Some(EngineKind::Memory) | None, None) => {
                None
            }
            (Some(EngineKind::Disk), None) => {
                return Err("--engine disk: needs --data-dir PATH".into());
            }
            (Some(EngineKind::Memory), Some(_)) => {
                return Err("--engine memory: --data-dir is for --engine disk".into());
            }
            (Some(EngineKind::Redis), Some(_)) => {
                return Err(
                    "--engine redis: --data-dir is for --engine disk (Redis keeps the data)".into(),
                );
            }
            (Some(EngineKind::Redis), None) => {
                let ns = &self.redis_namespace;
                if ns.is_empty()
                    || ns.len() > 64
                    || !ns
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                {
                    return Err(format!(
                        "--redis-namespace: {ns:?} must be 1-64 bytes of letters, digits, '-', '_', '.'"
                    ));
                }
                Some(crate::engine::redis::RedisConfig {
                    urls: self.redis_url.clone(),
                    cluster: self.redis_cluster,
                    namespace: ns.clone(),
                    ca_cert: self.redis_ca_cert.clone(),
                })
            }
        };
        let cors_origins = self
            .cors_origins
            .iter()
            .map(|o| crate::grpc::web::parse_origin(o))
            .collect::<Result<Vec<_>, _>>()?;
        if self.http_max_connections == 0 {
            return Err("--http-max-connections: must be at least 1".into());
        }
        if !(1..=3_600_000).contains(&self.http_idle_timeout_ms) {
            return Err(format!(
                "--http-idle-timeout-ms: {} is outside 1 to 3600000 (1 h)",
                self.http_idle_timeout_ms
            ));
        }
        let http = crate::config::HttpListener {
            max_connections: self.http_max_connections,
            idle_timeout: Duration::from_millis(self.http_idle_timeout_ms),
            allowed_hosts: crate::grpc::hosts::AllowedHosts::parse(&self.http_allowed_hosts)?,
        };
        Ok(ServerConfig {
            storage,
            redis: engine,
            cors_origins,
            http,
            limits,
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            max_streams_per_connection: self.max_streams_per_connection,
            keepalive_interval: Duration::from_millis(self.keepalive_interval_ms),
            keepalive_timeout: Duration::from_millis(self.keepalive_timeout_ms),
            admission: crate::config::Admission {
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
                max_connections: self.max_connections,
            },
            security: crate::config::Security {
                auth_file: self.auth_file.clone(),
                tls: match (&self.tls_cert, &self.tls_key) {
                    (Some(cert), Some(key)) => Some(crate::config::TlsFiles {
                        cert: cert.clone(),
                        key: key.clone(),
                        client_ca: self.tls_client_ca.clone(),
                        client_auth_optional: self.tls_client_auth == ClientAuth::Optional,
                    }),
                    _ => None,
                },
            },
        })
    }
}
