//! The disk engine (`--data-dir`) with the real binary: kill -9 at a random moment loses nothing
//! acknowledged; torn tails are cut, corruption in the middle refuses to start without
//! `--repair`; a full disk refuses Sends with UNAVAILABLE and recovers; one broker per directory.
//!
//! The crash test runs `SWITCHBOARD_CRASH_ROUNDS` rounds (3 by default; `scripts/crash` runs 20).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{sigterm, step, BrokerProcess};
use rand::Rng;
use switchboard::pb::{
    admin_client::AdminClient, broker_client::BrokerClient, subscribe_response::Event, AckRequest,
    BatchMessage, CreateGroupRequest, GetAddressRequest, RecvRequest, SendBatchRequest,
    SendRequest, SubscribeRequest,
};
use tonic::transport::Channel;

async fn client(addr: &str) -> BrokerClient<Channel> {
    step("connect", BrokerClient::connect(format!("http://{addr}")))
        .await
        .expect("connect")
}

async fn admin(addr: &str) -> AdminClient<Channel> {
    step("connect", AdminClient::connect(format!("http://{addr}")))
        .await
        .expect("connect")
}

async fn start(dir: &Path, extra: &[&str]) -> (BrokerProcess, Vec<String>) {
    let mut args = vec!["--data-dir", dir.to_str().unwrap()];
    args.extend_from_slice(extra);
    BrokerProcess::start_logged(&args).await
}

