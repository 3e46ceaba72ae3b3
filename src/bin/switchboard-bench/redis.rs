//! W10: the Redis engine (`--engine redis`) on a `redis-server` started here on a free
//! loopback port (no persistence: the figures are the engine's, not the disk's), against the
//! memory engine and against a direct Redis client on the same Redis, in the same run:
//!
//! - SendStream 1 → 1, 128 B, delivered msgs/s: Redis engine / memory engine, and Redis engine /
//!   direct client. The direct client is the engine's ceiling: one publisher pipelining `XADD`s
//!   (batches of 100, 8 batches in flight) and one reader with `XREAD BLOCK COUNT 512`;
//! - fan-out 1 → 16 (W2's shape), Redis engine / memory engine, and Redis engine / the direct
//!   client with 16 readers (each its own connection and `XREAD BLOCK`), deliveries/s;
//! - fan-out 1 → 15 with the subscribers on 3 nodes (5 each) / all 15 on 1 node: on one
//!   2-core machine the three nodes share the cores with Redis and the publisher, so this
//!   bounds what spreading can show.
//!
//! Skipped (with a line saying so) when `redis-server` is not on PATH.

use std::{
    net::TcpListener,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use futures_util::{stream::FuturesOrdered, StreamExt};
use redis::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use super::{median, publish_stream, subscribers, throughput, Publish, Res, Row, Server, Sizes};

/// A `redis-server` of ours, killed (by its PID, through the handle) when dropped.
struct Redis {
    _child: Child,
    port: u16,
}

impl Redis {
    async fn start() -> Res<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = std::env::temp_dir();
        let mut child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(out).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
                .await
                .map_err(|_| "redis-server not ready in 10 s")??
                .ok_or("redis-server exited")?;
            if line.contains("Ready to accept connections") {
                break;
            }
        }
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            _child: child,
            port,
        })
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

async fn node(bin: &PathBuf, redis: &Redis, ns: &str) -> Res<Server> {
    let url = redis.url();
    Server::broker_with(
        bin,
        &[
            "--engine",
            "redis",
            "--redis-url",
            &url,
            "--redis-namespace",
            ns,
        ],
    )
    .await
}

/// One direct reader: follows `key` from the start with `XREAD BLOCK … COUNT 512` until it has
/// seen `n` entries; returns when it saw the last.
async fn follow(client: redis::Client, key: String, n: u64) -> Res<Instant> {
    let mut reader = client.get_multiplexed_async_connection().await?;
    let mut last = "0-0".to_string();
    let mut got = 0u64;
    while got < n {
        let v: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(5000)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last)
            .query_async(&mut reader)
            .await?;
        let Value::Array(streams) = v else {
            return Err("XREAD timed out".into());
        };
        for s in streams {
            let Value::Array(mut kv) = s else { continue };
            let Some(Value::Array(items)) = kv.pop() else {
                continue;
            };
            for item in items {
                if let Value::Array(pair) = item {
                    if let Some(Value::BulkString(id)) = pair.first() {
                        last = String::from_utf8_lossy(id).into_owned();
                    }
                    got += 1;
                }
            }
        }
    }
    Ok(Instant::now())
}

/// The direct client: `n` 128-byte `XADD`s pipelined (100 per pipeline, 8 pipelines in flight)
/// while `readers` readers, each on a connection of its own, follow the stream with `XREAD
/// BLOCK` (see [`follow`]); deliveries per second (`readers` × `n` over the time until the last
/// reader has the last entry).
async fn direct(redis: &Redis, key: &str, n: u64, payload_len: usize, readers: usize) -> Res<f64> {
    let client = redis::Client::open(redis.url())?;
    let writer = client.get_multiplexed_async_connection().await?;
    let reads: Vec<_> = (0..readers)
        .map(|_| tokio::spawn(follow(client.clone(), key.to_string(), n)))
        .collect();
    let payload = vec![0xabu8; payload_len];
    let start = Instant::now();
    let mut inflight = FuturesOrdered::new();
    let mut sent = 0u64;
    while sent < n || !inflight.is_empty() {
        while sent < n && inflight.len() < 8 {
            let k = (n - sent).min(100);
            let mut p = redis::pipe();
            for _ in 0..k {
                p.cmd("XADD")
                    .arg(key)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(65_536)
                    .arg("*")
                    .arg("p")
                    .arg(payload.as_slice())
                    .ignore();
            }
            let mut w = writer.clone();
            inflight.push_back(async move { p.query_async::<()>(&mut w).await });
            sent += k;
        }
        if let Some(r) = inflight.next().await {
            r?;
        }
    }
    let mut end = start;
    for r in reads {
        end = end.max(r.await??);
    }
    Ok((n * readers as u64) as f64 / (end - start).as_secs_f64().max(1e-9))
}

