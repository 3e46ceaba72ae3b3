//! `switchboard-bench`: measures a switchboard broker over real gRPC on loopback, next to a
//! ceiling (a bare tonic server of ours with no registry) measured in the same run, and prints
//! each figure with its ratio to the ceiling. Both servers run as separate processes.
//!
//! ```text
//! cargo build --release && target/release/switchboard-bench          # full run, a few minutes
//! target/release/switchboard-bench --quick                           # every workload, tiny
//! ```
//!
//! Workloads: W1 throughput (1→1, 128 B; unary ×1, unary ×64 in flight, SendStream), W2 fan-out
//! (1→16), W3 large payloads (1 MiB, 1→4 and 1→64, MB/s and the broker's peak RSS), W4 latency
//! (5,000 msg/s for 5 s), W5 work queue (4 Recv workers, `max_messages` 1 and 100), W6 scale
//! (memory per idle address and per idle subscriber). See BENCHMARKS.md.

mod ceiling;
mod cpu;
mod disk;
mod lean;
mod redis;
mod soak;

use std::{
    error::Error,
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use switchboard::pb::{
    broker_client::BrokerClient, subscribe_response::Event, RecvRequest, SendRequest,
    SubscribeRequest,
};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
    sync::mpsc,
};
use tonic::transport::{Channel, Endpoint};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Measure the broker against a ceiling, in the same run.
#[derive(Debug, Parser)]
#[command(name = "switchboard-bench", version, about)]
struct Args {
    /// Run every workload tiny (seconds in all): proves the tool works, measures nothing.
    #[arg(long)]
    quick: bool,
    /// The broker binary; default: `switchboard` beside this executable.
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// Only these workloads (W1..W10; W1a, W1b, W1c for one W1 variant), comma-separated. W9 is
    /// the disk engine (`--data-dir` in a scratch directory under $TMPDIR); W10 the Redis
    /// engine (a `redis-server` started on a free loopback port; skipped without one).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Runs of each W1/W2 figure (broker and ceiling alternating); the median is printed.
    /// Default: 3, or 1 with --quick.
    #[arg(long)]
    repeat: Option<usize>,
    /// Instead of the benchmark: a mixed soak workload for this many seconds (see
    /// `scripts/soak`), exiting non-zero if anything retention promised was lost.
    #[arg(long, value_name = "SECS")]
    soak: Option<u64>,
    /// Compare with another broker binary (e.g. the previous release) instead of the ceiling:
    /// W1 and W2 alternate this broker and that one in the same run; the ratio column is this
    /// broker / that one. Other workloads are skipped.
    #[arg(long, value_name = "PATH")]
    compare_bin: Option<PathBuf>,
    /// Internal: serve the ceiling and print its address.
    #[arg(long, hide = true)]
    serve_ceiling: bool,
}

/// Message counts for one run size.
struct Sizes {
    w1_unary1: u64,
    w1_unary64: u64,
    w1_stream: u64,
    w2: u64,
    w3: u64,
    w4_secs: f64,
    w5_one: u64,
    w5_batch: u64,
    w6_addresses: u64,
    w6_subscribers: u64,
    w7_patterns: u64,
}

const FULL: Sizes = Sizes {
    w1_unary1: 20_000,
    w1_unary64: 200_000,
    w1_stream: 500_000,
    w2: 100_000,
    w3: 100,
    w4_secs: 5.0,
    w5_one: 20_000,
    w5_batch: 60_000, // below the default 65,536-message retention window
    w6_addresses: 100_000,
    w6_subscribers: 10_000,
    w7_patterns: 10_000,
};

const QUICK: Sizes = Sizes {
    w1_unary1: 200,
    w1_unary64: 1_280,
    w1_stream: 2_000,
    w2: 500,
    w3: 4,
    w4_secs: 0.3,
    w5_one: 200,
    w5_batch: 2_000,
    w6_addresses: 1_000,
    w6_subscribers: 200,
    w7_patterns: 200,
};

