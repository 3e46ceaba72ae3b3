//! Send and Recv: the seeds' scenario, ordering, sequences, waits, batches, groups' starting points.

mod common;

use std::time::{Duration, SystemTime};

use common::{recv, send, step, TestServer};
use switchboard::pb::SendRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_sends_another_receives() {
    let server = TestServer::start().await;
    let mut receiver = server.client().await;
    let mut sender = server.client().await;
    let recv_task = tokio::spawn(async move {
        recv(&mut receiver, "address", "", 1, Duration::from_secs(10)).await
    });
    let send_task = tokio::spawn(async move { send(&mut sender, "address", b"message").await });
    let seq = step("send task", send_task).await.unwrap();
    let got = step("recv task", recv_task).await.unwrap();
    assert_eq!(seq, 1);
    assert_eq!(got.messages.len(), 1);
    assert_eq!(got.messages[0].payload.as_ref(), b"message");
    assert_eq!(got.messages[0].address, "address");
    assert_eq!(got.dropped, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_with_contiguous_sequences_and_sent_at() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let before = SystemTime::now();
    for i in 1..=100u64 {
        let mut headers = std::collections::HashMap::new();
        headers.insert("n".to_string(), i.to_string());
        let r = c
            .send(SendRequest {
                address: "fifo".into(),
                payload: format!("m{i}").into_bytes().into(),
                headers,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.sequence, i);
    }
    let got = recv(&mut c, "fifo", "", 1000, Duration::ZERO).await;
    assert_eq!(got.messages.len(), 100);
    for (i, m) in got.messages.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(m.sequence, n);
        assert_eq!(m.payload.as_ref(), format!("m{n}").as_bytes());
        assert_eq!(m.headers.get("n"), Some(&n.to_string()));
        let sent_at = SystemTime::try_from(m.sent_at.unwrap()).unwrap();
        assert!(sent_at >= before - Duration::from_secs(1) && sent_at <= SystemTime::now());
    }
    // Taken once by the default group: nothing left.
    assert!(recv(&mut c, "fifo", "", 10, Duration::ZERO)
        .await
        .messages
        .is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_batches_respect_max_messages() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for i in 0..25u8 {
        send(&mut c, "batch", &[i]).await;
    }
    // max_messages 0 means 1.
    let one = recv(&mut c, "batch", "", 0, Duration::ZERO).await;
    assert_eq!(one.messages.len(), 1);
    let ten = recv(&mut c, "batch", "", 10, Duration::ZERO).await;
    let seqs: Vec<u64> = ten.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(seqs, (2..=11).collect::<Vec<_>>());
    let rest = recv(&mut c, "batch", "", 1000, Duration::ZERO).await;
    assert_eq!(rest.messages.len(), 14);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_wait_returns_message_sent_during_wait() {
    let server = TestServer::start().await;
    let mut receiver = server.client().await;
    let mut sender = server.client().await;
    let waiting =
        tokio::spawn(
            async move { recv(&mut receiver, "later", "", 5, Duration::from_secs(15)).await },
        );
    // The Recv is waiting once the broker counts a waiter on the address; only then send.
    let broker = server.broker.clone();
    common::eventually("recv is waiting", || broker.waiting_recvs("later") == 1).await;
    send(&mut sender, "later", b"hello").await;
    let got = step("waiting recv", waiting).await.unwrap();
    assert_eq!(got.messages.len(), 1);
    assert_eq!(got.messages[0].payload.as_ref(), b"hello");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_wait_returns_empty_when_nothing_comes() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let got = recv(&mut c, "quiet", "", 5, Duration::from_millis(200)).await;
    assert!(got.messages.is_empty());
    assert_eq!(got.dropped, 0);
    // wait 0 returns at once with nothing.
    let got = recv(&mut c, "quiet", "", 5, Duration::ZERO).await;
    assert!(got.messages.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_wait_never_outlives_the_client_deadline() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut req = tonic::Request::new(switchboard::pb::RecvRequest {
        address: "deadline".into(),
        group: String::new(),
        max_messages: 1,
        wait: Some(prost_types::Duration {
            seconds: 60,
            nanos: 0,
        }),
        max_bytes: 0,
    });
    req.set_timeout(Duration::from_secs(1));
    // The broker answers (empty) before the client's deadline instead of DEADLINE_EXCEEDED.
    let got = step("recv with deadline", c.recv(req))
        .await
        .unwrap()
        .into_inner();
    assert!(got.messages.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_group_keeps_early_messages_named_group_starts_at_first_use() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    send(&mut c, "mailbox", b"early").await;
    // The named group did not exist yet: it starts after its first use.
    assert!(recv(&mut c, "mailbox", "audit", 10, Duration::ZERO)
        .await
        .messages
        .is_empty());
    send(&mut c, "mailbox", b"late").await;
    let audit = recv(&mut c, "mailbox", "audit", 10, Duration::ZERO).await;
    assert_eq!(audit.messages.len(), 1);
    assert_eq!(audit.messages[0].payload.as_ref(), b"late");
    // The default group existed from the address's creation: both are waiting there.
    let default = recv(&mut c, "mailbox", "", 10, Duration::ZERO).await;
    let payloads: Vec<&[u8]> = default
        .messages
        .iter()
        .map(|m| m.payload.as_ref())
        .collect();
    assert_eq!(payloads, vec![&b"early"[..], &b"late"[..]]);
    server.stop().await;
}

/// A client with gRPC's default receive limit (4 MiB), as most users have.
async fn default_client(
    server: &TestServer,
) -> switchboard::pb::broker_client::BrokerClient<tonic::transport::Channel> {
    switchboard::pb::broker_client::BrokerClient::connect(format!("http://{}", server.addr))
        .await
        .expect("connect to test server")
}

/// A broker on the disk engine in `dir`, with a small cache so most reads come from disk.
fn disk_broker(dir: &std::path::Path) -> switchboard::broker::Broker {
    use switchboard::engine::disk::{DiskConfig, FsyncMode, DEFAULT_JOURNAL_COMPACT_BYTES};
    switchboard::broker::Broker::with_disk(
        switchboard::config::Limits::default(),
        &DiskConfig {
            dir: dir.to_path_buf(),
            fsync: FsyncMode::Always,
            segment_bytes: 64 * 1024 * 1024,
            repair: false,
            journal_compact_bytes: DEFAULT_JOURNAL_COMPACT_BYTES,
            cache_bytes: 1024 * 1024,
        },
    )
    .expect("open the disk engine")
}

/// Creates group "acked" on `address` with a 60 s ack_wait.
async fn create_acked(
    c: &mut switchboard::pb::broker_client::BrokerClient<tonic::transport::Channel>,
    address: &str,
) {
    c.create_group(switchboard::pb::CreateGroupRequest {
        address: address.into(),
        group: "acked".into(),
        ack_wait: Some(Duration::from_secs(60).try_into().unwrap()),
        ..Default::default()
    })
    .await
    .expect("create the acknowledged group");
}

/// Recv of `group` in batches of up to 50 until empty, through a client with the default
/// receive limit: every batch decodes, and together they hold `expect` messages.
async fn recv_all_in_fitting_batches(
    c: &mut switchboard::pb::broker_client::BrokerClient<tonic::transport::Channel>,
    address: &str,
    group: &str,
    expect: usize,
) -> Vec<switchboard::pb::Message> {
    use prost::Message as _;
    let mut got = Vec::new();
    let mut batches = 0;
    loop {
        let r = step(
            "recv",
            c.recv(switchboard::pb::RecvRequest {
                address: address.into(),
                group: group.into(),
                max_messages: 50,
                ..Default::default()
            }),
        )
        .await
        .expect("a batch the default client can decode")
        .into_inner();
        assert!(
            r.encoded_len() <= 4 * 1024 * 1024,
            "{} bytes",
            r.encoded_len()
        );
        if r.messages.is_empty() {
            break;
        }
        batches += 1;
        got.extend(r.messages);
        assert!(got.len() <= expect, "more than sent");
    }
    assert_eq!(got.len(), expect, "every message, once");
    assert!(batches > 1, "5 MB cannot come in one 4 MiB response");
    got
}

/// 50 messages of 100 KB (5 MB) taken with max_messages 50 come in batches that fit a default
/// client's 4 MiB limit, none lost: the default group, an acknowledged group, and its
/// redeliveries after a Nack. Before the byte bound the first Recv took all 50 and failed
/// encoding (OUT_OF_RANGE), and the group's position had already moved past them.
async fn large_batches_fit_the_response(server: TestServer) {
    let mut big = server.client().await;
    let mut c = default_client(&server).await;
    let address = "big.batches";
    create_acked(&mut big, address).await;
    let payload = |i: u64| vec![u8::try_from(i % 251).unwrap(); 100_000];
    for i in 1..=50u64 {
        assert_eq!(send(&mut big, address, &payload(i)).await, i);
    }
    for group in ["", "acked"] {
        let got = recv_all_in_fitting_batches(&mut c, address, group, 50).await;
        for (m, i) in got.iter().zip(1..) {
            assert_eq!(m.sequence, i, "group {group:?}: in order, contiguous");
            assert_eq!(m.payload.as_ref(), payload(i).as_slice());
        }
    }
    // Redeliveries are bounded the same way.
    c.nack(switchboard::pb::NackRequest {
        address: address.into(),
        group: "acked".into(),
        sequences: (1..=50).collect(),
        ..Default::default()
    })
    .await
    .expect("nack");
    let again = recv_all_in_fitting_batches(&mut c, address, "acked", 50).await;
    // (The Redis engine hands out redeliveries due at the same moment in the order of their
    // sequences' decimal strings, so compare them as a set.)
    let mut seqs: Vec<u64> = again.iter().map(|m| m.sequence).collect();
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    assert!(again.iter().all(|m| m.delivery_attempt == 2));
    // `max_bytes` sets a smaller budget: two 100 KB messages fit in 250,000 bytes, three don't.
    send(&mut big, address, &payload(51)).await;
    send(&mut big, address, &payload(52)).await;
    send(&mut big, address, &payload(53)).await;
    let r = c
        .recv(switchboard::pb::RecvRequest {
            address: address.into(),
            max_messages: 50,
            max_bytes: 250_000,
            ..Default::default()
        })
        .await
        .expect("recv")
        .into_inner();
    let seqs: Vec<u64> = r.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(seqs, vec![51, 52]);
    server.stop().await;
}

/// A message too large for the caller's limit is refused with RESOURCE_EXHAUSTED naming
/// max_bytes and its sequence, and stays where it is: a caller with a higher limit gets it.
/// Before, it was taken, the default client failed to decode it, and it was gone.
async fn a_message_over_the_limit_is_refused_not_taken(server: TestServer) {
    let mut big = server.client().await;
    let mut c = default_client(&server).await;
    let address = "big.one";
    create_acked(&mut big, address).await;
    // The largest payload the broker accepts, plus a header: over a default client's 4 MiB.
    let payload = vec![7u8; 4 * 1024 * 1024];
    big.send(SendRequest {
        address: address.into(),
        payload: payload.clone().into(),
        headers: [("k".to_string(), "v".to_string())].into(),
        message_id: String::new(),
    })
    .await
    .expect("send the largest message");
    for group in ["", "acked"] {
        for _ in 0..2 {
            let refused = c
                .recv(switchboard::pb::RecvRequest {
                    address: address.into(),
                    group: group.into(),
                    max_messages: 10,
                    ..Default::default()
                })
                .await
                .expect_err("over the default client's limit");
            assert_eq!(
                refused.code(),
                tonic::Code::ResourceExhausted,
                "{refused:?}"
            );
            assert!(refused.message().contains("max_bytes"), "{refused:?}");
            assert!(refused.message().contains("sequence 1"), "{refused:?}");
        }
        let r = big
            .recv(switchboard::pb::RecvRequest {
                address: address.into(),
                group: group.into(),
                max_messages: 10,
                max_bytes: u32::MAX,
                ..Default::default()
            })
            .await
            .expect("a client with a higher limit")
            .into_inner();
        assert_eq!(r.messages.len(), 1, "group {group:?}: still there");
        assert_eq!(r.messages[0].sequence, 1);
        assert_eq!(r.messages[0].payload.as_ref(), payload.as_slice());
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_fit_the_response_memory() {
    large_batches_fit_the_response(TestServer::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batches_fit_the_response_disk() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve(Default::default(), disk_broker(dir.path())).await;
    large_batches_fit_the_response(server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_refused_not_taken_memory() {
    a_message_over_the_limit_is_refused_not_taken(TestServer::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_limit_is_refused_not_taken_disk() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::serve(Default::default(), disk_broker(dir.path())).await;
    a_message_over_the_limit_is_refused_not_taken(server).await;
}