/// One publisher (SendStream into the first node) → subscribers spread over `nodes`:
/// deliveries per second.
async fn spread(nodes: &[Server], subs_each: usize, n: u64) -> Res<f64> {
    let mut tasks = Vec::new();
    for node in nodes {
        tasks.extend(subscribers(node.addr, "bench.spread", subs_each, n).await?);
    }
    let c = nodes[0].client().await?;
    let payload = bytes::Bytes::from(vec![0xabu8; 128]);
    let start = Instant::now();
    publish_stream(&c, "bench.spread", n, &payload).await?;
    let mut last = start;
    let mut delivered = 0;
    for t in tasks {
        let seen = t.await??;
        last = last.max(seen.last);
        delivered += seen.messages;
    }
    Ok(delivered as f64 / (last - start).as_secs_f64().max(1e-9))
}

pub(super) async fn run(
    bin: &PathBuf,
    s: &Sizes,
    repeat: usize,
    emit: &mut impl FnMut(Row),
) -> Res<()> {
    let found = std::process::Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|st| st.success());
    if !found {
        println!("W10  skipped: redis-server is not on PATH (apt-get install redis-server)");
        return Ok(());
    }
    let n = s.w1_stream / 5;
    let (mut on_redis, mut memory, mut ceiling) = (Vec::new(), Vec::new(), Vec::new());
    let (mut fan_redis, mut fan_memory, mut fan_direct) = (Vec::new(), Vec::new(), Vec::new());
    let (mut three, mut one) = (Vec::new(), Vec::new());
    for round in 0..repeat.max(1) {
        let redis = Redis::start().await?;
        let ns = format!("bench{round}");
        let r = node(bin, &redis, &ns).await?;
        on_redis.push(throughput(&r, 1, n, 128, Publish::Stream).await?.0);
        drop(r);
        ceiling.push(direct(&redis, &format!("direct{round}"), n, 128, 1).await?);
        fan_direct.push(direct(&redis, &format!("fandirect{round}"), s.w2 / 5, 128, 16).await?);
        let m = Server::broker(bin).await?;
        memory.push(throughput(&m, 1, n, 128, Publish::Stream).await?.0);
        fan_memory.push(throughput(&m, 16, s.w2 / 5, 128, Publish::Stream).await?.0);
        drop(m);
        let r = node(bin, &redis, &format!("{ns}f")).await?;
        fan_redis.push(throughput(&r, 16, s.w2 / 5, 128, Publish::Stream).await?.0);
        drop(r);
        let nodes = vec![
            node(bin, &redis, &format!("{ns}s")).await?,
            node(bin, &redis, &format!("{ns}s")).await?,
            node(bin, &redis, &format!("{ns}s")).await?,
        ];
        three.push(spread(&nodes, 5, s.w2 / 10).await?);
        drop(nodes);
        let single = [node(bin, &redis, &format!("{ns}t")).await?];
        one.push(spread(&single, 15, s.w2 / 10).await?);
    }
    emit(Row {
        id: "W10.memory".into(),
        workload: "W10",
        variant: "redis SendStream 1->1 / memory engine".into(),
        unit: "msgs/s",
        broker: median(&mut on_redis.clone()),
        ceiling: Some(median(&mut memory)),
    });
    emit(Row {
        id: "W10.direct".into(),
        workload: "W10",
        variant: "redis SendStream 1->1 / direct XADD+XREAD".into(),
        unit: "msgs/s",
        broker: median(&mut on_redis),
        ceiling: Some(median(&mut ceiling)),
    });
    emit(Row {
        id: "W10.fanout".into(),
        workload: "W10",
        variant: "redis fan-out 1->16 / memory engine".into(),
        unit: "deliv/s",
        broker: median(&mut fan_redis.clone()),
        ceiling: Some(median(&mut fan_memory)),
    });
    emit(Row {
        id: "W10.fanout_direct".into(),
        workload: "W10",
        variant: "redis fan-out 1->16 / direct 16 XREADs".into(),
        unit: "deliv/s",
        broker: median(&mut fan_redis),
        ceiling: Some(median(&mut fan_direct)),
    });
    emit(Row {
        id: "W10.nodes".into(),
        workload: "W10",
        variant: "redis 1->15 on 3 nodes / on 1 node".into(),
        unit: "deliv/s",
        broker: median(&mut three),
        ceiling: Some(median(&mut one)),
    });
    Ok(())
}
