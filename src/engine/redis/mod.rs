//! The Redis Streams engine (`serve --engine redis`): any number of switchboard nodes on one
//! Redis (or Redis Cluster) behave as one broker. Redis holds everything; a node holds only
//! connections, a small ring of recent messages per followed address, and its streams.
//!
//! The model maps onto Redis as Centrifugo's Redis broker maps channels onto it:
//! - an address is a stream whose entry ids are `<sequence>-0`; `scripts::SEND` assigns the
//!   sequence and appends in one atomic step, so sequences stay dense across nodes;
//! - a consumer group is a hash (position, settings) plus a sorted set of leases keyed by due
//!   time, taken and settled by scripts (`scripts::take`, `scripts::SETTLE`). Redis's own
//!   `XREADGROUP` groups are not used: they have no delayed Nack, no `max_ack_pending`, and no
//!   exact count of what retention took from a group, which our semantics promise;
//! - fan-out: each node reads each address that has local readers once ([`feed`], `XREAD
//!   BLOCK`, batches of up to 512) and hands the messages to its local subscribers as shared
//!   wire frames, with no Redis round trip per subscriber; messages the node appended itself
//!   go into its feed from the append script's reply instead of being read back.
//!
//! All keys of one address share the hash tag `{address}` (see `Keys`), so every script
//! touches one slot and runs on Redis Cluster. Times (`sent_at`, lease due times) come from
//! Redis's clock, so nodes with skewed clocks agree.
//!
//! Errors talking to Redis become `UNAVAILABLE` ("storage: redis: ..."); streams stay open and
//! resume when Redis is back.

pub mod feed;
mod scripts;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use dashmap::DashMap;
use redis::{aio::ConnectionLike, Cmd, Pipeline, RedisFuture, Script, Value};

use super::{
    AckPolicy, AddressInfo, Appended, Batch, DeadLetter, GroupInfo, GroupSettings, NewMessage,
    Settle, StartAt, Taken,
};
use crate::{
    config::Limits,
    error::BrokerError,
    message::Message,
    metrics::Metrics,
    validate::{Address, Headers},
};
pub use feed::{Feed, Following};

/// How long one Redis command may take before the call fails with `UNAVAILABLE`.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the Redis engine connects (`--redis-url`, `--redis-cluster`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port[/db]` or `rediss://` (TLS); with `cluster`, the seed nodes.
    pub urls: Vec<String>,
    /// Talk to a Redis Cluster (slots, redirections) through the seed nodes in `urls`.
    pub cluster: bool,
    /// Prefix of every key (`<namespace>:{address}:...`): brokers with different namespaces
    /// share one Redis without seeing each other's addresses.
    pub namespace: String,
    /// PEM CA certificate(s) to verify a `rediss://` Redis with; `None`: the system's trust
    /// store.
    pub ca_cert: Option<std::path::PathBuf>,
}

/// `url` without its password (`redis://user:***@host:port`), for logs and errors.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user = &url[scheme + 3..at];
            let user = user.split_once(':').map_or(user, |(u, _)| u);
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// The URLs, redacted, comma-separated.
pub fn shown(urls: &[String]) -> String {
    urls.iter()
        .map(|u| redacted(u))
        .collect::<Vec<_>>()
        .join(",")
}

/// A connection shared by many calls (commands are pipelined), to one Redis or a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    /// One Redis, reconnecting by itself.
    Single(redis::aio::ConnectionManager),
    /// A dedicated connection (blocking reads).
    Dedicated(redis::aio::MultiplexedConnection),
    /// A Redis Cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Dedicated(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Dedicated(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Dedicated(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[derive(Clone)]
enum Clients {
    Single(Box<redis::Client>),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl Clients {
    /// A connection of its own, for blocking reads that would stall a shared one.
    async fn dedicated(&self) -> redis::RedisResult<Conn> {
        match self {
            Self::Single(c) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_response_timeout(Some(RESPONSE_TIMEOUT + feed::BLOCK))
                    .set_connection_timeout(Some(RESPONSE_TIMEOUT));
                c.get_multiplexed_async_connection_with_config(&config)
                    .await
                    .map(Conn::Dedicated)
            }
            Self::Cluster(c) => c.get_async_connection().await.map(Conn::Cluster),
        }
    }
}

/// The scripts, loaded once per connection (EVALSHA, falling back to EVAL after a restart).
struct Scripts {
    start: Script,
    create_group: Script,
    take: Script,
    settle: Script,
    finish: Script,
    release: Script,
    info: Script,
    delete_group: Script,
}

/// The keys of one address (see [`scripts`]), under a namespace (`--redis-namespace`).
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    ns: Arc<str>,
}

impl Keys {
    /// `<ns>:{address}:suffix`.
    pub(crate) fn of(&self, address: &str, suffix: &str) -> String {
        format!("{}:{{{address}}}:{suffix}", self.ns)
    }

    /// The stream.
    pub(crate) fn stream(&self, address: &str) -> String {
        self.of(address, "s")
    }

    /// The address's sequence, bytes and epoch.
    pub(crate) fn meta(&self, address: &str) -> String {
        self.of(address, "m")
    }

    /// A group's hash; `suffix` `""`, `:l` (leases), `:q` (pending by sequence), `:n`
    /// (deliveries), `:o` (holders).
    pub(crate) fn group(&self, address: &str, group: &str, suffix: &str) -> String {
        self.of(address, &format!("g:{group}{suffix}"))
    }

    /// The set of every address name.
    pub(crate) fn addresses(&self) -> String {
        format!("{}:addresses", self.ns)
    }
}

/// Most messages one append script carries when Sends queue up for an address.
pub const APPEND_BATCH_MESSAGES: usize = 256;
/// Append scripts of one address in flight at once from one node: while Redis runs one, the
/// next is on its way.
pub const APPEND_IN_FLIGHT: usize = 2;
/// Most bytes (as charged to retention) one append script carries.
pub const APPEND_BATCH_BYTES: usize = 4 * 1024 * 1024;