/// A server process we started; killed (by its PID, through the handle) when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    async fn broker(bin: &PathBuf) -> Res<Self> {
        Self::broker_with(bin, &[]).await
    }

    /// The broker with extra `serve` flags (`--data-dir ...`).
    async fn broker_with(bin: &PathBuf, extra: &[&str]) -> Res<Self> {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "switchboard=info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let addr = read_addr(stderr, "listen=").await?;
        Ok(Self { child, addr })
    }

    async fn ceiling() -> Res<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--serve-ceiling")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let addr = read_addr(stdout, "listening ").await?;
        Ok(Self { child, addr })
    }

    /// A `VmRSS` / `VmHWM` figure of the process, in bytes.
    fn mem(&self, field: &str) -> Res<u64> {
        let pid = self.child.id().ok_or("process gone")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .ok_or_else(|| format!("{field} not in /proc/{pid}/status"))?;
        let kib: u64 = line
            .split_whitespace()
            .nth(1)
            .ok_or("bad status line")?
            .parse()?;
        Ok(kib * 1024)
    }

    /// SIGKILLs the process and waits until it is gone (its data directory's lock released).
    async fn kill(mut self) -> Res<()> {
        self.child.kill().await?;
        Ok(())
    }

    async fn client(&self) -> Res<BrokerClient<Channel>> {
        client(self.addr).await
    }
}

/// Reads lines until one contains `marker` followed by an address; the rest is drained.
async fn read_addr(
    pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    marker: &str,
) -> Res<SocketAddr> {
    let mut lines = BufReader::new(pipe).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .map_err(|_| "server did not report its address in 20 s")??
            .ok_or("server exited before reporting its address")?;
        if let Some(rest) = line.split(marker).nth(1) {
            let addr: SocketAddr = rest
                .split(|c: char| c.is_whitespace() || c == '\u{1b}')
                .next()
                .unwrap_or_default()
                .parse()?;
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            return Ok(addr);
        }
    }
}

async fn client(addr: SocketAddr) -> Res<BrokerClient<Channel>> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    Ok(BrokerClient::new(channel)
        .max_decoding_message_size(80 * 1024 * 1024)
        .max_encoding_message_size(80 * 1024 * 1024))
}

fn request(address: &str, payload: &bytes::Bytes) -> SendRequest {
    SendRequest {
        address: address.to_string(),
        payload: payload.clone(),
        headers: Default::default(),
        message_id: String::new(),
    }
}

/// What a subscriber saw.
struct Seen {
    messages: u64,
    dropped: u64,
    last: Instant,
}

/// Opens `count` subscriptions (each on its own connection) and waits until each is registered.
/// Each task reads until it has accounted for `expect` messages (received or dropped).
async fn subscribers(
    addr: SocketAddr,
    address: &str,
    count: usize,
    expect: u64,
) -> Res<Vec<tokio::task::JoinHandle<Res<Seen>>>> {
    let mut tasks = Vec::new();
    for _ in 0..count {
        let mut c = client(addr).await?;
        let mut stream = c
            .subscribe(SubscribeRequest {
                address: address.into(),
                group: String::new(),
                ..Default::default()
            })
            .await?
            .into_inner();
        tasks.push(tokio::spawn(async move {
            let _keep = c;
            let mut seen = Seen {
                messages: 0,
                dropped: 0,
                last: Instant::now(),
            };
            while seen.messages + seen.dropped < expect {
                let r = tokio::time::timeout(Duration::from_secs(60), stream.message())
                    .await
                    .map_err(|_| "subscriber stalled for 60 s")??
                    .ok_or("stream ended early")?;
                match r.event {
                    Some(Event::Message(_)) => seen.messages += 1,
                    Some(Event::Dropped(d)) => seen.dropped += d.count,
                    None => {}
                }
            }
            seen.last = Instant::now();
            Ok(seen)
        }));
    }
    Ok(tasks)
}

