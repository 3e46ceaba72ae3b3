//! W9: the disk engine (`--data-dir`, `--fsync always`) against the memory engine and against
//! the machine's own limits, measured in the same run on the same filesystem (a scratch
//! directory under `$TMPDIR`, removed afterwards).
//!
//! - the machine's fsync latency: write 128 bytes + `fdatasync`, one at a time;
//! - the group-commit ceiling: one flusher thread appending 128-byte records for 64 writer
//!   threads, one `write` + one `fdatasync` per batch (what the broker's flusher does, with no
//!   broker around it);
//! - recovery: seconds from start to listening on ~1 GiB of data, and the RSS then (with the
//!   default 256 MiB `--cache-bytes`);
//! - replay after the restart, cached and with `--cache-bytes 0` (every message read back from
//!   its segment), against the same replay on a memory broker.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{mpsc as std_mpsc, Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use hdrhistogram::Histogram;
use switchboard::pb::{subscribe_response::Event, SubscribeRequest};

use super::{median, publish_stream, request, throughput, Publish, Res, Row, Server, Sizes};

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Res<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "switchboard-bench-{}-{tag}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap_or_default()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The machine's write + fdatasync latency for 128-byte appends, in µs.
fn fsync_latency(dir: &Path, n: u64) -> Res<Histogram<u64>> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("fsync-probe"))?;
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let record = [0x5au8; 128];
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&record)?;
        f.sync_data()?;
        h.record(
            u64::try_from(t.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        )?;
    }
    Ok(h)
}

/// The group-commit ceiling: `writers` threads each append one 128-byte record at a time and
/// wait until it is durable; one flusher thread writes everything queued with one `write` and
/// one `fdatasync`. Returns records per second over `n` records.
fn group_commit_ceiling(dir: &Path, writers: u64, n: u64) -> Res<f64> {
    type Queue = Mutex<(Vec<std_mpsc::Sender<()>>, bool)>;
    let shared: Arc<(Queue, Condvar)> = Arc::new((Mutex::new((Vec::new(), false)), Condvar::new()));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ceiling-log"))?;
    let flusher = {
        let shared = Arc::clone(&shared);
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut buf = Vec::new();
            loop {
                let batch = {
                    let (lock, ready) = &*shared;
                    let mut q = lock.lock().map_err(|_| std::io::Error::other("poisoned"))?;
                    while q.0.is_empty() && !q.1 {
                        q = ready
                            .wait(q)
                            .map_err(|_| std::io::Error::other("poisoned"))?;
                    }
                    if q.0.is_empty() {
                        return Ok(());
                    }
                    std::mem::take(&mut q.0)
                };
                buf.clear();
                for _ in &batch {
                    buf.extend_from_slice(&[0x5au8; 128]);
                }
                f.write_all(&buf)?;
                f.sync_data()?;
                for done in batch {
                    let _ = done.send(());
                }
            }
        })
    };
    let start = Instant::now();
    let mut threads = Vec::new();
    for w in 0..writers {
        let shared = Arc::clone(&shared);
        let share = n / writers + u64::from(w < n % writers);
        threads.push(std::thread::spawn(move || {
            for _ in 0..share {
                let (tx, rx) = std_mpsc::channel();
                {
                    let (lock, ready) = &*shared;
                    let Ok(mut q) = lock.lock() else { return };
                    q.0.push(tx);
                    ready.notify_one();
                }
                if rx.recv().is_err() {
                    return;
                }
            }
        }));
    }
    for t in threads {
        t.join().map_err(|_| "writer thread panicked")?;
    }
    let secs = start.elapsed().as_secs_f64();
    {
        let (lock, ready) = &*shared;
        lock.lock().map_err(|_| "poisoned")?.1 = true;
        ready.notify_one();
    }
    flusher.join().map_err(|_| "flusher panicked")??;
    Ok(n as f64 / secs.max(1e-9))
}

