//! Load and isolation: many connections at once, nothing lost.

mod common;

use std::collections::HashSet;

use common::{step, TestServer};
use switchboard::pb::{subscribe_response::Event, SendRequest, SubscribeRequest};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_connections_send_and_subscribe_and_nothing_is_lost() {
    const CONNECTIONS: usize = 500;
    let server = TestServer::start().await;
    // Phase 1: every connection subscribes (registered once `subscribe` returns).
    let mut clients = Vec::with_capacity(CONNECTIONS);
    let mut streams = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let mut c = server.client().await;
        let s = step(
            "subscribe",
            c.subscribe(SubscribeRequest {
                address: "load.all".into(),
                group: String::new(),
                ..Default::default()
            }),
        )
        .await
        .expect("subscribe accepted")
        .into_inner();
        clients.push(c);
        streams.push(s);
    }
    assert_eq!(server.broker.subscriber_count("load.all"), CONNECTIONS);
    // Phase 2: every connection sends one message at the same time, while all stream.
    let mut readers = Vec::new();
    for mut s in streams {
        readers.push(tokio::spawn(async move {
            let mut seen = HashSet::new();
            while seen.len() < CONNECTIONS {
                let r = s.message().await.expect("stream ok").expect("stream open");
                match r.event {
                    Some(Event::Message(m)) => assert!(seen.insert(m.sequence), "duplicate"),
                    other => panic!("unexpected {other:?}"),
                }
            }
            seen
        }));
    }
    let mut senders = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut c = c.clone();
        senders.push(tokio::spawn(async move {
            c.send(SendRequest {
                address: "load.all".into(),
                payload: i.to_be_bytes().to_vec().into(),
                headers: Default::default(),
                message_id: String::new(),
            })
            .await
            .expect("send ok")
            .into_inner()
            .sequence
        }));
    }
    let mut acked = HashSet::new();
    for s in senders {
        acked.insert(step("send", s).await.unwrap());
    }
    assert_eq!(acked, (1..=CONNECTIONS as u64).collect::<HashSet<_>>());
    // Every acknowledged message reached every subscriber.
    for r in readers {
        assert_eq!(step("reader", r).await.unwrap(), acked);
    }
    drop(clients);
    server.stop().await;
}
