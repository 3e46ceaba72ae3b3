//! The disk engine (`--data-dir`) with the real binary: kill -9 at a random moment loses nothing
//! acknowledged; torn tails are cut, corruption (also of the last complete record) and a log
//! that ends before its high-water mark refuse to start without `--repair`, which never gives a
//! sequence out twice; a full disk refuses Sends with UNAVAILABLE, cuts back what it let through
//! half-way (segments and journal) and recovers; one broker per directory.
//!
//! The crash test runs `SWITCHBOARD_CRASH_ROUNDS` rounds (3 by default; `scripts/crash` runs 20).

mod common;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    prereq::{require, MOUNT_TMPFS},
    sigterm, step, BrokerProcess,
};
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

/// Starts the broker on `dir` expecting it to refuse; returns its stderr. Fails as soon as it
/// listens instead.
async fn refused_start(dir: &Path) -> String {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut stderr = String::new();
    while let Some(line) = step("refused start", lines.next_line()).await.unwrap() {
        assert!(
            !line.contains("listen="),
            "started instead of refusing: {stderr}{line}"
        );
        stderr.push_str(&line);
        stderr.push('\n');
    }
    let status = step("exit", child.wait()).await.unwrap();
    assert!(!status.success(), "refuses to start: {stderr}");
    stderr
}

/// The address's segment files, oldest first.
fn segments_of(dir: &Path) -> Vec<PathBuf> {
    let mut segs: Vec<PathBuf> = walk(dir)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    segs
}

/// Segment files moved aside by `--repair` (in a `set-aside-*` directory of the address).
fn set_aside(dir: &Path) -> Vec<PathBuf> {
    segments_of(dir)
        .into_iter()
        .filter(|p| {
            p.parent()
                .and_then(|d| d.file_name())
                .is_some_and(|n| n.to_string_lossy().starts_with("set-aside-"))
        })
        .collect()
}

