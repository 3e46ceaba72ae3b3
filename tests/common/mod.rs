//! Shared test harness: a real broker on 127.0.0.1:0, reached through the generated client.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]
#![allow(unreachable_pub, reason = "a test-only module shared by test binaries")]

pub mod pki;
pub mod prereq;
pub mod redis;

use std::{future::Future, net::SocketAddr, time::Duration};

use switchboard::{
    config::{Limits, ServerConfig},
    grpc::server::{self, ServerError},
    pb::{
        admin_client::AdminClient, broker_client::BrokerClient, subscribe_response::Event,
        RecvRequest, RecvResponse, SendRequest, SubscribeRequest, SubscribeResponse,
    },
    Broker,
};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::{transport::Channel, Streaming};

/// Upper bound for any single await in a test, so a bug fails instead of hanging: 20 s, or
/// `SWITCHBOARD_TEST_STEP_SECS` (scripts/redis-suites raises it: on the Redis engine a debug
/// build's 10,000 unary Sends with 8 long-polling workers take ~20 s on 2 cores). A liveness
/// bound, not a performance assertion.
pub fn step_limit() -> Duration {
    static LIMIT: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("SWITCHBOARD_TEST_STEP_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(Duration::from_secs(20), Duration::from_secs)
    })
}

/// A broker serving on a free loopback port, in this process (so tests can read its counters).
pub struct TestServer {
    pub addr: SocketAddr,
    /// Where `/metrics` is served.
    pub metrics_addr: SocketAddr,
    pub broker: Broker,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    pub async fn start() -> Self {
        Self::with_limits(Limits::default()).await
    }

    /// Binds first, then spawns: connects wait in the backlog, so no sleep is needed.
    pub async fn with_limits(limits: Limits) -> Self {
        Self::with_config(ServerConfig {
            limits,
            ..ServerConfig::default()
        })
        .await
    }

    /// A broker with default limits and `security` (an auth file, TLS).
    pub async fn with_security(security: switchboard::config::Security) -> Self {
        Self::with_config(ServerConfig {
            security,
            ..ServerConfig::default()
        })
        .await
    }

    /// A node of the Redis engine on `redis` (several with the same config act as one broker).
    pub async fn with_redis(
        limits: Limits,
        redis: &switchboard::engine::redis::RedisConfig,
    ) -> Self {
        limits.validate().expect("test limits are valid");
        let broker = Broker::with_redis(limits.clone(), redis)
            .await
            .expect("redis engine");
        Self::serve(
            ServerConfig {
                limits,
                ..ServerConfig::default()
            },
            broker,
        )
        .await
    }

    pub async fn with_config(config: ServerConfig) -> Self {
        let limits = config.limits.clone();
        limits.validate().expect("test limits are valid");
        let broker = match std::env::var("SWITCHBOARD_TEST_REDIS_URL") {
            // The whole suite on the Redis engine (scripts/redis-suites): each server its own
            // namespace on the one Redis, so tests running at once never share an address.
            Ok(url) if config.storage.is_none() => {
                Broker::with_redis(limits.clone(), &redis::config(&url, &redis::namespace()))
                    .await
                    .expect("redis engine on SWITCHBOARD_TEST_REDIS_URL")
            }
            _ => Broker::new(limits.clone()),
        };
        Self::serve(config, broker).await
    }

    /// Serves `broker` on a free loopback port.
    pub async fn serve(config: ServerConfig, broker: Broker) -> Self {
        let (listener, addr) = server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind 127.0.0.1:0");
        let (metrics, metrics_addr) = server::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("bind metrics on 127.0.0.1:0");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(server::run_with_http(
            listener,
            Some(metrics),
            broker.clone(),
            config,
            async {
                let _ = stopped.await;
            },
        ));
        Self {
            addr,
            metrics_addr,
            broker,
            stop,
            task,
        }
    }

    /// Messages `address` retains now, read the way Admin reads it (so also on the Redis
    /// engine, where the figure lives in Redis).
    pub async fn retained(&self, address: &str) -> usize {
        self.broker
            .inspect(address, false)
            .await
            .expect("inspect")
            .map_or(0, |(info, _)| info.retained_messages)
    }

    /// Whether the broker holds `address`, read the way Admin reads it.
    pub async fn exists(&self, address: &str) -> bool {
        self.broker
            .inspect(address, false)
            .await
            .expect("inspect")
            .is_some()
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect admin client")
    }