type Reply = tokio::sync::oneshot::Sender<Result<Vec<Appended>, BrokerError>>;

/// Sends queued for one address on this node. One append script per address is in flight at a
/// time; Sends arriving meanwhile go out together in the next (group commit, as the disk
/// engine's flusher does with fsyncs). This keeps each stream's messages in order, which
/// separately spawned calls would not, and turns many small round trips into few large ones.
#[derive(Default)]
struct Outbox {
    queue: Vec<(Vec<NewMessage>, Reply)>,
    busy: bool,
}

/// The Redis Streams engine. See the module docs.
pub struct RedisEngine {
    conn: Conn,
    clients: Clients,
    pub(crate) keys: Keys,
    pub(crate) limits: Limits,
    metrics: Arc<Metrics>,
    /// This node's id: lease holders are `<node>:<stream>`, so nodes never mix them up.
    node: String,
    next_incarnation: AtomicU64,
    scripts: Scripts,
    /// Addresses this node follows (has local readers on).
    feeds: DashMap<Arc<str>, Arc<Feed>>,
    /// Addresses this node has added to the set of addresses.
    registered: DashMap<Box<str>, ()>,
    /// Sends waiting for their address's append script.
    outboxes: DashMap<Arc<str>, Arc<parking_lot::Mutex<Outbox>>>,
    shutting_down: AtomicBool,
    /// The last health probe reached Redis.
    reachable: AtomicBool,
}

impl std::fmt::Debug for RedisEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEngine")
            .field("node", &self.node)
            .field("feeds", &self.feeds.len())
            .finish_non_exhaustive()
    }
}

/// `UNAVAILABLE`: "storage: redis: ...".
fn unavailable(e: &redis::RedisError) -> BrokerError {
    BrokerError::Storage(format!("redis: {e}"))
}

fn protocol(what: &str) -> BrokerError {
    BrokerError::Storage(format!("redis: unexpected reply to {what}"))
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Decodes a stream entry's fields (`p`, `t`, `z`, `h:<key>`) into a message.
pub(crate) fn decode(address: &Arc<str>, sequence: u64, fields: Value) -> Option<Message> {
    let Value::Array(fields) = fields else {
        return None;
    };
    let mut payload = Bytes::new();
    let mut headers = Headers::new();
    let mut micros = 0u64;
    let mut size = 0usize;
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        let Value::BulkString(k) = k else { return None };
        match k.as_slice() {
            b"p" => {
                payload = match v {
                    Value::BulkString(b) => Bytes::from(b),
                    _ => return None,
                }
            }
            b"t" => micros = u64::try_from(int(&v)?).ok()?,
            b"z" => size = usize::try_from(int(&v)?).ok()?,
            b"c" => {}
            key => {
                let key = key.strip_prefix(b"h:")?;
                headers.insert(String::from_utf8(key.to_vec()).ok()?, text(&v)?);
            }
        }
    }
    Some(Message {
        address: Arc::clone(address),
        sequence,
        payload,
        headers,
        sent_at: UNIX_EPOCH + Duration::from_micros(micros),
        size,
    })
}

/// The sequence of entry id `<sequence>-0`.
pub(crate) fn id_sequence(v: &Value) -> Option<u64> {
    let id = text(v)?;
    id.split_once('-')
        .map_or(id.as_str(), |(s, _)| s)
        .parse()
        .ok()
}

/// Entries of an `XRANGE` reply, decoded.
pub(crate) fn entries(address: &Arc<str>, reply: Value) -> Result<Vec<Arc<Message>>, BrokerError> {
    let Value::Array(items) = reply else {
        return Ok(Vec::new());
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            return Err(protocol("XRANGE"));
        };
        if pair.len() != 2 {
            return Err(protocol("XRANGE"));
        }
        let fields = pair.pop().unwrap_or(Value::Nil);
        let seq = id_sequence(&pair[0]).ok_or_else(|| protocol("XRANGE"))?;
        out.push(Arc::new(
            decode(address, seq, fields).ok_or_else(|| protocol("XRANGE"))?,
        ));
    }
    Ok(out)
}

/// Reads `(seq, attempt, fields)` triples from `it`.
fn triples(
    address: &Arc<str>,
    it: &mut std::vec::IntoIter<Value>,
    what: &str,
) -> Result<Vec<(Arc<Message>, u32)>, BrokerError> {
    let n = it
        .next()
        .as_ref()
        .and_then(int)
        .ok_or_else(|| protocol(what))?;
    let mut out = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for _ in 0..n {
        let seq = it
            .next()
            .as_ref()
            .and_then(int)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| protocol(what))?;
        let attempt = it
            .next()
            .as_ref()
            .and_then(int)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| protocol(what))?;
        let fields = it.next().ok_or_else(|| protocol(what))?;
        let m = decode(address, seq, fields).ok_or_else(|| protocol(what))?;
        out.push((Arc::new(m), attempt));
    }
    Ok(out)
}