/// Unary Send latency, one at a time, in µs.
async fn send_latency(server: &Server, n: u64) -> Res<Histogram<u64>> {
    let mut c = server.client().await?;
    let payload = bytes::Bytes::from(vec![0xabu8; 128]);
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for _ in 0..n {
        let t = Instant::now();
        c.send(request("bench.latency", &payload)).await?;
        h.record(
            u64::try_from(t.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        )?;
    }
    Ok(h)
}

/// Replays `address` from sequence 1 until `n` messages arrived: messages per second.
async fn replay(server: &Server, address: &str, n: u64) -> Res<f64> {
    let mut c = server.client().await?;
    let start = Instant::now();
    let mut stream = c
        .subscribe(SubscribeRequest {
            address: address.into(),
            start_sequence: 1,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut got = 0;
    while got < n {
        let r = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await
            .map_err(|_| "replay stalled")?
            .ok_or("replay ended early")??;
        if let Some(Event::Message(_)) = r.event {
            got += 1;
        }
    }
    Ok(got as f64 / start.elapsed().as_secs_f64().max(1e-9))
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

/// Runs W9; `quick` shrinks everything.
pub(crate) async fn run(
    bin: &PathBuf,
    s: &Sizes,
    quick: bool,
    repeat: usize,
    emit: &mut impl FnMut(Row),
) -> Res<()> {
    let row = |id: &str, variant: &str, unit: &'static str, broker: f64, base: Option<f64>| Row {
        id: id.into(),
        workload: "W9",
        variant: variant.into(),
        unit,
        broker,
        ceiling: base,
    };
    // Throughput: disk vs memory, alternated on fresh brokers.
    for (id, variant, n, how) in [
        (
            "W9.stream",
            "SendStream 1->1 128B, disk / memory",
            s.w1_stream,
            Publish::Stream,
        ),
        (
            "W9.unary64",
            "unary x64 1->1 128B, disk / memory",
            s.w1_unary64,
            Publish::Unary(64),
        ),
        (
            "W9.unary64lean",
            "unary x64, lean h2 client, disk / memory",
            s.w1_unary64,
            Publish::UnaryLean(64),
        ),
    ] {
        let (mut disk, mut memory) = (Vec::new(), Vec::new());
        for _ in 0..repeat.max(1) {
            let dir = Scratch::new("w9")?;
            let broker = Server::broker_with(bin, &["--data-dir", dir.path()]).await?;
            disk.push(throughput(&broker, 1, n, 128, how).await?.0);
            drop(broker);
            let broker = Server::broker(bin).await?;
            memory.push(throughput(&broker, 1, n, 128, how).await?.0);
        }
        emit(row(
            id,
            variant,
            "msgs/s",
            median(&mut disk),
            Some(median(&mut memory)),
        ));
    }

    // Against the machine: the group-commit ceiling and the fsync latency, same filesystem.
    let dir = Scratch::new("w9-ceiling")?;
    let ceiling_n = if quick { 2_000 } else { 100_000 };
    let (mut ceil, mut disk, mut lean) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..repeat.max(1) {
        let d = dir.0.clone();
        ceil.push(
            tokio::task::spawn_blocking(move || group_commit_ceiling(&d, 64, ceiling_n)).await??,
        );
        for (how, out) in [
            (Publish::Unary(64), &mut disk),
            (Publish::UnaryLean(64), &mut lean),
        ] {
            let data = Scratch::new("w9-unary")?;
            let broker = Server::broker_with(bin, &["--data-dir", data.path()]).await?;
            out.push(throughput(&broker, 1, s.w1_unary64, 128, how).await?.0);
        }
    }
    let ceil = median(&mut ceil);
    emit(row(
        "W9.ceiling",
        "unary x64 disk / group-commit ceiling",
        "msgs/s",
        median(&mut disk),
        Some(ceil),
    ));
    // The same calls from the lean client: the broker's capacity with less of the two cores
    // spent in the load generator (`lean.rs`).
    emit(row(
        "W9.ceilinglean",
        "unary x64 lean client disk / ceiling",
        "msgs/s",
        median(&mut lean),
        Some(ceil),
    ));
    let probes = if quick { 50 } else { 2_000 };
    let d = dir.0.clone();
    let machine = tokio::task::spawn_blocking(move || fsync_latency(&d, probes)).await??;
    let data = Scratch::new("w9-latency")?;
    let broker = Server::broker_with(bin, &["--data-dir", data.path()]).await?;
    let sends = send_latency(&broker, probes).await?;
    drop(broker);
    for (id, q) in [("W9.p50", 0.5_f64), ("W9.p99", 0.99)] {
        emit(row(
            id,
            &format!("unary Send p{} / machine fsync", (q * 100.0).round()),
            "µs",
            us(&sends, q),
            Some(us(&machine, q)),
        ));
    }

    // Recovery: ~1 GiB over 16 addresses (64 MiB each, the default per-address bound), then a
    // restart; and a replay from sequence 1 after it.
    let data = Scratch::new("w9-recovery")?;
    let (addresses, per, size) = if quick {
        (2u64, 8u64, 1usize << 20)
    } else {
        (16, 63, 1 << 20)
    };
    let flags = [
        "--data-dir",
        data.path(),
        "--max-retained-bytes",
        "1207959552",
    ];
    let broker = Server::broker_with(bin, &flags).await?;
    let c = broker.client().await?;
    let big = bytes::Bytes::from(vec![0x42u8; size]);
    for a in 0..addresses {
        publish_stream(&c, &format!("bench.recovery.{a}"), per, &big).await?;
    }
    let small = bytes::Bytes::from(vec![0xabu8; 128]);
    let replay_n = s.w1_stream.min(60_000);
    publish_stream(&c, "bench.replay", replay_n, &small).await?;
    let memory_broker = Server::broker(bin).await?;
    let mc = memory_broker.client().await?;
    publish_stream(&mc, "bench.replay", replay_n, &small).await?;
    let memory_replay = replay(&memory_broker, "bench.replay", replay_n).await?;
    drop(memory_broker);
    drop(c);
    broker.kill().await?; // SIGKILL: everything acknowledged is on disk already
    let t = Instant::now();
    let broker = Server::broker_with(bin, &flags).await?;
    let secs = t.elapsed().as_secs_f64();
    let rss = broker.mem("VmRSS")? as f64;
    let gib = (addresses * per) as f64 * size as f64 / f64::from(1u32 << 30);
    emit(row(
        "W9.recovery",
        &format!("start on {gib:.2} GiB of data"),
        "s",
        secs,
        None,
    ));
    emit(row(
        "W9.recovery.rss",
        "RSS right after that start",
        "bytes",
        rss,
        None,
    ));
    let disk_replay = replay(&broker, "bench.replay", replay_n).await?;
    emit(row(
        "W9.replay",
        "replay after restart / memory replay",
        "msgs/s",
        disk_replay,
        Some(memory_replay),
    ));
    // The same replay with nothing cached: every message read back from its segment.
    broker.kill().await?;
    let cold_flags = [flags[0], flags[1], flags[2], flags[3], "--cache-bytes", "0"];
    let broker = Server::broker_with(bin, &cold_flags).await?;
    let cold = replay(&broker, "bench.replay", replay_n).await?;
    emit(row(
        "W9.replay.cold",
        "replay, cache 0 (from disk) / memory",
        "msgs/s",
        cold,
        Some(memory_replay),
    ));
    Ok(())
}