/// Every retained message of `address`, read with a Subscribe from sequence 1 up to its last
/// sequence: sequence → payload.
async fn read_all(addr: &str, address: &str) -> BTreeMap<u64, Vec<u8>> {
    let info = step(
        "get address",
        admin(addr).await.get_address(GetAddressRequest {
            address: address.into(),
        }),
    )
    .await;
    let info = match info {
        Err(s) if s.code() == tonic::Code::NotFound => return BTreeMap::new(),
        r => r.unwrap().into_inner().address.unwrap(),
    };
    let mut out = BTreeMap::new();
    if info.last_sequence == 0 {
        return out;
    }
    let mut stream = step(
        "subscribe",
        client(addr).await.subscribe(SubscribeRequest {
            address: address.into(),
            start_sequence: 1,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    while (out.len() as u64) < info.retained_messages {
        let r = step("replay", stream.message())
            .await
            .unwrap()
            .expect("stream open");
        if let Some(Event::Message(m)) = r.event {
            out.insert(m.sequence, m.payload.to_vec());
        }
    }
    assert_eq!(
        out.keys().next_back().copied(),
        Some(info.last_sequence),
        "replay reaches the last sequence"
    );
    out
}

fn kill9(p: &mut BrokerProcess) {
    p.child.start_kill().expect("SIGKILL the broker");
}

/// What clients were told before the kill.
#[derive(Default)]
struct Acknowledged {
    /// Sends answered OK: sequence → payload.
    sent: BTreeMap<u64, Vec<u8>>,
    /// Group messages received (leased), with the delivery attempt they came with.
    leased: BTreeMap<u64, u32>,
    /// Acks answered OK.
    acked: BTreeSet<u64>,
    /// Acks sent (answered or not: an Ack cut off by the kill may or may not have landed).
    ack_sent: BTreeSet<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_a_random_moment_loses_nothing_acknowledged() {
    let rounds: usize = std::env::var("SWITCHBOARD_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let address = "crash.jobs";
    // Every sequence ever acknowledged, across rounds, with its payload: never reused.
    let mut ever: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    // Nothing is evicted in the rounds: every acknowledged message must still be there.
    let keep_all = [
        "--retention-messages",
        "10000000",
        "--retention-bytes",
        "2147483648",
        "--max-retained-bytes",
        "4294967296",
    ];
    for round in 0..rounds {
        let (mut broker, _) = start(dir.path(), &keep_all).await;
        let addr = broker.addr.clone();
        if round == 0 {
            step(
                "create group",
                client(&addr).await.create_group(CreateGroupRequest {
                    address: address.into(),
                    group: "workers".into(),
                    start_sequence: 1,
                    ack_wait: Some(prost_types::Duration {
                        seconds: 3600,
                        nanos: 0,
                    }),
                    max_ack_pending: 100_000,
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        }
        let seen = Arc::new(Mutex::new(Acknowledged::default()));
        let mut tasks = Vec::new();
        // A SendStream flood.
        {
            let seen = Arc::clone(&seen);
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client(&addr).await;
                let (tx, rx) = tokio::sync::mpsc::channel(256);
                let mut payloads = Vec::new();
                for i in 0..20_000u32 {
                    payloads.push(format!("r{round}-stream-{i}").into_bytes());
                }
                let feed = payloads.clone();
                tokio::spawn(async move {
                    for p in feed {
                        let req = SendRequest {
                            address: "crash.jobs".into(),
                            payload: p.into(),
                            ..Default::default()
                        };
                        if tx.send(req).await.is_err() {
                            break;
                        }
                    }
                });
                let Ok(resp) = c
                    .send_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                else {
                    return;
                };
                let mut resp = resp.into_inner();
                let mut i = 0;
                while let Ok(Some(r)) = resp.message().await {
                    if r.error.is_none() {
                        seen.lock()
                            .unwrap()
                            .sent
                            .insert(r.sequence, payloads[i].clone());
                    }
                    i += 1;
                }
            }));
        }
        // Unary Sends, 8 in flight.
        for w in 0..8 {
            let seen = Arc::clone(&seen);
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client(&addr).await;
                for i in 0..5_000u32 {
                    let payload = format!("r{round}-unary{w}-{i}").into_bytes();
                    let r = c
                        .send(SendRequest {
                            address: "crash.jobs".into(),
                            payload: payload.clone().into(),
                            ..Default::default()
                        })
                        .await;
                    match r {
                        Ok(r) => {
                            seen.lock()
                                .unwrap()
                                .sent
                                .insert(r.into_inner().sequence, payload);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        // A worker: receives, acknowledges every other message, leaves the rest leased.
        {
            let seen = Arc::clone(&seen);
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let mut c = client(&addr).await;
                for _ in 0..10_000 {
                    let Ok(r) = c
                        .recv(RecvRequest {
                            address: "crash.jobs".into(),
                            group: "workers".into(),
                            max_messages: 16,
                            wait: Some(prost_types::Duration {
                                seconds: 1,
                                nanos: 0,
                            }),
                            max_bytes: 0,
                        })
                        .await
                    else {
                        return;
                    };
                    let mut to_ack = Vec::new();
                    {
                        let mut s = seen.lock().unwrap();
                        for m in r.into_inner().messages {
                            s.leased.insert(m.sequence, m.delivery_attempt);
                            if m.sequence % 2 == 0 {
                                to_ack.push(m.sequence);
                            }
                        }
                    }
                    if to_ack.is_empty() {
                        continue;
                    }
                    seen.lock().unwrap().ack_sent.extend(to_ack.iter().copied());
                    let ok = c
                        .ack(AckRequest {
                            address: "crash.jobs".into(),
                            group: "workers".into(),
                            sequences: to_ack.clone(),
                        })
                        .await;
                    match ok {
                        Ok(r) if r.get_ref().not_pending.is_empty() => {
                            seen.lock().unwrap().acked.extend(to_ack);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            }));
        }
        let delay = rand::thread_rng().gen_range(100..600);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        kill9(&mut broker);
        step("broker dies", broker.child.wait()).await.unwrap();
        for t in tasks {
            step("client task ends", t).await.unwrap();
        }
        let seen = std::mem::take(&mut *seen.lock().unwrap());

        // Restart on the same directory.
        let (broker, _) = start(dir.path(), &keep_all).await;
        let addr = broker.addr.clone();
        let stored = read_all(&addr, address).await;
        // Dense from 1 (retention is raised so that nothing is evicted).
        let (first, last) = (stored.keys().next(), stored.keys().next_back());
        assert_eq!(
            (first, last),
            (Some(&1), Some(&(stored.len() as u64))),
            "round {round}: sequences are dense from 1"
        );
        for (seq, payload) in seen.sent.iter().chain(ever.iter()) {
            assert_eq!(
                stored.get(seq),
                Some(payload),
                "round {round}: acknowledged sequence {seq} is present and byte-identical"
            );
        }
        assert!(
            !seen.sent.is_empty(),
            "round {round}: some Sends were answered before the kill"
        );
        ever.extend(seen.sent.clone());

        // The group resumes: everything not acknowledged comes again (leased ones with their
        // attempts continuing), nothing acknowledged does.
        let mut c = client(&addr).await;
        let mut again: HashMap<u64, u32> = HashMap::new();
        loop {
            let r = step(
                "drain group",
                c.recv(RecvRequest {
                    address: address.into(),
                    group: "workers".into(),
                    max_messages: 1000,
                    wait: None,
                    max_bytes: 0,
                }),
            )
            .await
            .unwrap()
            .into_inner();
            if r.messages.is_empty() {
                break;
            }
            let seqs: Vec<u64> = r.messages.iter().map(|m| m.sequence).collect();
            for m in r.messages {
                assert!(
                    again.insert(m.sequence, m.delivery_attempt).is_none(),
                    "round {round}: {} delivered twice in one drain",
                    m.sequence
                );
            }
            step(
                "ack drained",
                c.ack(AckRequest {
                    address: address.into(),
                    group: "workers".into(),
                    sequences: seqs,
                }),
            )
            .await
            .unwrap();
        }
        for seq in &seen.acked {
            assert!(
                !again.contains_key(seq),
                "round {round}: acknowledged {seq} was delivered again"
            );
        }
        for (seq, attempt) in &seen.leased {
            if seen.ack_sent.contains(seq) {
                continue;
            }
            let after = again.get(seq).copied();
            assert!(
                after.is_some_and(|a| a > *attempt),
                "round {round}: leased {seq} (attempt {attempt}) is redelivered with a later attempt, got {after:?}"
            );
        }
        for seq in seen.sent.keys() {
            if !seen.leased.contains_key(seq) {
                assert!(
                    again.contains_key(seq),
                    "round {round}: acknowledged Send {seq} reaches the group"
                );
            }
        }
        eprintln!(
            "round {round}: killed after {delay} ms; {} Sends acknowledged, {} leased, {} acked, {} stored in all",
            seen.sent.len(),
            seen.leased.len(),
            seen.acked.len(),
            stored.len()
        );
        let mut broker = broker;
        sigterm(&broker.child);
        let status = step("clean exit", broker.child.wait()).await.unwrap();
        assert!(status.success(), "SIGTERM exits 0");
    }
}

/// Starts the broker on `dir` expecting it to refuse; returns its stderr.
async fn refused_start(dir: &Path) -> String {
    let out = step(
        "refused start",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .output(),
    )
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "refuses to start: {stderr}");
    stderr
}

/// The address's only segment file.
fn segment_of(dir: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = walk(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "one segment: {segs:?}");
    segs.remove(0)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Starts a broker, sends `n` messages `m1..mn` to `address`, stops it cleanly; returns the
/// byte offset where each record ends in the segment.
async fn fill(dir: &Path, address: &str, n: usize) -> Vec<u64> {
    let (mut broker, _) = start(dir, &[]).await;
    let mut c = client(&broker.addr).await;
    let mut ends = Vec::new();
    for i in 1..=n {
        let seq = step(
            "send",
            c.send(SendRequest {
                address: address.into(),
                payload: format!("m{i}").into_bytes().into(),
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .sequence;
        assert_eq!(seq, i as u64);
        ends.push(std::fs::metadata(segment_of(dir)).unwrap().len());
    }
    // GetAddress reports the bytes on disk: here the one segment (no group journal).
    let info = admin(&broker.addr)
        .await
        .get_address(GetAddressRequest {
            address: address.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .address
        .unwrap();
    assert_eq!(info.disk_bytes, ends[n - 1]);
    sigterm(&broker.child);
    assert!(step("exit", broker.child.wait()).await.unwrap().success());
    ends
}

fn expected(n: usize) -> BTreeMap<u64, Vec<u8>> {
    (1..=n)
        .map(|i| (i as u64, format!("m{i}").into_bytes()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_is_cut_and_the_rest_served() {
    // Cut mid-record: the last record is gone, the rest served, the next Send takes its place.
    let dir = tempfile::tempdir().unwrap();
    let ends = fill(dir.path(), "torn.cut", 10).await;
    let seg = segment_of(dir.path());
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.set_len(ends[9] - 5).unwrap();
    drop(f);
    let (broker, early) = start(dir.path(), &[]).await;
    let cut = ends[9] - 5 - ends[8];
    assert!(
        early
            .iter()
            .any(|l| l.contains("torn tail truncated") && l.contains(&format!("bytes={cut}"))),
        "recovery logs the {cut} bytes cut: {early:#?}"
    );
    assert_eq!(read_all(&broker.addr, "torn.cut").await, expected(9));
    let next = client(&broker.addr)
        .await
        .send(SendRequest {
            address: "torn.cut".into(),
            payload: b"m10 again".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sequence;
    assert_eq!(next, 10);
    drop(broker);

    // A flipped byte in the last record: the same.
    let dir = tempfile::tempdir().unwrap();
    let ends = fill(dir.path(), "torn.flip", 10).await;
    let seg = segment_of(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = usize::try_from(ends[9]).unwrap() - 1;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    let (broker, early) = start(dir.path(), &[]).await;
    assert!(
        early.iter().any(|l| l.contains("torn tail truncated")),
        "{early:#?}"
    );
    assert_eq!(read_all(&broker.addr, "torn.flip").await, expected(9));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_the_middle_refuses_to_start_without_repair() {
    let dir = tempfile::tempdir().unwrap();
    let ends = fill(dir.path(), "mid.flip", 10).await;
    let seg = segment_of(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // The last byte of record 5 (its payload).
    let at = usize::try_from(ends[4]).unwrap() - 1;
    bytes[at] ^= 0x01;
    std::fs::write(&seg, &bytes).unwrap();

    let stderr = refused_start(dir.path()).await;
    for needle in [
        "\"mid.flip\"",
        "sequence 5",
        seg.file_name().unwrap().to_str().unwrap(),
        "--repair",
    ] {
        assert!(stderr.contains(needle), "names {needle}: {stderr}");
    }
    assert!(!stderr.contains("switchboard listening"), "{stderr}");
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "nothing is cut without --repair"
    );

    let (broker, early) = start(dir.path(), &["--repair"]).await;
    assert!(early.iter().any(|l| l.contains("--repair")), "{early:#?}");
    assert_eq!(read_all(&broker.addr, "mid.flip").await, expected(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_broker_on_the_same_directory_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (first, _) = start(dir.path(), &[]).await;
    let stderr = refused_start(dir.path()).await;
    let pid = first.child.id().unwrap();
    assert!(
        stderr.contains(&format!("another broker (pid {pid})")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, _) = start(dir.path(), &["--metrics-listen", "127.0.0.1:0"]).await;
    let metrics_addr = broker.metrics_addr().await;
    let c = client(&broker.addr).await;
    let sends = 512;
    let mut tasks = Vec::new();
    for w in 0..64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..sends / 64 {
                c.send(SendRequest {
                    address: "gc.x".into(),
                    payload: format!("{w}-{i}").into_bytes().into(),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for t in tasks {
        step("senders", t).await.unwrap();
    }
    let body = reqwest_lite(&metrics_addr).await;
    let fsyncs: f64 = body
        .lines()
        .find(|l| l.starts_with("switchboard_fsync_duration_seconds_count"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("fsync histogram count");
    eprintln!("{sends} concurrent Sends, {fsyncs} fsyncs");
    assert!(
        fsyncs >= 1.0 && fsyncs < f64::from(sends),
        "{sends} Sends share fsyncs: {fsyncs}"
    );
}

/// GET /metrics over plain HTTP/1.0.
async fn reqwest_lite(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    step("metrics", s.read_to_string(&mut body)).await.unwrap();
    body
}

/// A small filesystem of our own: a tmpfs with `size=`, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "the disk-full test mounts a small tmpfs and needs root (CI runs as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_sends_with_unavailable_and_recovers() {
    let fs = SmallFs::mount("2m");
    let data = fs.dir.path().join("data");
    let (broker, _) = start(&data, &[]).await;
    let mut c = client(&broker.addr).await;
    // A subscriber from the start sees exactly what was acknowledged.
    let mut watch = c
        .subscribe(SubscribeRequest {
            address: "full.x".into(),
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let payload = vec![7u8; 64 * 1024];
    let mut acked = Vec::new();
    let refusal = loop {
        assert!(acked.len() < 64, "2 MiB fills within 64 Sends of 64 KiB");
        match c
            .send(SendRequest {
                address: "full.x".into(),
                payload: payload.clone().into(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => acked.push(r.into_inner().sequence),
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().starts_with("storage:"),
        "{}",
        refusal.message()
    );
    // Refused again while full; reads keep working.
    let again = c
        .send(SendRequest {
            address: "full.x".into(),
            payload: payload.clone().into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), tonic::Code::Unavailable);
    let stored = read_all(&broker.addr, "full.x").await;
    assert_eq!(stored.keys().copied().collect::<Vec<_>>(), acked);

    // Space returns (another address's files are deleted): Sends succeed again, continuing
    // the sequence right after the last acknowledged one.
    let last = *acked.last().unwrap();
    admin(&broker.addr)
        .await
        .delete_address(switchboard::pb::DeleteAddressRequest {
            address: "full.x".into(),
        })
        .await
        .unwrap();
    let mut c2 = client(&broker.addr).await;
    let seq = c2
        .send(SendRequest {
            address: "full.y".into(),
            payload: payload.clone().into(),
            ..Default::default()
        })
        .await
        .expect("Sends succeed once space returns")
        .into_inner()
        .sequence;
    assert_eq!(seq, 1);

    // The subscriber saw exactly the acknowledged messages, none of the refused ones, then
    // the deletion.
    let mut seen = Vec::new();
    while let Ok(Some(r)) = step("watch", watch.message()).await {
        if let Some(Event::Message(m)) = r.event {
            seen.push(m.sequence);
        }
    }
    assert_eq!(seen, acked);
    assert!(last >= 2);

    // And after a restart the new address is there, the deleted one gone.
    let mut broker = broker;
    sigterm(&broker.child);
    assert!(step("exit", broker.child.wait()).await.unwrap().success());
    let (broker, _) = start(&data, &[]).await;
    assert_eq!(read_all(&broker.addr, "full.y").await.len(), 1);
    assert!(read_all(&broker.addr, "full.x").await.is_empty());
}

async fn send_id(
    c: &mut BrokerClient<Channel>,
    address: &str,
    payload: &str,
    id: &str,
) -> (u64, bool) {
    let r = step(
        "send",
        c.send(SendRequest {
            address: address.into(),
            payload: payload.as_bytes().to_vec().into(),
            message_id: id.into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    (r.sequence, r.duplicate)
}

async fn recv_seqs(
    c: &mut BrokerClient<Channel>,
    address: &str,
    group: &str,
    max: u32,
) -> Vec<u64> {
    step(
        "recv",
        c.recv(RecvRequest {
            address: address.into(),
            group: group.into(),
            max_messages: max,
            wait: None,
            max_bytes: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .messages
    .iter()
    .map(|m| m.sequence)
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_positions_settings_and_dedup_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, _) = start(dir.path(), &[]).await;
    let mut c = client(&broker.addr).await;
    for i in 1..=10 {
        assert_eq!(
            send_id(&mut c, "pos.x", &format!("m{i}"), &format!("id-{i}")).await,
            (i, false)
        );
    }
    // At most once: the default group and a group made by its first read hand out 1..=4, and a
    // created group with acknowledgements keeps its settings.
    assert_eq!(recv_seqs(&mut c, "pos.x", "", 4).await, vec![1, 2, 3, 4]);
    step(
        "create",
        c.create_group(CreateGroupRequest {
            address: "pos.x".into(),
            group: "audit".into(),
            start_sequence: 3,
            ack_wait: Some(prost_types::Duration {
                seconds: 90,
                nanos: 0,
            }),
            max_deliveries: 4,
            dead_letter_address: "pos.dlq".into(),
            max_ack_pending: 50,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    assert_eq!(recv_seqs(&mut c, "pos.x", "audit", 2).await, vec![3, 4]);
    step(
        "ack",
        c.ack(AckRequest {
            address: "pos.x".into(),
            group: "audit".into(),
            sequences: vec![3],
        }),
    )
    .await
    .unwrap();
    kill9(&mut broker);
    step("dies", broker.child.wait()).await.unwrap();

    let (broker, _) = start(dir.path(), &[]).await;
    let mut c = client(&broker.addr).await;
    // Positions: nothing handed out before the crash comes again to an at-most-once group.
    assert_eq!(
        recv_seqs(&mut c, "pos.x", "", 100).await,
        (5..=10).collect::<Vec<_>>()
    );
    // The created group: its settings, the acknowledged 3 gone, the leased 4 back first.
    let info = step(
        "get address",
        admin(&broker.addr).await.get_address(GetAddressRequest {
            address: "pos.x".into(),
        }),
    )
    .await
    .unwrap()
    .into_inner();
    let audit = info
        .groups
        .iter()
        .find(|g| g.group == "audit")
        .expect("group survives");
    assert_eq!(audit.ack_wait.as_ref().map(|d| d.seconds), Some(90));
    assert_eq!(
        (
            audit.max_deliveries,
            audit.dead_letter_address.as_str(),
            audit.max_ack_pending
        ),
        (4, "pos.dlq", 50)
    );
    assert_eq!(audit.pending, 1, "the lease of 4 survives");
    let again = step(
        "recv audit",
        c.recv(RecvRequest {
            address: "pos.x".into(),
            group: "audit".into(),
            max_messages: 100,
            wait: None,
            max_bytes: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .messages;
    let got: Vec<(u64, u32)> = again
        .iter()
        .map(|m| (m.sequence, m.delivery_attempt))
        .collect();
    assert_eq!(got[0], (4, 2), "redelivered first, attempt continuing");
    assert_eq!(
        got[1..].iter().map(|g| g.0).collect::<Vec<_>>(),
        (5..=10).collect::<Vec<_>>()
    );
    // Dedup: an id sent before the crash is still a duplicate; sequences continue after 10.
    assert_eq!(
        send_id(&mut c, "pos.x", "m7 again", "id-7").await,
        (7, true)
    );
    assert_eq!(send_id(&mut c, "pos.x", "m11", "id-11").await, (11, false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_interval_mode_keeps_what_a_clean_stop_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--fsync", "interval", "--fsync-interval-ms", "50"];
    let (mut broker, _) = start(dir.path(), &flags).await;
    let mut c = client(&broker.addr).await;
    for i in 1..=20u64 {
        assert_eq!(
            send_id(&mut c, "interval.x", &format!("m{i}"), "").await.0,
            i
        );
    }
    // Visible at once in interval mode, before any fsync.
    assert_eq!(read_all(&broker.addr, "interval.x").await.len(), 20);
    sigterm(&broker.child);
    assert!(step("exit", broker.child.wait()).await.unwrap().success());
    let (broker, _) = start(dir.path(), &flags).await;
    assert_eq!(
        read_all(&broker.addr, "interval.x").await,
        (1..=20u64)
            .map(|i| (i, format!("m{i}").into_bytes()))
            .collect()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_journal_is_compacted_while_running_and_still_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--journal-compact-bytes", "4096"];
    let (mut broker, _) = start(dir.path(), &flags).await;
    let mut c = client(&broker.addr).await;
    step(
        "create",
        c.create_group(CreateGroupRequest {
            address: "compact.x".into(),
            group: "w".into(),
            start_sequence: 1,
            ack_wait: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            max_ack_pending: 10_000,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    for i in 0..2_000 {
        send_id(&mut c, "compact.x", &format!("m{i}"), "").await;
    }
    // 200 batches of 10: every other message acknowledged, the rest left leased. Uncompacted,
    // the journal holds 2,000 Lease, 200 Done and 200 Position records (63 KB).
    let mut leased = BTreeSet::new();
    for _ in 0..200 {
        let seqs = recv_seqs(&mut c, "compact.x", "w", 10).await;
        let acked: Vec<u64> = seqs.iter().copied().filter(|s| s % 2 == 0).collect();
        leased.extend(seqs.iter().copied().filter(|s| s % 2 == 1));
        step(
            "ack",
            c.ack(AckRequest {
                address: "compact.x".into(),
                group: "w".into(),
                sequences: acked,
            }),
        )
        .await
        .unwrap();
    }
    let journal = walk(dir.path())
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "groups.journal"))
        .unwrap();
    let len = std::fs::metadata(&journal).unwrap().len();
    // A snapshot of 1,000 pending leases is ~24 KB; what was added since the last compaction
    // comes on top.
    assert!(len < 48_000, "journal compacted while running: {len} bytes");
    kill9(&mut broker);
    step("dies", broker.child.wait()).await.unwrap();

    let (broker, _) = start(dir.path(), &flags).await;
    let mut c = client(&broker.addr).await;
    let again = step(
        "recv",
        c.recv(RecvRequest {
            address: "compact.x".into(),
            group: "w".into(),
            max_messages: 1000,
            wait: None,
            max_bytes: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .messages;
    let redelivered: BTreeSet<u64> = again
        .iter()
        .filter(|m| m.delivery_attempt == 2)
        .map(|m| m.sequence)
        .collect();
    assert_eq!(
        redelivered, leased,
        "exactly the unacknowledged leases come again"
    );
    // Then the group goes on where it was: the 2,000 handed out, next is 2,001.
    let fresh: Vec<u64> = again
        .iter()
        .filter(|m| m.delivery_attempt == 1)
        .map(|m| m.sequence)
        .collect();
    assert!(fresh.is_empty(), "nothing new was sent: {fresh:?}");
    assert_eq!(send_id(&mut c, "compact.x", "next", "").await.0, 2_001);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_survive_sigkill_and_last_deliveries_are_dead_lettered_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let (mut broker, _) = start(dir.path(), &[]).await;
    let mut c = client(&broker.addr).await;
    step(
        "create",
        c.create_group(CreateGroupRequest {
            address: "dl.src".into(),
            group: "g".into(),
            start_sequence: 1,
            ack_wait: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            max_deliveries: 1,
            dead_letter_address: "dl.q".into(),
            max_ack_pending: 100,
            ..Default::default()
        }),
    )
    .await
    .unwrap();
    for i in 1..=3 {
        send_id(&mut c, "dl.src", &format!("m{i}"), "").await;
    }
    assert_eq!(recv_seqs(&mut c, "dl.src", "g", 10).await, vec![1, 2, 3]);
    step(
        "ack 1",
        c.ack(AckRequest {
            address: "dl.src".into(),
            group: "g".into(),
            sequences: vec![1],
        }),
    )
    .await
    .unwrap();
    // A Nack on the last allowed delivery dead-letters 2 at once.
    step(
        "nack 2",
        c.nack(switchboard::pb::NackRequest {
            address: "dl.src".into(),
            group: "g".into(),
            sequences: vec![2],
            delay: None,
        }),
    )
    .await
    .unwrap();
    let dlq_header = |m: &switchboard::pb::Message| {
        m.headers
            .get("switchboard-dead-letter-sequence")
            .cloned()
            .unwrap_or_default()
    };
    let first = step(
        "dead letter",
        c.recv(RecvRequest {
            address: "dl.q".into(),
            group: String::new(),
            max_messages: 10,
            wait: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            max_bytes: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .messages;
    assert_eq!(first.iter().map(dlq_header).collect::<Vec<_>>(), vec!["2"]);
    kill9(&mut broker);
    step("dies", broker.child.wait()).await.unwrap();

    let (broker, _) = start(dir.path(), &[]).await;
    let mut c = client(&broker.addr).await;
    // 3 was out on its last allowed delivery when the broker died: its lease counts as
    // expired, so it is dead-lettered, not delivered a second time; 1 was acknowledged.
    assert!(recv_seqs(&mut c, "dl.src", "g", 10).await.is_empty());
    let stored = read_all(&broker.addr, "dl.q").await;
    assert_eq!(
        stored.get(&1).map(Vec::as_slice),
        Some(&b"m2"[..]),
        "the dead letter of 2 survived"
    );
    let after = step(
        "dead letters after restart",
        c.recv(RecvRequest {
            address: "dl.q".into(),
            group: String::new(),
            max_messages: 10,
            wait: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
            max_bytes: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .messages;
    let seqs: Vec<String> = after.iter().map(dlq_header).collect();
    assert!(
        seqs.contains(&"3".to_string()),
        "3 is dead-lettered after the restart: {seqs:?}"
    );
    assert!(!seqs.contains(&"1".to_string()), "{seqs:?}");
}

/// `VmRSS` / `VmHWM` of a process, in bytes.
fn vm(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_cache_keeps_rss_below_the_data_and_reads_the_rest_back() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--cache-bytes",
        "8388608",
        "--max-retained-bytes",
        "536870912",
    ];
    let (mut broker, _) = start(dir.path(), &flags).await;
    let c = client(&broker.addr).await;
    // 240 MiB in 1 MiB messages over 4 addresses, each payload telling its address and index.
    let payload = |a: usize, i: usize| {
        let mut p = vec![u8::try_from(i % 251).unwrap(); MIB];
        p[..8].copy_from_slice(&(a * 1000 + i).to_le_bytes());
        p
    };
    for a in 0..4 {
        let reqs: Vec<SendRequest> = (0..60)
            .map(|i| SendRequest {
                address: format!("cache.{a}"),
                payload: payload(a, i).into(),
                ..Default::default()
            })
            .collect();
        let mut c = c.clone();
        let mut acks = step("send stream", c.send_stream(tokio_stream::iter(reqs)))
            .await
            .unwrap()
            .into_inner();
        let mut n = 0;
        while let Some(r) = step("ack", acks.message()).await.unwrap() {
            assert!(r.error.is_none(), "{:?}", r.error);
            n += 1;
        }
        assert_eq!(n, 60);
    }
    let pid = broker.child.id().unwrap();
    let rss = vm(pid, "VmRSS:");
    eprintln!(
        "RSS after 240 MiB sent with an 8 MiB cache: {} MiB",
        rss >> 20
    );
    assert!(
        rss < 160 << 20,
        "RSS {} MiB stays well below the 240 MiB sent",
        rss >> 20
    );
    // Everything reads back from the segments, byte-identical.
    for a in [0, 3] {
        let all = read_all(&broker.addr, &format!("cache.{a}")).await;
        assert_eq!(all.len(), 60);
        for (seq, p) in &all {
            assert!(
                *p == payload(a, usize::try_from(*seq).unwrap() - 1),
                "cache.{a} #{seq}"
            );
        }
    }
    kill9(&mut broker);
    step("dies", broker.child.wait()).await.unwrap();
    // Recovery reads every record but keeps only the cache's worth of payloads.
    let (broker, _) = start(dir.path(), &flags).await;
    let rss = vm(broker.child.id().unwrap(), "VmRSS:");
    eprintln!(
        "RSS after recovering 240 MiB with an 8 MiB cache: {} MiB",
        rss >> 20
    );
    assert!(rss < 160 << 20, "RSS {} MiB after recovery", rss >> 20);
    let all = read_all(&broker.addr, "cache.2").await;
    assert_eq!(all.get(&60), Some(&payload(2, 59)));
}

/// Retained messages out of the cache cost a share of a sparse index run (about 64 bytes per
/// 256 messages), not an entry each: 200,000 small messages move the broker's RSS by a few MiB
/// (one entry each, about 200 bytes, was 40 MB), before and after a restart, and all of them
/// read back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_out_of_the_cache_cost_a_sparse_index_not_an_entry_each() {
    const N: usize = 200_000;
    const BATCH: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--cache-bytes",
        "1048576",
        "--retention-messages",
        "1000000",
        "--retention-bytes",
        "536870912",
    ];
    let (mut broker, _) = start(dir.path(), &flags).await;
    let mut c = client(&broker.addr).await;
    let payload = |i: usize| format!("{i:064}").into_bytes();
    let send = |c: &mut BrokerClient<Channel>, from: usize| {
        let request = SendBatchRequest {
            address: "sparse.a".into(),
            messages: (from..from + BATCH)
                .map(|i| BatchMessage {
                    payload: payload(i).into(),
                    ..Default::default()
                })
                .collect(),
        };
        let mut c = c.clone();
        async move { step("send batch", c.send_batch(request)).await.unwrap() }
    };
    // A first batch warms up the connection and the allocator.
    send(&mut c, 0).await;
    let pid = broker.child.id().unwrap();
    let before = vm(pid, "VmRSS:");
    for from in (BATCH..N).step_by(BATCH) {
        send(&mut c, from).await;
    }
    let after = vm(pid, "VmRSS:");
    eprintln!(
        "RSS before {} KiB, after {N} messages {} KiB",
        before >> 10,
        after >> 10
    );
    assert!(
        after.saturating_sub(before) < 12 << 20,
        "{N} retained messages grew RSS by {} KiB",
        after.saturating_sub(before) >> 10
    );
    let all = read_all(&broker.addr, "sparse.a").await;
    assert_eq!(all.len(), N);
    for (seq, p) in [1u64, 2, 257, 99_999, 200_000].map(|s| (s, all.get(&s))) {
        assert_eq!(
            p,
            Some(&payload(usize::try_from(seq).unwrap() - 1)),
            "#{seq}"
        );
    }
    kill9(&mut broker);
    step("dies", broker.child.wait()).await.unwrap();
    // Recovery builds the same index: the address starts at sequence 1 with every message.
    // Recovery streams the records, read in 64 KiB chunks, into the runs: not even its peak
    // holds an entry per message or a whole segment file (that peaked 13-43 MiB higher here).
    let (broker, _) = start(dir.path(), &flags).await;
    let rss = vm(broker.child.id().unwrap(), "VmRSS:");
    let peak = vm(broker.child.id().unwrap(), "VmHWM:");
    eprintln!(
        "RSS after recovering {N} messages: {} KiB (peak {} KiB)",
        rss >> 10,
        peak >> 10
    );
    assert!(
        peak < before + (4 << 20),
        "peak RSS {} KiB during recovery (before the flood: {} KiB)",
        peak >> 10,
        before >> 10
    );
    let info = admin(&broker.addr)
        .await
        .get_address(GetAddressRequest {
            address: "sparse.a".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .address
        .unwrap();
    assert_eq!((info.first_sequence, info.retained_messages), (1, N as u64));
    let all = read_all(&broker.addr, "sparse.a").await;
    assert_eq!(all.len(), N);
    assert_eq!(all.get(&150_001), Some(&payload(150_000)));
}
