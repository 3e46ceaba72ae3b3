//! Consumer groups: competing Recv callers and group streams each take a message exactly once.

mod common;

use std::{collections::HashSet, time::Duration};

use common::{next_event, recv, send, step, subscribe, TestServer};
use switchboard::pb::{subscribe_response::Event, SendRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_recv_callers_take_ten_thousand_messages_exactly_once() {
    const N: u64 = 10_000;
    let server = TestServer::start().await;
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut c = server.client().await;
        workers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let r = recv(&mut c, "jobs", "workers", 37, Duration::from_secs(2)).await;
                assert_eq!(r.dropped, 0);
                if r.messages.is_empty() {
                    return got;
                }
                // Each batch is in order.
                assert!(r.messages.windows(2).all(|w| w[0].sequence < w[1].sequence));
                got.extend(r.messages.into_iter().map(|m| m.sequence));
            }
        }));
    }
    // Create the named group before sending, so it starts at message 1.
    let mut c = server.client().await;
    recv(&mut c, "jobs", "workers", 1, Duration::ZERO).await;
    let mut senders = Vec::new();
    for part in 0..4u64 {
        let mut c = server.client().await;
        senders.push(tokio::spawn(async move {
            for i in 0..N / 4 {
                c.send(SendRequest {
                    address: "jobs".into(),
                    payload: (part * N + i).to_be_bytes().to_vec().into(),
                    headers: Default::default(),
                    message_id: String::new(),
                })
                .await
                .unwrap();
            }
        }));
    }
    for s in senders {
        step("sender", s).await.unwrap();
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(step("worker", w).await.unwrap());
    }
    let unique: HashSet<u64> = all.iter().copied().collect();
    assert_eq!(all.len() as u64, N, "every message received once");
    assert_eq!(unique.len() as u64, N, "no duplicates");
    assert_eq!(unique, (1..=N).collect::<HashSet<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_group_streams_split_messages_without_duplicates() {
    const N: usize = 3_000;
    let server = TestServer::start().await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, u64)>();
    let mut members = Vec::new();
    for id in 0..3 {
        let mut client = server.client().await;
        let mut stream = subscribe(&mut client, "tasks", "pool").await;
        let tx = tx.clone();
        members.push(tokio::spawn(async move {
            let _client = client;
            loop {
                match stream.message().await {
                    Ok(Some(r)) => match r.event {
                        Some(Event::Message(m)) => {
                            if tx.send((id, m.sequence)).is_err() {
                                return;
                            }
                        }
                        other => panic!("unexpected event {other:?}"),
                    },
                    _ => return,
                }
            }
        }));
    }
    drop(tx);
    assert_eq!(server.broker.subscriber_count("tasks"), 3);
    let mut c = server.client().await;
    for i in 0..N {
        send(&mut c, "tasks", &i.to_be_bytes()).await;
    }
    let mut seen = HashSet::new();
    while seen.len() < N {
        let (id, seq) = step("group delivery", rx.recv())
            .await
            .expect("members alive");
        assert!(seen.insert(seq), "sequence {seq} delivered twice");
        assert!(id < 3);
    }
    assert_eq!(seen, (1..=N as u64).collect::<HashSet<_>>());
    // Every message went to the group; none is left for it.
    assert!(recv(&mut c, "tasks", "pool", 10, Duration::ZERO)
        .await
        .messages
        .is_empty());
    server.stop().await;
    for m in members {
        step("member ends", m).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_stream_and_recv_compete_for_the_same_messages() {
    let server = TestServer::start().await;
    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "mixed", "g").await;
    let mut c = server.client().await;
    send(&mut c, "mixed", b"one").await;
    let first = match next_event(&mut stream).await {
        Event::Message(m) => m.sequence,
        other => panic!("{other:?}"),
    };
    assert_eq!(first, 1);
    // The stream took message 1; Recv on the same group does not see it again.
    send(&mut c, "mixed", b"two").await;
    let mut seen = vec![first];
    let r = recv(&mut c, "mixed", "g", 10, Duration::ZERO).await;
    seen.extend(r.messages.iter().map(|m| m.sequence));
    if seen.len() == 1 {
        match next_event(&mut stream).await {
            Event::Message(m) => seen.push(m.sequence),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, vec![1, 2]);
    server.stop().await;
}