    /// Scrapes `/metrics` (plain HTTP/1.0 over a TCP stream) into `name{labels}` → value.
    pub async fn scrape(&self) -> std::collections::HashMap<String, f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(self.metrics_addr)
            .await
            .expect("metrics");
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .await
            .unwrap();
        let mut text = String::new();
        step("scrape", conn.read_to_string(&mut text))
            .await
            .unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("http response");
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("application/openmetrics-text"),
            "{head}"
        );
        body.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect()
    }

    pub async fn client(&self) -> BrokerClient<Channel> {
        BrokerClient::connect(format!("http://{}", self.addr))
            .await
            .expect("connect to test server")
            .max_decoding_message_size(128 * 1024 * 1024)
            .max_encoding_message_size(128 * 1024 * 1024)
    }

    /// Triggers shutdown and asserts the server stopped cleanly.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let r = tokio::time::timeout(step_limit(), self.task)
            .await
            .expect("server stops within the step timeout")
            .expect("server task did not panic");
        assert!(r.is_ok(), "server returned {r:?}");
    }
}

/// Awaits `f` with the step timeout.
pub async fn step<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(step_limit(), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Polls `cond` until it holds or `step_limit()` passes (for library counters that have no signal).
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + step_limit();
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub async fn send(client: &mut BrokerClient<Channel>, address: &str, payload: &[u8]) -> u64 {
    client
        .send(SendRequest {
            address: address.into(),
            payload: payload.to_vec().into(),
            headers: Default::default(),
            message_id: String::new(),
        })
        .await
        .expect("send succeeds")
        .into_inner()
        .sequence
}

pub async fn recv(
    client: &mut BrokerClient<Channel>,
    address: &str,
    group: &str,
    max_messages: u32,
    wait: Duration,
) -> RecvResponse {
    step(
        "recv",
        client.recv(RecvRequest {
            address: address.into(),
            group: group.into(),
            max_messages,
            wait: Some(prost_types::Duration::try_from(wait).expect("wait fits")),
            max_bytes: 0,
        }),
    )
    .await
    .expect("recv succeeds")
    .into_inner()
}

/// Subscribes; returns once the server has registered the subscriber (response headers seen).
pub async fn subscribe(
    client: &mut BrokerClient<Channel>,
    address: &str,
    group: &str,
) -> Streaming<SubscribeResponse> {
    step(
        "subscribe",
        client.subscribe(SubscribeRequest {
            address: address.into(),
            group: group.into(),
            ..Default::default()
        }),
    )
    .await
    .expect("subscribe succeeds")
    .into_inner()
}

/// The next event of a stream, which must exist.
pub async fn next_event(stream: &mut Streaming<SubscribeResponse>) -> Event {
    step("next event", stream.message())
        .await
        .expect("stream ok")
        .expect("stream open")
        .event
        .expect("event set")
}

/// A `switchboard serve` process of our own (the real binary), on 127.0.0.1 with a free port.
pub struct BrokerProcess {
    pub child: tokio::process::Child,
    /// `host:port` it listens on.
    pub addr: String,
    /// The rest of its stderr (text logs).
    pub logs: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
}

impl BrokerProcess {
    /// Starts the binary with `serve --listen 127.0.0.1:0` plus `args`, and waits for the
    /// start-up line that says where it listens.
    pub async fn start(args: &[&str]) -> Self {
        Self::start_logged(args).await.0
    }

    /// [`BrokerProcess::start`], also returning the log lines printed before the start-up line
    /// (recovery's reports, with `--data-dir`).
    pub async fn start_logged(args: &[&str]) -> (Self, Vec<String>) {
        use tokio::io::AsyncBufReadExt;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "switchboard=info")
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start switchboard serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let mut logs = tokio::io::BufReader::new(stderr).lines();
        let mut early = Vec::new();
        let addr = loop {
            let line = step("start line", logs.next_line())
                .await
                .expect("read stderr")
                .unwrap_or_else(|| panic!("broker exited before listening: {early:#?}"));
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_string();
            }
            early.push(line);
        };
        (Self { child, addr, logs }, early)
    }
}

impl BrokerProcess {
    /// The HTTP listener's address (console and `/metrics`), from its start-up line (started
    /// with `--http-listen 127.0.0.1:0` or its older name `--metrics-listen`).
    pub async fn metrics_addr(&mut self) -> String {
        loop {
            let line = step("metrics line", self.logs.next_line())
                .await
                .expect("read stderr")
                .expect("broker exited before its metrics line");
            if line.contains("console at") {
                if let Some(rest) = line.split("listen=").nth(1) {
                    return rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                }
            }
        }
    }
}

/// Sends SIGTERM to a child process of ours, by its PID.
pub fn sigterm(child: &tokio::process::Child) {
    let pid = child.id().expect("still running").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM {pid}");
}

/// GET /metrics over plain HTTP/1.0 from the HTTP listener at `addr`: the whole response.
pub async fn metrics_text(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    step("metrics", s.read_to_string(&mut body)).await.unwrap();
    body
}

/// The names of `address`'s groups, as GetAddress reports them (any engine); empty if the
/// address does not exist.
pub async fn group_names(server: &TestServer, address: &str) -> Vec<String> {
    server
        .broker
        .inspect(address, true)
        .await
        .expect("inspect")
        .map(|(_, g)| g.into_iter().map(|g| g.group).collect())
        .unwrap_or_default()
}
