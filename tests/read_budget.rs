//! What readers hold is bounded (`--max-read-buffer-bytes`, 256 KiB read per subscriber at a
//! time): subscribers that replay history and never read their streams pin at most about one
//! message each beyond retention, on the memory engine (messages since evicted) and on the
//! disk engine (messages read back from segments for them alone). Runs the real binary so its
//! RSS can be read from /proc.

mod common;

use common::{sigterm, step, BrokerProcess};
use switchboard::pb::{broker_client::BrokerClient, SendRequest, SubscribeRequest};
use tonic::transport::Channel;

const MIB: u64 = 1024 * 1024;
/// The documented allowance above the retention bounds for the runtime and connection buffers
/// (README, "Limits and guarantees").
const OVERHEAD: u64 = 64 * MIB;
/// What one stalled stream may hold beyond retention: the 256 KiB read for it, plus the message
/// that crosses it (1 MiB here), plus the frames its HTTP/2 stream is sending until the
/// client's window (2 MiB by default) is full.
const PER_STREAM: u64 = 4 * MIB;

fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

/// GET /metrics over plain HTTP/1.0; the value of `name`.
async fn metric(addr: &str, name: &str) -> f64 {
    let body = common::metrics_text(addr).await;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// Sends `n` distinct 1 MiB messages to `address` (payload starts with its index).
async fn send_mib(c: &mut BrokerClient<Channel>, address: &str, from: u64, n: u64) {
    let address = address.to_string();
    let requests = tokio_stream::iter((from..from + n).map(move |i| {
        let mut p = vec![u8::try_from(i % 251).unwrap(); usize::try_from(MIB).unwrap()];
        p[..8].copy_from_slice(&i.to_be_bytes());
        SendRequest {
            address: address.clone(),
            payload: p.into(),
            ..Default::default()
        }
    }));
    let mut acks = c.send_stream(requests).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(r) = step("ack", acks.message()).await.unwrap() {
        assert!(r.error.is_none(), "{:?}", r.error);
        acked += 1;
    }
    assert_eq!(acked, n);
}

/// Opens a Subscribe from `start` that is never read, on a connection of its own (unread
/// data would otherwise fill the connection's HTTP/2 window and stall the test's other
/// calls), and waits until the broker has read for it (its delivered counter moved): from
/// then on it holds what it read.
async fn stalled_subscriber(
    grpc: &str,
    http: &str,
    address: &str,
    start: u64,
) -> (
    BrokerClient<Channel>,
    tonic::Streaming<switchboard::pb::SubscribeResponse>,
) {
    let before = metric(http, "switchboard_messages_delivered_total").await;
    let mut own = BrokerClient::connect(format!("http://{grpc}"))
        .await
        .unwrap()
        .max_decoding_message_size(4 * 1024 * 1024);
    let stream = own
        .subscribe(SubscribeRequest {
            address: address.into(),
            start_sequence: start,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = tokio::time::Instant::now() + common::step_limit();
    while metric(http, "switchboard_messages_delivered_total").await <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the subscriber never read"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    (own, stream)
}

/// The real broker with a 1 MiB message limit and its HTTP listener; its logs are drained.
async fn start(args: &[&str]) -> (tokio::process::Child, String, String, BrokerClient<Channel>) {
    let mut all = vec![
        "--http-listen",
        "127.0.0.1:0",
        "--max-message-bytes",
        "1048576",
    ];
    all.extend_from_slice(args);
    let mut broker = BrokerProcess::start(&all).await;
    let http = broker.metrics_addr().await;
    let BrokerProcess {
        child,
        addr,
        mut logs,
    } = broker;
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let c = BrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .max_decoding_message_size(4 * 1024 * 1024);
    (child, addr, http, c)
}

/// Memory engine: 8 subscribers, each starting a replay at the oldest retained message and
/// then stalling, while 8 x 64 MiB more are sent through a 64 MiB retention window. Before the
/// read budget each read 64 messages ahead and pinned them after eviction (8 x 64 MiB beyond
/// retention; 1.05 GB RSS in the attack with 16); now each holds about one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_replays_do_not_pin_evicted_messages() {
    const ROUNDS: u64 = 8;
    let retention = 64 * MIB;
    let r = retention.to_string();
    let (mut child, grpc, http, mut c) =
        start(&["--retention-bytes", &r, "--max-retained-bytes", &r]).await;
    let pid = child.id().unwrap();
    let mut streams = Vec::new();
    let mut next = 1;
    for _ in 0..ROUNDS {
        send_mib(&mut c, "budget.mem", next, 64).await;
        // From this round's first message (evicted by now or soon: a replay either way).
        streams.push(stalled_subscriber(&grpc, &http, "budget.mem", next).await);
        next += 64;
    }
    // Evict everything the subscribers may have read.
    send_mib(&mut c, "budget.mem", next, 64).await;
    let held = rss(pid);
    let bound = retention + OVERHEAD + ROUNDS * PER_STREAM;
    eprintln!(
        "memory engine: RSS {} MiB with {ROUNDS} stalled replays, bound {} MiB",
        held / MIB,
        bound / MIB
    );
    assert!(
        held < bound,
        "RSS {} MiB over {} MiB",
        held / MIB,
        bound / MIB
    );
    let reading = metric(&http, "switchboard_read_buffer_bytes").await;
    assert!(
        reading <= (256 * MIB) as f64 && reading > 0.0,
        "the stalled subscribers' reads are charged: {reading}"
    );
    drop(streams);
    sigterm(&child);
    assert!(step("exit", child.wait()).await.unwrap().success());
}

/// Disk engine with a 1 MiB cache: 16 subscribers replay 64 MiB from sequence 1 and stall.
/// Each reads its messages back from the segments for itself alone; before, each read a batch
/// of 64 (64 MiB; +871 MiB RSS in the attack with 16), now 256 KiB at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_replays_from_disk_read_little_each() {
    const STREAMS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let (mut child, grpc, http, mut c) =
        start(&["--data-dir", &data, "--cache-bytes", "1048576"]).await;
    let pid = child.id().unwrap();
    send_mib(&mut c, "budget.disk", 1, 64).await;
    let before = rss(pid);
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(stalled_subscriber(&grpc, &http, "budget.disk", 1).await);
    }
    let held = rss(pid);
    let growth = held.saturating_sub(before);
    let bound = STREAMS * PER_STREAM + 16 * MIB;
    eprintln!(
        "disk engine: RSS {} -> {} MiB with {STREAMS} stalled replays, growth bound {} MiB",
        before / MIB,
        held / MIB,
        bound / MIB
    );
    assert!(
        growth < bound,
        "RSS grew {} MiB, over {} MiB",
        growth / MIB,
        bound / MIB
    );
    drop(streams);
    sigterm(&child);
    assert!(step("exit", child.wait()).await.unwrap().success());
}
