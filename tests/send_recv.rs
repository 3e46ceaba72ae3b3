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