impl RedisEngine {
    /// Connects to Redis (`config`) and loads the scripts.
    ///
    /// # Errors
    /// A bad URL, or Redis unreachable within [`RESPONSE_TIMEOUT`]: a message naming Redis.
    pub async fn connect(
        limits: &Limits,
        metrics: Arc<Metrics>,
        config: &RedisConfig,
    ) -> Result<Self, String> {
        let urls: Vec<&str> = config.urls.iter().map(String::as_str).collect();
        let certs = match &config.ca_cert {
            None => None,
            Some(path) => Some(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(
                    std::fs::read(path)
                        .map_err(|e| format!("--redis-ca-cert {}: {e}", path.display()))?,
                ),
            }),
        };
        let (conn, clients) = if config.cluster {
            let mut builder = redis::cluster::ClusterClientBuilder::new(urls)
                .tcp_settings(tcp())
                .response_timeout(RESPONSE_TIMEOUT)
                .connection_timeout(RESPONSE_TIMEOUT);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build().map_err(|e| format!("--redis-url: {e}"))?;
            let conn = client
                .get_async_connection()
                .await
                .map_err(|e| format!("redis cluster at {}: {e}", shown(&config.urls)))?;
            (Conn::Cluster(conn), Clients::Cluster(Box::new(client)))
        } else {
            let [url] = urls.as_slice() else {
                return Err(format!(
                    "--redis-url: {} URLs given; give one, or several with --redis-cluster",
                    urls.len()
                ));
            };
            let info = redis::IntoConnectionInfo::into_connection_info(*url)
                .map_err(|e| format!("--redis-url: {e}"))?
                .set_tcp_settings(tcp());
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(info, certs),
                None => redis::Client::open(info),
            }
            .map_err(|e| format!("--redis-url: {e}"))?;
            let cfg = redis::aio::ConnectionManagerConfig::new()
                .set_response_timeout(Some(RESPONSE_TIMEOUT))
                .set_connection_timeout(Some(RESPONSE_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500));
            let conn = client
                .get_connection_manager_with_config(cfg)
                .await
                .map_err(|e| format!("redis at {}: {e}", redacted(url)))?;
            (Conn::Single(conn), Clients::Single(Box::new(client)))
        };
        let node = format!("{:016x}", rand::random::<u64>());
        let engine = Self {
            conn,
            clients,
            keys: Keys {
                ns: Arc::from(config.namespace.as_str()),
            },
            limits: limits.clone(),
            metrics,
            node,
            next_incarnation: AtomicU64::new(1),
            scripts: Scripts {
                start: Script::new(&scripts::start()),
                create_group: Script::new(&scripts::create_group()),
                take: Script::new(&scripts::take()),
                settle: Script::new(scripts::SETTLE),
                finish: Script::new(scripts::FINISH),
                release: Script::new(scripts::RELEASE),
                info: Script::new(scripts::INFO),
                delete_group: Script::new(scripts::DELETE_GROUP),
            },
            feeds: DashMap::new(),
            registered: DashMap::new(),
            outboxes: DashMap::new(),
            shutting_down: AtomicBool::new(false),
            reachable: AtomicBool::new(true),
        };
        if !engine.ping().await {
            return Err(format!(
                "redis at {}: no answer to PING",
                shown(&config.urls)
            ));
        }
        Ok(engine)
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// A new incarnation id (groups, address epochs): unique across nodes.
    fn incarnation(&self) -> String {
        format!(
            "{}.{}",
            self.node,
            self.next_incarnation.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// This node's lease holder id for the group stream `holder` (0: Recv callers, whose leases
    /// are never released early).
    pub(crate) fn holder(&self, holder: u64) -> String {
        if holder == 0 {
            "r".into()
        } else {
            format!("{}:{holder}", self.node)
        }
    }

    /// From now on every Send is refused with `UNAVAILABLE`.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Whether Redis answered the last [`RedisEngine::ping`].
    pub fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// PINGs Redis; records and returns whether it answered.
    pub async fn ping(&self) -> bool {
        let ok = redis::cmd("PING")
            .query_async::<String>(&mut self.conn())
            .await
            .is_ok();
        self.reachable.store(ok, Ordering::Release);
        ok
    }

    /// Appends `messages` to `address` in one step (one script call): consecutive sequences,
    /// duplicates (`message_id` within `--dedup-window`, message still retained) answered with
    /// the first sequence, then retention trims the front.
    ///
    /// # Errors
    /// `UNAVAILABLE` once shutdown has begun, or when Redis cannot be reached.
    pub async fn append(
        &self,
        address: &str,
        messages: &[NewMessage],
    ) -> Result<Vec<Appended>, BrokerError> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(BrokerError::ShuttingDown);
        }
        let issued = self.issue(address);
        let reply = self
            .append_cmd(address, messages)
            .query_async::<Vec<u64>>(&mut self.conn())
            .await;
        let appended = self.appended(address, messages.len(), reply).await;
        if let (Some(issued), Ok(answer)) = (issued, &appended) {
            let own = messages
                .iter()
                .map(|m| (m.payload.clone(), m.headers.clone(), m.size));
            self.own(issued.feed(), own, answer);
        }
        appended.map(|(out, _)| out)
    }

    /// If this node follows `address`, tells its feed an append script is on its way (see
    /// `Feed::push_own`); the script counts as answered when the guard is dropped.
    fn issue(&self, address: &str) -> Option<feed::Issued> {
        Some(self.feeds.get(address)?.value().issue())
    }

    /// Hands `feed` what this node's append script stored: `messages` (payload, headers,
    /// size, in the order sent) with the script's answer.
    fn own(
        &self,
        feed: &Feed,
        messages: impl Iterator<Item = (Bytes, Headers, usize)>,
        (appended, sent_at): &(Vec<Appended>, SystemTime),
    ) {
        let stored = messages
            .zip(appended)
            .filter(|(_, a)| !a.duplicate)
            .map(|((payload, headers, size), a)| Message {
                address: Arc::clone(feed.address()),
                sequence: a.sequence,
                payload,
                headers,
                sent_at: *sent_at,
                size,
            })
            .collect();
        feed.push_own(
            stored,
            feed::RING_MESSAGES.min(self.limits.retention_messages),
            feed::RING_BYTES.min(self.limits.retention_bytes),
        );
    }

    /// The append script as one `EVAL` (not `EVALSHA`: a script Redis has forgotten, after a
    /// restart, would make the client load it and retry, and a retried call could land after
    /// a later one; Redis caches the compiled body, so `EVAL` costs a hash of 4 KiB per call).
    fn append_cmd(&self, address: &str, messages: &[NewMessage]) -> Cmd {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts::SEND)
            .arg(4)
            .arg(self.keys.stream(address))
            .arg(self.keys.meta(address))
            .arg(self.keys.of(address, "dh"))
            .arg(self.keys.of(address, "dz"))
            .arg(self.limits.retention_messages)
            .arg(self.limits.retention_bytes)
            .arg(u64::try_from(self.limits.dedup_window.as_millis()).unwrap_or(u64::MAX))
            .arg(messages.len())
            .arg(self.incarnation());
        for m in messages {
            cmd.arg(m.message_id.as_deref().unwrap_or(""))
                .arg(m.size)
                .arg(m.headers.len() * 2)
                .arg(m.payload.as_ref());
            for (k, v) in &m.headers {
                cmd.arg(format!("h:{k}")).arg(v);
            }
        }
        cmd
    }

    /// Adds `address` to the set of addresses (ListAddresses, the age sweep), once per node.
    /// A failure is retried by the next Send, so it is not reported.
    async fn register(&self, address: &str) {
        if self.registered.contains_key(address) {
            return;
        }
        let added: redis::RedisResult<()> = redis::cmd("SADD")
            .arg(self.keys.addresses())
            .arg(address)
            .query_async(&mut self.conn())
            .await;
        if added.is_ok() {
            self.registered.insert(address.into(), ());
        }
    }

    /// The append script's reply as what each message became, and their `sent_at`.
    async fn appended(
        &self,
        address: &str,
        n: usize,
        reply: redis::RedisResult<Vec<u64>>,
    ) -> Result<(Vec<Appended>, SystemTime), BrokerError> {
        let reply = reply.map_err(|e| unavailable(&e))?;
        let out = expand_reply(&reply, n).ok_or_else(|| protocol("send"))?;
        self.register(address).await;
        let stored = out.iter().filter(|a| !a.duplicate).count() as u64;
        self.metrics.sent.inc_by(stored);
        let micros = reply.last().copied().unwrap_or(0);
        Ok((out, UNIX_EPOCH + Duration::from_micros(micros)))
    }

    /// Queues `messages` for `address` and returns where their sequences (or the refusal)
    /// arrive: appended in the order queued, many Sends to one address per script call (see
    /// `Outbox`).
    pub fn append_queued(
        self: &Arc<Self>,
        address: &str,
        messages: Vec<NewMessage>,
    ) -> tokio::sync::oneshot::Receiver<Result<Vec<Appended>, BrokerError>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.shutting_down.load(Ordering::Acquire) {
            let _ = tx.send(Err(BrokerError::ShuttingDown));
            return rx;
        }
        let outbox = Arc::clone(self.outboxes.entry(Arc::from(address)).or_default().value());
        let start = {
            let mut o = outbox.lock();
            o.queue.push((messages, tx));
            !std::mem::replace(&mut o.busy, true)
        };
        if start {
            let (engine, address) = (Arc::clone(self), Arc::<str>::from(address));
            tokio::spawn(async move { engine.drain_outbox(&address, &outbox).await });
        }
        rx
    }

    /// Sends the queued Sends of `address` until none is left, [`APPEND_IN_FLIGHT`] scripts at
    /// a time. All go out on the shared connection from this one task, in queue order, and Redis
    /// runs a connection's commands in the order they arrive, so sequences follow the queue.
    async fn drain_outbox(&self, address: &Arc<str>, outbox: &parking_lot::Mutex<Outbox>) {
        type Pending = (Vec<Reply>, Vec<usize>);
        use futures_util::StreamExt as _;
        let mut in_flight = futures_util::stream::FuturesOrdered::new();
        loop {
            while in_flight.len() < APPEND_IN_FLIGHT {
                let units = {
                    let mut o = outbox.lock();
                    let (mut n, mut bytes, mut take) = (0, 0, 0);
                    for (m, _) in &o.queue {
                        let size: usize = m.iter().map(|m| m.size).sum();
                        if take > 0
                            && (n + m.len() > APPEND_BATCH_MESSAGES
                                || bytes + size > APPEND_BATCH_BYTES)
                        {
                            break;
                        }
                        n += m.len();
                        bytes += size;
                        take += 1;
                    }
                    o.queue.drain(..take).collect::<Vec<_>>()
                };
                if units.is_empty() {
                    break;
                }
                let (messages, replies): (Vec<Vec<NewMessage>>, Vec<Reply>) =
                    units.into_iter().unzip();
                let counts: Vec<usize> = messages.iter().map(Vec::len).collect();
                let all: Vec<NewMessage> = messages.into_iter().flatten().collect();
                let pending: Pending = (replies, counts);
                if self.shutting_down.load(Ordering::Acquire) {
                    for tx in pending.0 {
                        let _ = tx.send(Err(BrokerError::ShuttingDown));
                    }
                    continue;
                }
                let cmd = self.append_cmd(address, &all);
                let mut conn = self.conn();
                let issued = self.issue(address);
                in_flight.push_back(async move {
                    (
                        pending,
                        all,
                        issued,
                        cmd.query_async::<Vec<u64>>(&mut conn).await,
                    )
                });
            }
            let Some(((replies, counts), all, issued, reply)) = in_flight.next().await else {
                let mut o = outbox.lock();
                if !o.queue.is_empty() {
                    continue;
                }
                o.busy = false;
                drop(o);
                // Forget an idle outbox, unless a Send queued since (then it is busy).
                self.outboxes.remove_if(address, |_, b| {
                    let b = b.lock();
                    !b.busy && b.queue.is_empty()
                });
                return;
            };
            let answer = self.appended(address, all.len(), reply).await;
            if let (Some(issued), Ok(answer)) = (issued, &answer) {
                let own = all.into_iter().map(|m| (m.payload, m.headers, m.size));
                self.own(issued.feed(), own, answer);
            }
            match answer.map(|(appended, _)| appended) {
                Ok(appended) => {
                    let mut rest = appended.as_slice();
                    for (tx, n) in replies.into_iter().zip(counts) {
                        let (mine, tail) = rest.split_at(n.min(rest.len()));
                        rest = tail;
                        let _ = tx.send(Ok(mine.to_vec()));
                    }
                }
                Err(e) => {
                    for tx in replies {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Where a fan-out reader starting at `start` begins: the sequence it is owed first.
    ///
    /// # Errors
    /// `OUT_OF_RANGE` for a sequence past the last + 1; `UNAVAILABLE` when Redis cannot be
    /// reached.
    pub async fn start_position(&self, address: &str, start: StartAt) -> Result<u64, BrokerError> {
        let (kind, value) = start_args(start);
        let reply: (i64, u64) = self
            .scripts
            .start
            .key(self.keys.stream(address))
            .key(self.keys.meta(address))
            .arg(kind)
            .arg(value)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        match (reply, start) {
            ((-1, last), StartAt::Sequence(requested)) => Err(BrokerError::PastEnd {
                field: "start_sequence",
                requested,
                last,
            }),
            ((next, _), _) => u64::try_from(next).map_err(|_| protocol("start")),
        }
    }

    /// Up to `max` retained messages from sequence `from` on, read from Redis; and how many
    /// from `from` on are gone (retention) before the first returned.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn read_range(
        &self,
        address: &Arc<str>,
        from: u64,
        max: usize,
    ) -> Result<(u64, Vec<Arc<Message>>), BrokerError> {
        let reply: Value = redis::cmd("XRANGE")
            .arg(self.keys.stream(address))
            .arg(format!("{from}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(max)
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let got = entries(address, reply)?;
        let dropped = got.first().map_or(0, |m| m.sequence.saturating_sub(from));
        Ok((dropped, got))
    }

    /// Follows `address` on this node: the returned guard keeps its [`Feed`] (one `XREAD
    /// BLOCK` reader for all local readers) running.
    pub fn follow(self: &Arc<Self>, address: &str) -> feed::Following {
        feed::follow(self, address)
    }

    /// Takes up to `max` messages for `group` of `address`, leased to `holder` with
    /// acknowledgements. `incarnation` `None` creates the group at the end (sequence 1 for the
    /// default group) if missing; `Some` refuses with `GroupDeleted` if the group is not that
    /// incarnation any more. Returns the incarnation and the batch; dead letters in the batch
    /// must be stored, then [`RedisEngine::finish`]ed.
    ///
    /// # Errors
    /// `NOT_FOUND` (group deleted); `UNAVAILABLE` when Redis cannot be reached.
    pub async fn take(
        &self,
        address: &Arc<str>,
        group: &str,
        incarnation: Option<&str>,
        max: usize,
        max_bytes: usize,
        holder: u64,
    ) -> Result<(String, Batch), BrokerError> {
        let a: &str = address;
        let default = GroupSettings {
            start: StartAt::End,
            ack: None,
        };
        let reply: Value = self
            .scripts
            .take
            .key(self.keys.stream(a))
            .key(self.keys.meta(a))
            .key(self.keys.group(a, group, ""))
            .key(self.keys.group(a, group, ":l"))
            .key(self.keys.group(a, group, ":n"))
            .key(self.keys.group(a, group, ":o"))
            .key(self.keys.of(a, "groups"))
            .key(self.keys.group(a, group, ":q"))
            .arg(group)
            .arg(max)
            .arg(self.holder(holder))
            .arg(incarnation.unwrap_or(""))
            .arg(self.incarnation())
            .arg(if group.is_empty() { "1" } else { "0" })
            .arg(default.describe())
            .arg(max_bytes.saturating_sub(crate::message::RECV_RESPONSE_OVERHEAD))
            .arg(a.len())
            .arg(self.limits.max_groups_per_address)
            .arg(self.keys.of(a, "g:"))
            .arg(u64::try_from(self.limits.idle_group.as_millis()).unwrap_or(u64::MAX))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let Value::Array(items) = reply else {
            return Err(protocol("take"));
        };
        let mut it = items.into_iter();
        match it.next().as_ref().and_then(text).as_deref() {
            Some("ok") => {}
            Some("deleted") => return Err(BrokerError::GroupDeleted),
            Some("toomany") => return Err(self.too_many_groups()),
            _ => return Err(protocol("take")),
        }
        let inc = it
            .next()
            .as_ref()
            .and_then(text)
            .ok_or_else(|| protocol("take"))?;
        let dropped = it
            .next()
            .as_ref()
            .and_then(int)
            .and_then(|n| u64::try_from(n).ok())
            .ok_or_else(|| protocol("take"))?;
        let due = it
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| protocol("take"))?;
        let dlq = it.next().as_ref().and_then(text).unwrap_or_default();
        let messages = triples(address, &mut it, "take")?;
        let dead = triples(address, &mut it, "take")?;
        let too_large = match (
            it.next().as_ref().and_then(int),
            it.next().as_ref().and_then(int),
        ) {
            (Some(0), _) => None,
            (Some(seq), Some(bytes)) => Some(super::Oversized {
                sequence: u64::try_from(seq).map_err(|_| protocol("take"))?,
                bytes: usize::try_from(bytes)
                    .map_err(|_| protocol("take"))?
                    .saturating_add(crate::message::RECV_RESPONSE_OVERHEAD),
            }),
            _ => return Err(protocol("take")),
        };
        let delivered = messages.len() as u64;
        self.metrics.delivered.inc_by(delivered);
        let again = messages.iter().filter(|(_, a)| *a > 1).count() as u64;
        self.metrics.redelivered.inc_by(again);
        self.metrics.dead_lettered.inc_by(dead.len() as u64);
        let batch = Batch {
            messages: messages
                .into_iter()
                .map(|(message, attempt)| Taken { message, attempt })
                .collect(),
            dropped,
            dead_letters: dead_letters(group, &dlq, dead),
            next_due: u64::try_from(due)
                .ok()
                .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms)),
            durable: super::Durable::done(),
            too_large,
        };
        Ok((inc, batch))
    }

    /// Forgets the originals of stored dead letters (`sequences` of `group`, incarnation `inc`).
    /// Until then they stay leased, so a node that dies before storing a dead letter leaves it
    /// to be dead-lettered again by another (at least once into the dead-letter address).
    pub async fn finish(&self, address: &str, group: &str, sequences: &[u64]) {
        let inc: Option<String> = redis::cmd("HGET")
            .arg(self.keys.group(address, group, ""))
            .arg("inc")
            .query_async(&mut self.conn())
            .await
            .ok()
            .flatten();
        let Some(inc) = inc else { return };
        let mut inv = self.scripts.finish.prepare_invoke();
        inv.key(self.keys.group(address, group, ""))
            .key(self.keys.group(address, group, ":l"))
            .key(self.keys.group(address, group, ":n"))
            .key(self.keys.group(address, group, ":o"))
            .key(self.keys.group(address, group, ":q"))
            .arg(inc);
        for s in sequences {
            inv.arg(*s);
        }
        if let Err(e) = inv.invoke_async::<i64>(&mut self.conn()).await {
            tracing::warn!(address, group, error = %e, "redis: dead letters stored but their originals not forgotten; they are dead-lettered again after ack_wait");
        }
    }

    /// The leases of group stream `holder` fall due at once (its stream ended).
    pub async fn release(&self, address: &str, group: &str, incarnation: &str, holder: u64) {
        let r: redis::RedisResult<i64> = self
            .scripts
            .release
            .key(self.keys.group(address, group, ""))
            .key(self.keys.group(address, group, ":l"))
            .key(self.keys.group(address, group, ":o"))
            .arg(incarnation)
            .arg(self.holder(holder))
            .invoke_async(&mut self.conn())
            .await;
        if let Err(e) = r {
            tracing::warn!(address, group, error = %e, "redis: leases of an ended stream not released; they fall due after ack_wait");
        }
    }

    /// The refusal of a group past `--max-groups-per-address`.
    fn too_many_groups(&self) -> BrokerError {
        BrokerError::LimitReached {
            what: "consumer groups on this address",
            limit: self.limits.max_groups_per_address,
            flag: "--max-groups-per-address",
        }
    }

    /// CreateGroup: whether it was created, and the sequence it hands out next.
    ///
    /// # Errors
    /// `ALREADY_EXISTS` with other settings; `OUT_OF_RANGE` for a start past the last + 1;
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn create_group(
        &self,
        address: &str,
        group: &str,
        settings: &GroupSettings,
    ) -> Result<(bool, u64), BrokerError> {
        let (kind, value) = start_args(settings.start);
        let ack = settings.ack.as_ref();
        let reply: (String, String) = self
            .scripts
            .create_group
            .key(self.keys.stream(address))
            .key(self.keys.meta(address))
            .key(self.keys.group(address, group, ""))
            .key(self.keys.of(address, "groups"))
            .arg(group)
            .arg(settings.describe())
            .arg(ack.map_or(0, |a| {
                u64::try_from(a.ack_wait.as_millis()).unwrap_or(u64::MAX)
            }))
            .arg(ack.map_or(0, |a| a.max_deliveries))
            .arg(ack.map_or(0, |a| a.max_ack_pending))
            .arg(
                ack.and_then(|a| a.dead_letter.as_ref())
                    .map_or("", Address::as_str),
            )
            .arg(kind)
            .arg(value)
            .arg(self.incarnation())
            .arg(self.limits.max_groups_per_address)
            .arg(self.keys.of(address, "g:"))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        self.register(address).await;
        let n = || reply.1.parse::<u64>().map_err(|_| protocol("create_group"));
        match reply.0.as_str() {
            "toomany" => Err(self.too_many_groups()),
            "created" => Ok((true, n()?)),
            "same" => Ok((false, n()?)),
            "exists" => Err(BrokerError::GroupExists {
                group: group.to_string(),
                existing: reply.1,
            }),
            "pastend" => Err(BrokerError::PastEnd {
                field: "start_sequence",
                requested: match settings.start {
                    StartAt::Sequence(s) => s,
                    _ => 0,
                },
                last: n()?,
            }),
            _ => Err(protocol("create_group")),
        }
    }

    /// Ack, Nack or ExtendLease: the sequences that were not pending, and dead letters (a Nack
    /// on the last allowed delivery) to store, then [`RedisEngine::finish`].
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` for an unknown group or one without acknowledgements;
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn settle(
        &self,
        address: &Arc<str>,
        group: &str,
        sequences: &[u64],
        op: Settle,
    ) -> Result<(Vec<u64>, Vec<DeadLetter>), BrokerError> {
        let a: &str = address;
        let (name, delay) = match op {
            Settle::Ack => ("ack", 0),
            Settle::Extend => ("extend", 0),
            Settle::Nack(d) => ("nack", u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let mut inv = self.scripts.settle.prepare_invoke();
        inv.key(self.keys.stream(a))
            .key(self.keys.group(a, group, ""))
            .key(self.keys.group(a, group, ":l"))
            .key(self.keys.group(a, group, ":n"))
            .key(self.keys.group(a, group, ":o"))
            .key(self.keys.group(a, group, ":q"))
            .arg(name)
            .arg(delay);
        for s in sequences {
            inv.arg(*s);
        }
        let reply: Value = inv
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let Value::Array(items) = reply else {
            return Err(protocol("settle"));
        };
        let mut it = items.into_iter();
        let not_acked = |reason: &str| BrokerError::NotAcknowledged {
            group: group.to_string(),
            reason: reason.to_string(),
        };
        match it.next().as_ref().and_then(text).as_deref() {
            Some("ok") => {}
            Some("nogroup") => return Err(not_acked("no such group on this address")),
            Some("noack") => {
                return Err(not_acked(
                    "has no acknowledgements (create it with ack_wait)",
                ))
            }
            _ => return Err(protocol("settle")),
        }
        let dlq = it.next().as_ref().and_then(text).unwrap_or_default();
        let acked = it
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| protocol("settle"))?;
        self.metrics.acked.inc_by(u64::try_from(acked).unwrap_or(0));
        let n = it
            .next()
            .as_ref()
            .and_then(int)
            .ok_or_else(|| protocol("settle"))?;
        let mut not_pending = Vec::new();
        for _ in 0..n {
            let s = it
                .next()
                .as_ref()
                .and_then(int)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| protocol("settle"))?;
            not_pending.push(s);
        }
        let dead = triples(address, &mut it, "settle")?;
        self.metrics.dead_lettered.inc_by(dead.len() as u64);
        Ok((not_pending, dead_letters(group, &dlq, dead)))
    }

    /// DeleteGroup.
    ///
    /// # Errors
    /// `NOT_FOUND` for an unknown group; `UNAVAILABLE` when Redis cannot be reached.
    pub async fn delete_group(&self, address: &str, group: &str) -> Result<(), BrokerError> {
        let n: i64 = self
            .scripts
            .delete_group
            .key(self.keys.group(address, group, ""))
            .key(self.keys.group(address, group, ":l"))
            .key(self.keys.group(address, group, ":n"))
            .key(self.keys.group(address, group, ":o"))
            .key(self.keys.of(address, "groups"))
            .key(self.keys.group(address, group, ":q"))
            .arg(group)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        if n == 0 {
            return Err(BrokerError::NoSuchGroup {
                address: address.to_string(),
                group: group.to_string(),
            });
        }
        Ok(())
    }

    /// DeleteAddress: removes its stream, groups and dedup ids. Returns how many messages were
    /// purged, `None` if it did not exist.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn delete_address(&self, address: &str) -> Result<Option<usize>, BrokerError> {
        let mut conn = self.conn();
        let (len, exists, groups): (usize, bool, Vec<String>) = redis::pipe()
            .cmd("XLEN")
            .arg(self.keys.stream(address))
            .cmd("EXISTS")
            .arg(self.keys.meta(address))
            .cmd("SMEMBERS")
            .arg(self.keys.of(address, "groups"))
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        if !exists {
            return Ok(None);
        }
        let mut del = redis::cmd("DEL");
        for k in ["s", "m", "dh", "dz", "groups"] {
            del.arg(self.keys.of(address, k));
        }
        for g in &groups {
            for suffix in ["", ":l", ":n", ":o", ":q"] {
                del.arg(self.keys.group(address, g, suffix));
            }
        }
        // Two commands, not one pipeline: on a cluster the set of addresses has a slot of its
        // own.
        del.query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        redis::cmd("SREM")
            .arg(self.keys.addresses())
            .arg(address)
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| unavailable(&e))?;
        self.registered.remove(address);
        Ok(Some(len))
    }

    /// One address's figures and, with `with_groups`, its groups'; `None` if unknown.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn address_info(
        &self,
        address: &str,
        with_groups: bool,
    ) -> Result<Option<(AddressInfo, Vec<GroupInfo>)>, BrokerError> {
        let reply: Vec<Value> = self
            .scripts
            .info
            .key(self.keys.stream(address))
            .key(self.keys.meta(address))
            .key(self.keys.of(address, "groups"))
            .arg(if with_groups { "1" } else { "0" })
            .arg(self.keys.of(address, "g:"))
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let num = |v: Option<&Value>| -> Result<u64, BrokerError> {
            v.and_then(int)
                .and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| protocol("info"))
        };
        if num(reply.first())? == 0 {
            return Ok(None);
        }
        let first = num(reply.get(3))?;
        let last = num(reply.get(4))?;
        let info = AddressInfo {
            address: address.to_string(),
            retained_messages: usize::try_from(num(reply.get(1))?).unwrap_or(usize::MAX),
            retained_bytes: usize::try_from(num(reply.get(2))?).unwrap_or(usize::MAX),
            first_sequence: first,
            last_sequence: last,
            subscribers: self.feeds.get(address).map_or(0, |f| f.subscribers()),
            groups: usize::try_from(num(reply.get(5))?).unwrap_or(0),
            disk_bytes: 0,
        };
        let mut groups = Vec::new();
        for g in reply.get(6..).unwrap_or(&[]).chunks_exact(9) {
            let next = num(g.get(1))?;
            let wait = num(g.get(3))?;
            let dlq = g.get(6).and_then(text).unwrap_or_default();
            let from = if first == 0 { last + 1 } else { first };
            groups.push(GroupInfo {
                group: g.first().and_then(text).unwrap_or_default(),
                next_sequence: next.max(from),
                lag: (last + 1).saturating_sub(next.max(from)),
                dropped: from.saturating_sub(next),
                pending: num(g.get(2))?,
                redelivered: num(g.get(7))?,
                dead_lettered: num(g.get(8))?,
                ack: (wait > 0).then(|| AckPolicy {
                    ack_wait: Duration::from_millis(wait),
                    max_deliveries: u32::try_from(num(g.get(4)).unwrap_or(0)).unwrap_or(0),
                    dead_letter: (!dlq.is_empty()).then(|| Address::checked(dlq)),
                    max_ack_pending: u32::try_from(num(g.get(5)).unwrap_or(0)).unwrap_or(0),
                }),
            });
        }
        groups.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(Some((info, groups)))
    }

    /// Addresses starting with `prefix` and sorting after `after`, in name order, at most
    /// `limit`; and the name to continue after when more remain.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn list_addresses(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<(Vec<AddressInfo>, Option<String>), BrokerError> {
        let mut names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.addresses())
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        names.retain(|n| n.starts_with(prefix) && n.as_str() > after);
        names.sort();
        let more = names.len() > limit;
        names.truncate(limit);
        let mut out = Vec::with_capacity(names.len());
        for n in &names {
            if let Some((info, _)) = self.address_info(n, false).await? {
                out.push(info);
            }
        }
        let next = if more { names.last().cloned() } else { None };
        Ok((out, next))
    }

    /// Addresses this node follows now.
    pub fn followed(&self) -> usize {
        self.feeds.len()
    }

    /// Local subscribers on `address`.
    pub fn subscribers(&self, address: &str) -> usize {
        self.feeds.get(address).map_or(0, |f| f.subscribers())
    }

    /// Recv calls waiting on `address` on this node.
    pub fn waiters(&self, address: &str) -> usize {
        self.feeds.get(address).map_or(0, |f| f.waiters())
    }

    /// One age-retention pass over every address (`--retention-age`): trims messages older
    /// than the bound from the front. Returns how many were removed.
    ///
    /// # Errors
    /// `UNAVAILABLE` when Redis cannot be reached.
    pub async fn evict_aged(&self) -> Result<usize, BrokerError> {
        if self.limits.retention_age.is_zero() {
            return Ok(0);
        }
        let names: Vec<String> = redis::cmd("SMEMBERS")
            .arg(self.keys.addresses())
            .query_async(&mut self.conn())
            .await
            .map_err(|e| unavailable(&e))?;
        let cutoff = SystemTime::now()
            .checked_sub(self.limits.retention_age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut total = 0;
        for n in names {
            let removed: usize = Script::new(AGE_TRIM)
                .key(self.keys.stream(&n))
                .key(self.keys.meta(&n))
                .arg(cutoff)
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| unavailable(&e))?;
            total += removed;
        }
        Ok(total)
    }
}

/// Trims entries whose `t` is before ARGV[1] (µs) from the front of KEYS[1] (`t` never
/// decreases, so the cut is found by binary search), keeping the byte count in KEYS[2].
/// Returns how many were removed.
const AGE_TRIM: &str = r"
local m = redis.call('HMGET', KEYS[2], 'seq', 'cum')
local last = tonumber(m[1] or '0')
local cum = tonumber(m[2] or '0')
local len = redis.call('XLEN', KEYS[1])
if len == 0 then return 0 end
local oldest = last - len + 1
local function field(s, name)
  local e = redis.call('XRANGE', KEYS[1], string.format('%d-0', s), string.format('%d-0', s))
  local f = e[1][2]
  for q = 1, #f, 2 do
    if f[q] == name then return tonumber(f[q + 1]) end
  end
  return 0
end
local want = tonumber(ARGV[1])
local lo, hi = oldest, last + 1
while lo < hi do
  local mid = math.floor((lo + hi) / 2)
  if field(mid, 't') < want then lo = mid + 1 else hi = mid end
end
if lo == oldest then return 0 end
local bytes = 0
if lo <= last then bytes = cum - (field(lo, 'c') - field(lo, 'z')) end
redis.call('XTRIM', KEYS[1], 'MINID', string.format('%d-0', lo))
redis.call('HSET', KEYS[2], 'bytes', bytes)
return lo - oldest
";
/// TCP_NODELAY on every connection to Redis: a script's request must not wait for the
/// previous reply's ACK (Nagle's algorithm), which left the broker idle half the time.
fn tcp() -> redis::io::tcp::TcpSettings {
    redis::io::tcp::TcpSettings::default().set_nodelay(true)
}

/// What each of `n` messages became, from the append script's compact reply `[d, (index,
/// sequence) * d, first, sent_at]` (see `scripts::SEND`): the duplicates at their indexes, the
/// others consecutive from `first`. `None` if the reply does not fit `n`.
fn expand_reply(reply: &[u64], n: usize) -> Option<Vec<Appended>> {
    let d = usize::try_from(*reply.first()?).ok()?;
    if reply.len() != 2 * d + 3 || d > n {
        return None;
    }
    let (dups, tail) = reply[1..].split_at(2 * d);
    let mut next = tail[0];
    let mut dups = dups.chunks_exact(2).peekable();
    let mut out = Vec::with_capacity(n);
    for i in 0..n as u64 {
        if let Some(&[_, sequence]) = dups.next_if(|p| p[0] == i) {
            out.push(Appended {
                sequence,
                duplicate: true,
            });
        } else {
            out.push(Appended {
                sequence: next,
                duplicate: false,
            });
            next += 1;
        }
    }
    // Every duplicate index named a message of the batch, in order.
    dups.next().is_none().then_some(out)
}

fn start_args(start: StartAt) -> (&'static str, u64) {
    match start {
        StartAt::End => ("end", 0),
        StartAt::Sequence(n) => ("seq", n),
        StartAt::Time(t) => (
            "time",
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        ),
    }
}

fn dead_letters(group: &str, dlq: &str, dead: Vec<(Arc<Message>, u32)>) -> Vec<DeadLetter> {
    dead.into_iter()
        .map(|(message, deliveries)| DeadLetter {
            message,
            group: group.to_string(),
            deliveries,
            // Empty: no dead-letter address; the broker only counts it.
            to: Address::checked(dlq.to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::expand_reply;

    fn pairs(reply: &[u64], n: usize) -> Option<Vec<(u64, bool)>> {
        expand_reply(reply, n).map(|v| v.iter().map(|a| (a.sequence, a.duplicate)).collect())
    }

    #[test]
    fn a_compact_reply_expands_to_one_answer_per_message() {
        // No duplicates: 3 messages stored from 7; sent_at last.
        assert_eq!(
            pairs(&[0, 7, 99], 3),
            Some(vec![(7, false), (8, false), (9, false)])
        );
        // Messages 0 and 2 of 4 matched sequences 3 and 5; the others were stored as 10, 11.
        assert_eq!(
            pairs(&[2, 0, 3, 2, 5, 10, 99], 4),
            Some(vec![(3, true), (10, false), (5, true), (11, false)])
        );
        // All duplicates: `first` is 0 and unused.
        assert_eq!(pairs(&[1, 0, 4, 0, 99], 1), Some(vec![(4, true)]));
    }

    #[test]
    fn a_reply_that_does_not_fit_the_batch_is_refused() {
        assert_eq!(pairs(&[], 1), None);
        assert_eq!(pairs(&[0, 7], 1), None, "no sent_at");
        assert_eq!(pairs(&[1, 5, 3, 7, 99], 2), None, "index past the batch");
        assert_eq!(
            pairs(&[2, 1, 3, 0, 4, 7, 99], 2),
            None,
            "indexes out of order"
        );
        assert_eq!(
            pairs(&[3, 0, 1, 1, 2, 2, 3, 7, 99], 2),
            None,
            "more duplicates than messages"
        );
    }
}