/// (retained messages, last sequence) of `address`, from GetAddress.
async fn retained(addr: &str, address: &str) -> (u64, u64) {
    let info = step(
        "get address",
        admin(addr).await.get_address(GetAddressRequest {
            address: address.into(),
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .address
    .unwrap();
    (info.retained_messages, info.last_sequence)
}

/// One Send on a new connection; its sequence.
async fn send_one(addr: &str, address: &str, payload: &[u8]) -> u64 {
    step(
        "send",
        client(addr).await.send(SendRequest {
            address: address.into(),
            payload: payload.to_vec().into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .sequence
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
    // A write cut short by a crash: the first bytes of an 11th record (its declared length runs
    // past the end of the file). Cut; all 10 acknowledged messages served; the next Send is 11.
    let dir = tempfile::tempdir().unwrap();
    let ends = fill(dir.path(), "torn.cut", 10).await;
    let seg = segment_of(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    let record = bytes[usize::try_from(ends[8]).unwrap()..].to_vec();
    bytes.extend_from_slice(&record[..record.len() - 5]);
    std::fs::write(&seg, &bytes).unwrap();
    let (broker, early) = start(dir.path(), &[]).await;
    let cut = record.len() - 5;
    assert!(
        early
            .iter()
            .any(|l| l.contains("torn tail truncated") && l.contains(&format!("bytes={cut}"))),
        "recovery logs the {cut} bytes cut: {early:#?}"
    );
    assert_eq!(read_all(&broker.addr, "torn.cut").await, expected(10));
    assert_eq!(send_one(&broker.addr, "torn.cut", b"m11").await, 11);
    drop(broker);

    // A tail of zeros (a file extended but never written, as some filesystems leave after a
    // power cut) is no record either: cut.
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), "torn.zeros", 10).await;
    let seg = segment_of(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes.extend_from_slice(&[0u8; 4096]);
    std::fs::write(&seg, &bytes).unwrap();
    let (broker, early) = start(dir.path(), &[]).await;
    assert!(
        early
            .iter()
            .any(|l| l.contains("torn tail truncated") && l.contains("bytes=4096")),
        "{early:#?}"
    );
    assert_eq!(read_all(&broker.addr, "torn.zeros").await, expected(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_complete_last_record_refuses_to_start() {
    // The whole record is there but fails its CRC: corruption, not a torn write. Cutting it
    // would lose an acknowledged message and give its sequence out again.
    let dir = tempfile::tempdir().unwrap();
    let ends = fill(dir.path(), "flip.last", 10).await;
    let seg = segment_of(dir.path());
    let mut bytes = std::fs::read(&seg).unwrap();
    // The last byte of record 10: its payload.
    let at = usize::try_from(ends[9]).unwrap() - 1;
    bytes[at] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();

    let stderr = refused_start(dir.path()).await;
    for needle in [
        "\"flip.last\"".to_string(),
        "sequence 10".to_string(),
        seg.file_name().unwrap().to_string_lossy().into_owned(),
        format!("byte {}", ends[8]),
        "CRC mismatch".to_string(),
        "--repair".to_string(),
    ] {
        assert!(stderr.contains(&needle), "names {needle}: {stderr}");
    }
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "nothing is cut");

    // --repair: sequence 10 was acknowledged (the high-water mark says so), so the address
    // continues at 11; the 9 intact messages are set aside, not served under a gap.
    let (broker, early) = start(dir.path(), &["--repair"]).await;
    assert!(early.iter().any(|l| l.contains("--repair")), "{early:#?}");
    assert_eq!(retained(&broker.addr, "flip.last").await, (0, 10));
    assert_eq!(send_one(&broker.addr, "flip.last", b"after").await, 11);
    assert_eq!(set_aside(dir.path()).len(), 1, "{:?}", walk(dir.path()));
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
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        bytes,
        "nothing is cut without --repair"
    );

    // Sequences 5 to 10 were acknowledged: --repair gives none of them out again. The address
    // continues at 11, and what survived (1 to 4) is set aside rather than served with a gap.
    let (broker, early) = start(dir.path(), &["--repair"]).await;
    assert!(early.iter().any(|l| l.contains("--repair")), "{early:#?}");
    assert_eq!(retained(&broker.addr, "mid.flip").await, (0, 10));
    assert_eq!(send_one(&broker.addr, "mid.flip", b"after").await, 11);
    let aside = set_aside(dir.path());
    assert_eq!(aside.len(), 1, "{:?}", walk(dir.path()));
    assert_eq!(
        std::fs::metadata(&aside[0]).unwrap().len(),
        ends[3],
        "the 4 intact records are kept on disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_or_truncated_last_segment_refuses_to_start() {
    // 24 records of 64 KiB in segments of 1 MiB: 1-16 and 17-24.
    async fn two_segments(dir: &Path) -> Vec<PathBuf> {
        let (mut broker, _) = start(dir, &["--segment-bytes", "1048576"]).await;
        for i in 1..=24u64 {
            let seq = send_one(
                &broker.addr,
                "hw.x",
                &vec![u8::try_from(i).unwrap(); 64 * 1024],
            )
            .await;
            assert_eq!(seq, i);
        }
        sigterm(&broker.child);
        assert!(step("exit", broker.child.wait()).await.unwrap().success());
        let segs = segments_of(dir);
        assert_eq!(segs.len(), 2, "{segs:?}");
        assert!(segs[1].ends_with("00000000000000000017.seg"), "{segs:?}");
        segs
    }

    // Deleted: nothing on disk says sequences 17-24 existed but the high-water mark.
    let dir = tempfile::tempdir().unwrap();
    let segs = two_segments(dir.path()).await;
    std::fs::remove_file(&segs[1]).unwrap();
    let stderr = refused_start(dir.path()).await;
    for needle in [
        "\"hw.x\"",
        "00000000000000000017.seg",
        "missing",
        "sequence 24",
        "ends at sequence 16",
        "--repair",
    ] {
        assert!(stderr.contains(needle), "names {needle}: {stderr}");
    }
    // --repair continues past the mark: no sequence is given out twice, also after another
    // restart (without --repair).
    let (mut broker, early) = start(dir.path(), &["--repair"]).await;
    assert!(early.iter().any(|l| l.contains("--repair")), "{early:#?}");
    assert_eq!(send_one(&broker.addr, "hw.x", b"after").await, 25);
    sigterm(&broker.child);
    assert!(step("exit", broker.child.wait()).await.unwrap().success());
    let (broker, _) = start(dir.path(), &[]).await;
    let all = read_all(&broker.addr, "hw.x").await;
    assert_eq!(all.keys().copied().collect::<Vec<_>>(), vec![25]);
    assert_eq!(send_one(&broker.addr, "hw.x", b"again").await, 26);
    assert_eq!(set_aside(dir.path()).len(), 1, "{:?}", walk(dir.path()));
    drop(broker);

    // Truncated: at a record boundary (nothing looks torn), and inside record 21 (looks like a
    // torn write, but the mark says 21-24 were durable). 17-20 remain. Nothing is cut.
    for cut_into in [0, 100] {
        let dir = tempfile::tempdir().unwrap();
        let segs = two_segments(dir.path()).await;
        let len = std::fs::metadata(&segs[1]).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&segs[1])
            .unwrap();
        f.set_len(len / 8 * 4 + cut_into).unwrap();
        drop(f);
        let stderr = refused_start(dir.path()).await;
        for needle in [
            "00000000000000000017.seg",
            "sequence 24",
            "ends early",
            "ends at sequence 20",
            "--repair",
        ] {
            assert!(stderr.contains(needle), "names {needle}: {stderr}");
        }
        assert_eq!(
            std::fs::metadata(&segs[1]).unwrap().len(),
            len / 8 * 4 + cut_into,
            "nothing is cut without --repair"
        );
    }
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
    let body = common::metrics_text(&metrics_addr).await;
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

/// A small filesystem of our own: a tmpfs with `size=`, unmounted on drop. Mounting needs
/// `CAP_SYS_ADMIN`: a test using it starts with `require(&MOUNT_TMPFS)`.
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
            "mount a {size} tmpfs (CAP_SYS_ADMIN is there, so this should work): {}",
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
    if !require(&MOUNT_TMPFS) {
        return;
    }
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

/// Fills the filesystem `path` is on with `path` (in whole pages, so shortening it by 4 KiB
/// frees exactly one page) until a write fails: the filesystem is full.
fn fill_up(path: &Path) -> std::fs::File {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let page = [0u8; 4096];
    while let Ok(4096) = f.write(&page) {}
    f
}

/// Shortens `f` by one page, so the filesystem has that much free.
fn free_a_page(f: &std::fs::File) {
    let len = f.metadata().unwrap().len();
    f.set_len(len / 4096 * 4096 - 4096).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_a_full_disk_cut_short_is_cut_back_and_later_sends_survive() {
    // A 64 KiB record is not a multiple of the page size, so the Send that meets the full
    // disk writes part of its record (up to the end of the last free page) before ENOSPC.
    // Those bytes must go: the Sends acknowledged once space returns are written right after
    // the last acknowledged record, read back from the segment (no cache) and survive a
    // restart, with contiguous sequences.
    if !require(&MOUNT_TMPFS) {
        return;
    }
    let fs = SmallFs::mount("3m");
    let data = fs.dir.path().join("data");
    let spare = fs.dir.path().join("spare");
    std::fs::write(&spare, vec![1u8; 512 * 1024]).unwrap();
    let (mut broker, _) = start(&data, &["--cache-bytes", "0"]).await;
    let mut c = client(&broker.addr).await;
    let payload = |seq: u64, len: usize| -> Vec<u8> {
        let mut p = vec![u8::try_from(seq % 251).unwrap(); len];
        p[..8].copy_from_slice(&seq.to_le_bytes());
        p
    };
    let mut acked = BTreeMap::new();
    let mut segment_len = 0;
    let refusal = loop {
        assert!(acked.len() < 64, "3 MiB fills within 64 Sends of 64 KiB");
        let next = acked.len() as u64 + 1;
        match c
            .send(SendRequest {
                address: "cut.x".into(),
                payload: payload(next, 64 * 1024).into(),
                ..Default::default()
            })
            .await
        {
            Ok(r) => {
                assert_eq!(r.into_inner().sequence, next);
                acked.insert(next, payload(next, 64 * 1024));
                segment_len = std::fs::metadata(segment_of(&data)).unwrap().len();
            }
            Err(status) => break status,
        }
    };
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("No space left on device"),
        "{}",
        refusal.message()
    );
    assert_eq!(
        std::fs::metadata(segment_of(&data)).unwrap().len(),
        segment_len,
        "the failed write is cut back to the last acknowledged record"
    );

    // Space returns; 30 more Sends are acknowledged, continuing the sequence.
    std::fs::remove_file(&spare).unwrap();
    for _ in 0..30 {
        let next = acked.len() as u64 + 1;
        let seq = step(
            "send after space returned",
            c.send(SendRequest {
                address: "cut.x".into(),
                payload: payload(next, 1024).into(),
                ..Default::default()
            }),
        )
        .await
        .expect("Sends succeed once space returns")
        .into_inner()
        .sequence;
        assert_eq!(seq, next);
        acked.insert(next, payload(next, 1024));
    }
    // (a) Out of the cache: every acknowledged message reads back from the segment.
    assert_eq!(read_all(&broker.addr, "cut.x").await, acked);

    // (b) A restart serves them all, sequences contiguous, and the next is new.
    sigterm(&broker.child);
    assert!(step("exit", broker.child.wait()).await.unwrap().success());
    let (broker, _) = start(&data, &["--cache-bytes", "0"]).await;
    let after = read_all(&broker.addr, "cut.x").await;
    assert_eq!(after, acked);
    let n = acked.len() as u64;
    assert_eq!(
        after.keys().copied().collect::<Vec<_>>(),
        (1..=n).collect::<Vec<_>>()
    );
    assert_eq!(send_one(&broker.addr, "cut.x", b"next").await, n + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_record_a_full_disk_cut_short_loses_no_ack() {
    // The same for the group journal: an Ack whose Done record (1,000 sequences, ~8 KB) meets
    // a full disk with one page free fails half-way; the Acks answered OK after space returns
    // must not be lost behind the partial record.
    if !require(&MOUNT_TMPFS) {
        return;
    }
    let fs = SmallFs::mount("4m");
    let data = fs.dir.path().join("data");
    let (mut broker, _) = start(&data, &[]).await;
    let mut c = client(&broker.addr).await;
    let address = "jcut.x";
    step(
        "create",
        c.create_group(CreateGroupRequest {
            address: address.into(),
            group: "g".into(),
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
    for b in 0..2 {
        let messages = (0..1000)
            .map(|i| BatchMessage {
                payload: format!("m{}", b * 1000 + i).into_bytes().into(),
                ..Default::default()
            })
            .collect();
        step(
            "send batch",
            c.send_batch(SendBatchRequest {
                address: address.into(),
                messages,
            }),
        )
        .await
        .unwrap();
    }
    let mut leased = BTreeSet::new();
    for _ in 0..2 {
        leased.extend(recv_seqs(&mut c, address, "g", 1000).await);
    }
    assert_eq!(leased, (1..=2000).collect::<BTreeSet<u64>>());
    let ack = |seqs: Vec<u64>| {
        let mut c = c.clone();
        async move {
            step(
                "ack",
                c.ack(AckRequest {
                    address: address.into(),
                    group: "g".into(),
                    sequences: seqs,
                }),
            )
            .await
        }
    };
    let mut acked: BTreeSet<u64> = (1..=100).collect();
    ack(acked.iter().copied().collect()).await.unwrap();

    // Full, then one page free: the journal's last page has `room` bytes left, and the Done
    // record of 1,000 sequences (8,016 bytes) must not fit in room + 4096. Small Acks (24
    // bytes each) use up the room first when there is too much of it.
    let journal = walk(&data)
        .into_iter()
        .find(|p| p.file_name().is_some_and(|n| n == "groups.journal"))
        .unwrap();
    let room = |journal: &Path| (4096 - std::fs::metadata(journal).unwrap().len() % 4096) % 4096;
    let filler_path = fs.dir.path().join("filler");
    let filler = fill_up(&filler_path);
    let mut one = 101;
    while room(&journal) >= 3800 {
        ack(vec![one]).await.unwrap();
        acked.insert(one);
        one += 1;
    }
    free_a_page(&filler);
    let before = std::fs::metadata(&journal).unwrap().len();
    let failed: Vec<u64> = (one..one + 1000).collect();
    let refusal = ack(failed.clone()).await.unwrap_err();
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal:?}");
    assert!(
        refusal.message().contains("No space left on device"),
        "{}",
        refusal.message()
    );
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        before,
        "the failed journal write is cut back"
    );

    // Space returns: these Acks are answered OK, so they must hold after a restart.
    drop(filler);
    std::fs::remove_file(&filler_path).unwrap();
    let later: Vec<u64> = (one + 1000..one + 1400).collect();
    let r = ack(later.clone()).await.unwrap().into_inner();
    assert!(r.not_pending.is_empty(), "{:?}", r.not_pending);
    acked.extend(later);

    sigterm(&broker.child);
    assert!(step("exit", broker.child.wait()).await.unwrap().success());
    let (broker, _) = start(&data, &[]).await;
    let mut c = client(&broker.addr).await;
    // Every lease not acknowledged comes again (the failed Ack's too: it was not answered
    // OK); none that was.
    let mut again = BTreeSet::new();
    for _ in 0..2 {
        let got = step(
            "recv",
            c.recv(RecvRequest {
                address: address.into(),
                group: "g".into(),
                max_messages: 1000,
                wait: None,
                max_bytes: 0,
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .messages;
        assert!(
            got.iter().all(|m| m.delivery_attempt == 2),
            "redeliveries only"
        );
        again.extend(got.iter().map(|m| m.sequence));
    }
    let expected: BTreeSet<u64> = leased.difference(&acked).copied().collect();
    assert_eq!(again.len(), expected.len());
    assert!(
        again.is_disjoint(&acked),
        "acknowledged and delivered again: {:?}",
        again.intersection(&acked).collect::<Vec<_>>()
    );
    assert_eq!(again, expected);
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