/// Sends `n` messages with unary Send, `inflight` at a time.
async fn publish_unary(
    c: &BrokerClient<Channel>,
    address: &str,
    n: u64,
    inflight: u64,
    payload: &bytes::Bytes,
) -> Res<()> {
    let mut tasks = Vec::new();
    for k in 0..inflight {
        let mut c = c.clone();
        let (address, payload) = (address.to_string(), payload.clone());
        let share = n / inflight + u64::from(k < n % inflight);
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                c.send(request(&address, &payload)).await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// Sends `n` messages over one SendStream; returns once every response came back.
async fn publish_stream(
    c: &BrokerClient<Channel>,
    address: &str,
    n: u64,
    payload: &bytes::Bytes,
) -> Res<()> {
    let req = request(address, payload);
    let requests = futures_util::stream::iter((0..n).map(move |_| req.clone()));
    let mut responses = c.clone().send_stream(requests).await?.into_inner();
    let mut got = 0;
    while let Some(r) = responses.next().await {
        if let Some(e) = r?.error {
            return Err(format!("send refused: {}", e.message).into());
        }
        got += 1;
    }
    if got != n {
        return Err(format!("{got} responses for {n} sends").into());
    }
    Ok(())
}

/// Sends `n` messages in SendBatch calls of `size`, 16 calls in flight.
async fn publish_batches(
    c: &BrokerClient<Channel>,
    address: &str,
    n: u64,
    size: u64,
    payload: &bytes::Bytes,
) -> Res<()> {
    let batches = n.div_ceil(size.max(1));
    let calls = futures_util::stream::iter((0..batches).map(|b| {
        let mut c = c.clone();
        let count = size.min(n - b * size);
        let request = switchboard::pb::SendBatchRequest {
            address: address.into(),
            messages: (0..count)
                .map(|_| switchboard::pb::BatchMessage {
                    payload: payload.clone(),
                    ..Default::default()
                })
                .collect(),
        };
        async move {
            c.send_batch(request)
                .await
                .map(|r| r.into_inner().results.len())
        }
    }))
    .buffered(16);
    let mut got = 0u64;
    futures_util::pin_mut!(calls);
    while let Some(r) = calls.next().await {
        got += r? as u64;
    }
    if got != n {
        return Err(format!("{got} results for {n} sends").into());
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Publish {
    Unary(u64),
    /// Unary Sends this many in flight, from the lean `h2` client (`lean.rs`).
    UnaryLean(u64),
    Stream,
    /// SendBatch calls of this many messages.
    Batch(u64),
}

/// One publisher → `subs` subscribers: returns (deliveries per second, messages dropped).
async fn throughput(
    server: &Server,
    subs: usize,
    n: u64,
    payload_len: usize,
    how: Publish,
) -> Res<(f64, u64)> {
    throughput_via(server, "bench.w", subs, n, payload_len, how).await
}

/// [`throughput`], with the subscribers subscribed to `sub_address` (an address, or a pattern
/// matching `bench.w`).
async fn throughput_via(
    server: &Server,
    sub_address: &str,
    subs: usize,
    n: u64,
    payload_len: usize,
    how: Publish,
) -> Res<(f64, u64)> {
    let address = "bench.w";
    let tasks = subscribers(server.addr, sub_address, subs, n).await?;
    let c = server.client().await?;
    let payload = bytes::Bytes::from(vec![0xabu8; payload_len]);
    let start = Instant::now();
    match how {
        Publish::Unary(inflight) => publish_unary(&c, address, n, inflight, &payload).await?,
        Publish::UnaryLean(inflight) => {
            lean::publish_unary(server.addr, address, n, inflight, &payload).await?;
        }
        Publish::Stream => publish_stream(&c, address, n, &payload).await?,
        Publish::Batch(size) => publish_batches(&c, address, n, size, &payload).await?,
    }
    let mut last = start;
    let mut delivered = 0;
    let mut dropped = 0;
    for t in tasks {
        let seen = t.await??;
        last = last.max(seen.last);
        delivered += seen.messages;
        dropped += seen.dropped;
    }
    let secs = (last - start).as_secs_f64().max(1e-9);
    Ok((delivered as f64 / secs, dropped))
}

/// Opens `n` pattern subscriptions that match nothing the benchmark sends (500 per
/// connection); they stay open while the returned handles live.
async fn open_patterns(
    server: &Server,
    n: u64,
) -> Res<
    Vec<(
        BrokerClient<Channel>,
        Vec<tonic::Streaming<switchboard::pb::SubscribeResponse>>,
    )>,
> {
    let mut held = Vec::new();
    let per_conn = 500;
    for conn in 0..n.div_ceil(per_conn) {
        let c = server.client().await?;
        let mut streams = Vec::new();
        for k in 0..per_conn.min(n - conn * per_conn) {
            let mut c2 = c.clone();
            streams.push(
                c2.subscribe(SubscribeRequest {
                    address: format!("w7.none.{conn}.{k}.>"),
                    ..Default::default()
                })
                .await?
                .into_inner(),
            );
        }
        held.push((c, streams));
    }
    Ok(held)
}

/// Paced publishing at `rate`/s for `secs`, 1→1, 128 B: send-to-receive latency in µs.
async fn latency(server: &Server, rate: f64, secs: f64) -> Res<Histogram<u64>> {
    let address = "bench.latency";
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a small positive message count"
    )]
    let n = (rate * secs).round() as u64;
    let epoch = Instant::now();
    let mut sub_client = server.client().await?;
    let mut stream = sub_client
        .subscribe(SubscribeRequest {
            address: address.into(),
            group: String::new(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let reader = tokio::spawn(async move {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut seen = 0;
        while seen < n {
            let r = tokio::time::timeout(Duration::from_secs(30), stream.message())
                .await
                .map_err(|_| "latency subscriber stalled")??
                .ok_or("stream ended")?;
            match r.event {
                Some(Event::Message(m)) => {
                    let sent = u64::from_le_bytes(m.payload[..8].try_into()?);
                    let now = micros_since(epoch);
                    h.record(now.saturating_sub(sent).max(1))?;
                    seen += 1;
                }
                Some(Event::Dropped(d)) => seen += d.count,
                None => {}
            }
        }
        Ok::<_, Box<dyn Error + Send + Sync>>(h)
    });
    let (tx, rx) = mpsc::channel::<SendRequest>(1024);
    let c = server.client().await?;
    let sender = tokio::spawn(async move {
        let mut responses = c
            .clone()
            .send_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        while let Some(r) = responses.next().await {
            r?;
        }
        Ok::<_, tonic::Status>(())
    });
    let period = Duration::from_secs_f64(1.0 / rate);
    let start = Instant::now();
    for i in 0..n {
        let due = start + period.mul_f64(i as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        let mut payload = vec![0u8; 128];
        payload[..8].copy_from_slice(&micros_since(epoch).to_le_bytes());
        tx.send(SendRequest {
            address: address.into(),
            payload: payload.into(),
            headers: Default::default(),
            message_id: String::new(),
        })
        .await?;
    }
    drop(tx);
    let h = reader.await??;
    sender.await??;
    Ok(h)
}

fn micros_since(epoch: Instant) -> u64 {
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `workers` Recv callers drain `n` pre-sent messages from one group: messages per second.
/// `workers` Recv callers drain `n` messages from one group, `max` at a time; with `ack`, the
/// group has an ack wait and each worker acknowledges every batch it took.
async fn work_queue(server: &Server, n: u64, workers: usize, max: u32, ack: bool) -> Res<f64> {
    let address = "bench.jobs";
    let mut c = server.client().await?;
    c.create_group(switchboard::pb::CreateGroupRequest {
        address: address.into(),
        group: "workers".into(),
        ack_wait: ack.then_some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        ..Default::default()
    })
    .await?;
    publish_stream(&c, address, n, &bytes::Bytes::from(vec![1u8; 128])).await?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let mut c = server.client().await?;
        tasks.push(tokio::spawn(async move {
            let mut got = 0u64;
            let mut acking: Option<tokio::task::JoinHandle<Result<(), tonic::Status>>> = None;
            loop {
                let r = c
                    .recv(RecvRequest {
                        address: address.into(),
                        group: "workers".into(),
                        max_messages: max,
                        wait: None,
                        max_bytes: 0,
                    })
                    .await?
                    .into_inner();
                if r.messages.is_empty() {
                    if let Some(previous) = acking.take() {
                        previous
                            .await
                            .map_err(|e| tonic::Status::internal(e.to_string()))??;
                    }
                    return Ok::<_, tonic::Status>(got);
                }
                got += r.messages.len() as u64;
                if ack {
                    // Ack this batch while the next Recv is in flight (one outstanding Ack per
                    // worker, as batching clients do).
                    if let Some(previous) = acking.take() {
                        previous
                            .await
                            .map_err(|e| tonic::Status::internal(e.to_string()))??;
                    }
                    let mut c = c.clone();
                    let request = switchboard::pb::AckRequest {
                        address: address.into(),
                        group: "workers".into(),
                        sequences: r.messages.iter().map(|m| m.sequence).collect(),
                    };
                    acking = Some(tokio::spawn(async move { c.ack(request).await.map(drop) }));
                }
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    if total != n {
        return Err(format!("work queue took {total} of {n}").into());
    }
    Ok(n as f64 / start.elapsed().as_secs_f64())
}

/// Memory per idle address (one 128 B message each) and per idle subscriber, in bytes.
async fn scale(server: &Server, addresses: u64, subs: u64) -> Res<(f64, f64)> {
    let c = server.client().await?;
    // Warm the connection and allocator a little before the baseline.
    publish_stream(&c, "bench.warm", 100, &bytes::Bytes::from(vec![0u8; 128])).await?;
    let before = server.mem("VmRSS:")?;
    let payload = bytes::Bytes::from(vec![0u8; 128]);
    let requests = futures_util::stream::iter((0..addresses).map(move |i| SendRequest {
        address: format!("bench.scale.{i}"),
        payload: payload.clone(),
        headers: Default::default(),
        message_id: String::new(),
    }));
    let mut responses = c.clone().send_stream(requests).await?.into_inner();
    while let Some(r) = responses.next().await {
        r?;
    }
    let after_addresses = server.mem("VmRSS:")?;
    let per_address = after_addresses.saturating_sub(before) as f64 / addresses as f64;

    // Idle subscribers: 100 streams per connection, each on its own address.
    let mut held = Vec::new();
    let per_conn = 100;
    for conn in 0..subs.div_ceil(per_conn) {
        let c = server.client().await?;
        for k in 0..per_conn.min(subs - conn * per_conn) {
            let mut c2 = c.clone();
            let stream = c2
                .subscribe(SubscribeRequest {
                    address: format!("bench.idle.{conn}.{k}"),
                    group: String::new(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            held.push(stream);
        }
        held.shrink_to_fit();
        std::mem::drop(c);
    }
    let after_subs = server.mem("VmRSS:")?;
    let per_sub = after_subs.saturating_sub(after_addresses) as f64 / subs as f64;
    drop(held);
    Ok((per_address, per_sub))
}

/// One printed figure.
struct Row {
    /// Stable key for the targets (`W1a`, `W3.rss.64`, ...).
    id: String,
    workload: &'static str,
    variant: String,
    unit: &'static str,
    broker: f64,
    ceiling: Option<f64>,
}

impl Row {
    fn ratio(&self) -> Option<f64> {
        self.ceiling.filter(|c| *c > 0.0).map(|c| self.broker / c)
    }

    fn print(&self) {
        let ceiling = self.ceiling.map_or("-".to_string(), fmt_num);
        let ratio = self.ratio().map_or("-".to_string(), |r| format!("{r:.2}"));
        println!(
            "{:<4} {:<34} {:>14} {:>14} {:>7}  {}",
            self.workload,
            self.variant,
            fmt_num(self.broker),
            ceiling,
            ratio,
            self.unit
        );
    }

    fn json(&self) -> String {
        serde_json::json!({
            "workload": self.workload,
            "variant": self.variant,
            "unit": self.unit,
            "broker": self.broker,
            "ceiling": self.ceiling,
            "ratio": self.ratio(),
        })
        .to_string()
    }
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 {
        let s = format!("{v:.0}");
        let mut out = String::new();
        for (i, ch) in s.chars().enumerate() {
            if i > 0 && (s.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(ch);
        }
        out
    } else {
        format!("{v:.2}")
    }
}

/// Runs `f` against a fresh broker and a fresh ceiling, alternating, `repeat` times; returns the
/// median of each (alternation spreads the machine's noise over both sides).
async fn pair<F, Fut>(
    bin: &PathBuf,
    compare: Option<&PathBuf>,
    repeat: usize,
    f: F,
) -> Res<(f64, f64)>
where
    F: Fn(Arc<Server>) -> Fut,
    Fut: std::future::Future<Output = Res<f64>>,
{
    let mut b = Vec::new();
    let mut c = Vec::new();
    for _ in 0..repeat.max(1) {
        let broker = Arc::new(Server::broker(bin).await?);
        b.push(f(Arc::clone(&broker)).await?);
        drop(broker);
        let other = match compare {
            Some(other) => Server::broker(other).await?,
            None => Server::ceiling().await?,
        };
        let other = Arc::new(other);
        c.push(f(Arc::clone(&other)).await?);
    }
    Ok((median(&mut b), median(&mut c)))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn wants(args: &Args, w: &str) -> bool {
    args.only.is_empty() || args.only.iter().any(|o| o.eq_ignore_ascii_case(w))
}

#[tokio::main]
async fn main() -> Res<()> {
    let args = Args::parse();
    if args.serve_ceiling {
        return ceiling::serve().await.map_err(|e| e.to_string().into());
    }
    let bin = match &args.broker_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("no parent dir")?
            .join("switchboard"),
    };
    if let Some(secs) = args.soak {
        return if soak::run(&bin, secs.clamp(1, 600)).await? {
            Ok(())
        } else {
            Err("soak found a problem (see above)".into())
        };
    }
    let s = if args.quick { &QUICK } else { &FULL };
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 });
    let against = args.compare_bin.as_ref().map_or_else(
        || "ceiling (bare tonic + broadcast)".to_string(),
        |b| format!("broker {}", b.display()),
    );
    println!(
        "switchboard-bench{}: broker {} vs {against}, loopback, {} cores",
        if args.quick { " --quick" } else { "" },
        bin.display(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let other = if args.compare_bin.is_some() {
        "compared"
    } else {
        "ceiling"
    };
    println!(
        "{:<4} {:<34} {:>14} {:>14} {:>7}  unit",
        "", "variant", "broker", other, "ratio"
    );
    let mut rows = Vec::new();
    let mut emit = |row: Row| {
        row.print();
        rows.push(row);
    };

    let w1 = [
        (
            "W1a",
            "1->1 128B unary, 1 in flight",
            s.w1_unary1,
            Publish::Unary(1),
        ),
        (
            "W1b",
            "1->1 128B unary, 64 in flight",
            s.w1_unary64,
            Publish::Unary(64),
        ),
        ("W1c", "1->1 128B SendStream", s.w1_stream, Publish::Stream),
    ];
    for (id, variant, n, how) in w1 {
        if !(wants(&args, "W1") || wants(&args, id)) {
            continue;
        }
        let (b, c) = pair(&bin, args.compare_bin.as_ref(), repeat, |srv| async move {
            Ok(throughput(&srv, 1, n, 128, how).await?.0)
        })
        .await?;
        emit(Row {
            id: id.into(),
            workload: "W1",
            variant: variant.into(),
            unit: "msgs/s",
            broker: b,
            ceiling: Some(c),
        });
    }
    if wants(&args, "W2") {
        let n = s.w2;
        let (b, c) = pair(&bin, args.compare_bin.as_ref(), repeat, |srv| async move {
            Ok(throughput(&srv, 16, n, 128, Publish::Stream).await?.0)
        })
        .await?;
        emit(Row {
            id: "W2".into(),
            workload: "W2",
            variant: "1->16 128B fan-out".into(),
            unit: "deliveries/s",
            broker: b,
            ceiling: Some(c),
        });
    }
    if args.compare_bin.is_some() {
        println!("(--compare-bin: W1 and W2 only; ratio = this broker / the compared one)");
        return Ok(());
    }
    if wants(&args, "W3") {
        for subs in [4usize, 64] {
            let n = s.w3;
            let broker = Server::broker(&bin).await?;
            let (rate, dropped) = throughput(&broker, subs, n, 1 << 20, Publish::Unary(1)).await?;
            let hwm = broker.mem("VmHWM:")?;
            drop(broker);
            let ceiling = Server::ceiling().await?;
            let (crate_, _) = throughput(&ceiling, subs, n, 1 << 20, Publish::Unary(1)).await?;
            let chwm = ceiling.mem("VmHWM:")?;
            drop(ceiling);
            let mb = |r: f64| r * (1u64 << 20) as f64 / 1e6;
            emit(Row {
                id: format!("W3.rate.{subs}"),
                workload: "W3",
                variant: format!("1->{subs} 1MiB ({dropped} dropped)"),
                unit: "MB/s",
                broker: mb(rate),
                ceiling: Some(mb(crate_)),
            });
            emit(Row {
                id: format!("W3.rss.{subs}"),
                workload: "W3",
                variant: format!("1->{subs} 1MiB peak RSS"),
                unit: "MiB",
                broker: hwm as f64 / f64::from(1u32 << 20),
                ceiling: Some(chwm as f64 / f64::from(1u32 << 20)),
            });
        }
    }
    if wants(&args, "W4") {
        let secs = s.w4_secs;
        let broker = Server::broker(&bin).await?;
        let hb = latency(&broker, 5000.0, secs).await?;
        drop(broker);
        let ceiling = Server::ceiling().await?;
        let hc = latency(&ceiling, 5000.0, secs).await?;
        drop(ceiling);
        for (q, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            emit(Row {
                id: format!("W4.{name}"),
                workload: "W4",
                variant: format!("5000 msg/s 1->1 128B latency {name}"),
                unit: "us",
                broker: hb.value_at_quantile(q) as f64,
                ceiling: Some(hc.value_at_quantile(q) as f64),
            });
        }
    }
    if wants(&args, "W5") {
        for (max, n) in [(1u32, s.w5_one), (100, s.w5_batch)] {
            let broker = Server::broker(&bin).await?;
            let rate = work_queue(&broker, n, 4, max, false).await?;
            emit(Row {
                id: format!("W5.{max}"),
                workload: "W5",
                variant: format!("4 Recv workers, max_messages {max}"),
                unit: "msgs/s",
                broker: rate,
                ceiling: None,
            });
        }
        // Acknowledged: the same 4 x Recv 100, plus one Ack per batch; alternated with the
        // unacknowledged run in the same process start order, medians of `repeat`.
        let (mut with, mut without) = (Vec::new(), Vec::new());
        for _ in 0..repeat.max(1) {
            let broker = Server::broker(&bin).await?;
            with.push(work_queue(&broker, s.w5_batch, 4, 100, true).await?);
            drop(broker);
            let broker = Server::broker(&bin).await?;
            without.push(work_queue(&broker, s.w5_batch, 4, 100, false).await?);
        }
        emit(Row {
            id: "W5.ack".into(),
            workload: "W5",
            variant: "4 workers, Recv 100 + Ack per batch".into(),
            unit: "msgs/s",
            broker: median(&mut with),
            ceiling: Some(median(&mut without)),
        });
    }
    if wants(&args, "W9") {
        disk::run(&bin, s, args.quick, repeat, &mut emit).await?;
    }
    if wants(&args, "W10") {
        redis::run(&bin, s, repeat, &mut emit).await?;
    }
    if wants(&args, "W8") {
        // SendBatch (batches of 100) against SendStream, both 1 -> 1 128 B delivered,
        // alternated on fresh brokers of this binary.
        // Also the CPU each phase cost per message, broker and bench process apart: on two
        // shared cores the delivered rate follows the total, and CPU time is steadier than
        // the rate on a noisy host.
        let (mut batch, mut stream) = (Vec::new(), Vec::new());
        let (mut cpu_batch, mut cpu_stream) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for _ in 0..repeat.max(1) {
            for (how, rates, cpu) in [
                (Publish::Batch(100), &mut batch, &mut cpu_batch),
                (Publish::Stream, &mut stream, &mut cpu_stream),
            ] {
                let broker = Server::broker(&bin).await?;
                let before = cpu::Usage::of(&broker);
                rates.push(throughput(&broker, 1, s.w1_stream, 128, how).await?.0);
                if let Some((b, c)) =
                    cpu::Usage::since(cpu::Usage::of(&broker), before, s.w1_stream)
                {
                    cpu[0].push(b);
                    cpu[1].push(c);
                }
            }
        }
        emit(Row {
            id: "W8".into(),
            workload: "W8",
            variant: "1->1 128B SendBatch x100 / SendStream".into(),
            unit: "msgs/s",
            broker: median(&mut batch),
            ceiling: Some(median(&mut stream)),
        });
        for (i, who) in ["broker", "bench"].into_iter().enumerate() {
            if cpu_batch[i].is_empty() {
                continue;
            }
            emit(Row {
                id: format!("W8.cpu{i}"),
                workload: "W8",
                variant: format!("{who} CPU, SendBatch / SendStream"),
                unit: "us/msg",
                broker: median(&mut cpu_batch[i]),
                ceiling: Some(median(&mut cpu_stream[i])),
            });
        }
    }
    if wants(&args, "W7") {
        // Sends with 10,000 non-matching pattern subscriptions open vs none, alternated.
        for (id, variant, n, how) in [
            (
                "W7.unary64",
                "unary x64, 10k idle patterns / none",
                s.w1_unary64,
                Publish::Unary(64),
            ),
            (
                "W7.stream",
                "SendStream, 10k idle patterns / none",
                s.w1_stream,
                Publish::Stream,
            ),
        ] {
            let (mut with, mut without) = (Vec::new(), Vec::new());
            for _ in 0..repeat.max(1) {
                let broker = Server::broker(&bin).await?;
                let held = open_patterns(&broker, s.w7_patterns).await?;
                with.push(throughput(&broker, 1, n, 128, how).await?.0);
                drop(held);
                drop(broker);
                let broker = Server::broker(&bin).await?;
                without.push(throughput(&broker, 1, n, 128, how).await?.0);
            }
            emit(Row {
                id: id.into(),
                workload: "W7",
                variant: variant.into(),
                unit: "msgs/s",
                broker: median(&mut with),
                ceiling: Some(median(&mut without)),
            });
        }
        // Fan-out to one subscriber through `>` vs the exact address.
        let (mut via, mut exact) = (Vec::new(), Vec::new());
        for _ in 0..repeat.max(1) {
            let broker = Server::broker(&bin).await?;
            via.push(
                throughput_via(&broker, "bench.>", 1, s.w2, 128, Publish::Stream)
                    .await?
                    .0,
            );
            drop(broker);
            let broker = Server::broker(&bin).await?;
            exact.push(throughput(&broker, 1, s.w2, 128, Publish::Stream).await?.0);
        }
        emit(Row {
            id: "W7.fanout".into(),
            workload: "W7",
            variant: "1->1 SendStream via `>` / exact".into(),
            unit: "deliveries/s",
            broker: median(&mut via),
            ceiling: Some(median(&mut exact)),
        });
    }
    if wants(&args, "W6") {
        let broker = Server::broker(&bin).await?;
        let (per_address, per_sub) = scale(&broker, s.w6_addresses, s.w6_subscribers).await?;
        emit(Row {
            id: "W6.address".into(),
            workload: "W6",
            variant: format!("memory per idle address ({} addr)", s.w6_addresses),
            unit: "bytes",
            broker: per_address,
            ceiling: None,
        });
        emit(Row {
            id: "W6.subscriber".into(),
            workload: "W6",
            variant: format!("memory per idle subscriber ({} subs)", s.w6_subscribers),
            unit: "bytes",
            broker: per_sub,
            ceiling: None,
        });
    }
    println!();
    if args.quick {
        println!("(--quick: tiny workloads; the targets below are not meaningful in this mode)");
    }
    targets(&rows);
    println!();
    for r in &rows {
        println!("{}", r.json());
    }
    Ok(())
}

/// Checks the targets of the performance issue against this run's figures.
fn targets(rows: &[Row]) {
    let get = |id: &str| rows.iter().find(|r| r.id == id);
    let ratio = |id: &str| get(id).and_then(Row::ratio);
    let broker = |id: &str| get(id).map(|r| r.broker);
    let div = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b.max(1e-9));
    let checks: [(&str, Option<f64>, &str, f64); 19] = [
        (
            "unary Send 64 in flight / ceiling",
            ratio("W1b"),
            ">=",
            0.85,
        ),
        (
            "SendStream / unary Send 1 in flight",
            div(broker("W1c"), broker("W1a")),
            ">=",
            10.0,
        ),
        ("SendStream / ceiling stream", ratio("W1c"), ">=", 0.8),
        ("fan-out 1->16 / ceiling", ratio("W2"), ">=", 0.8),
        (
            "peak RSS 64 subs / 4 subs (1 MiB)",
            div(broker("W3.rss.64"), broker("W3.rss.4")),
            "<=",
            1.10,
        ),
        ("latency p99 / ceiling p99", ratio("W4.p99"), "<=", 1.5),
        (
            "work queue with acks / without (Recv 100)",
            ratio("W5.ack"),
            ">=",
            0.5,
        ),
        (
            "unary x64 with 10k idle patterns / none",
            ratio("W7.unary64"),
            ">=",
            0.9,
        ),
        (
            "SendStream with 10k idle patterns / none",
            ratio("W7.stream"),
            ">=",
            0.9,
        ),
        ("fan-out through `>` / exact", ratio("W7.fanout"), ">=", 0.9),
        (
            "SendBatch x100 / SendStream delivered",
            ratio("W8"),
            ">=",
            1.5,
        ),
        ("disk SendStream / memory", ratio("W9.stream"), ">=", 0.3),
        (
            "redis SendStream / direct XADD+XREAD",
            ratio("W10.direct"),
            ">=",
            0.7,
        ),
        (
            "redis fan-out 1->16 / direct 16 XREADs",
            ratio("W10.fanout_direct"),
            ">=",
            0.7,
        ),
        ("disk unary x64 / memory", ratio("W9.unary64"), ">=", 0.5),
        (
            "disk unary x64 / group-commit ceiling",
            ratio("W9.ceiling"),
            ">=",
            0.6,
        ),
        (
            "seconds to start on ~1 GiB",
            broker("W9.recovery"),
            "<",
            5.0,
        ),
        ("bytes per idle address", broker("W6.address"), "<", 2048.0),
        (
            "bytes per idle subscriber",
            broker("W6.subscriber"),
            "<",
            16384.0,
        ),
    ];
    println!("targets:");
    for (name, value, op, bound) in checks {
        let verdict = match value {
            None => "not measured".to_string(),
            Some(v) => {
                let ok = match op {
                    ">=" => v >= bound,
                    "<=" => v <= bound,
                    _ => v < bound,
                };
                format!(
                    "{v:.2} {op} {bound}: {}",
                    if ok { "holds" } else { "MISSED" }
                )
            }
        };
        println!("  {name:<40} {verdict}");
    }
}
