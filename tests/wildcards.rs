//! Wildcard (pattern) subscriptions over a real server: NATS subject syntax, addresses created
//! after the subscription, order per address, exact loss accounting, and what a pattern refuses.

mod common;

use std::collections::HashMap;

use common::{next_event, send, step, TestServer};
use switchboard::pb::{
    broker_client::BrokerClient, subscribe_response::Event, SendRequest, SubscribeRequest,
    SubscribeResponse,
};
use tonic::{transport::Channel, Code, Streaming};

async fn subscribe(c: &mut BrokerClient<Channel>, pattern: &str) -> Streaming<SubscribeResponse> {
    step(
        "subscribe",
        c.subscribe(SubscribeRequest {
            address: pattern.into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner()
}

async fn next_message(s: &mut Streaming<SubscribeResponse>) -> (String, u64, Vec<u8>) {
    match next_event(s).await {
        Event::Message(m) => (m.address, m.sequence, m.payload.to_vec()),
        Event::Dropped(d) => panic!("dropped {}", d.count),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_stream_gets_every_matching_address_in_order() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // One address exists before the subscription; the others are created after it.
    send(&mut c, "orders.eu.created", b"before").await;
    let mut created = subscribe(&mut c, "orders.*.created").await;
    let mut everything = subscribe(&mut c, "orders.>").await;
    send(&mut c, "orders.eu.created", b"eu-2").await;
    send(&mut c, "orders.us.created", b"us-1").await;
    send(&mut c, "orders.us.shipped", b"us-shipped").await;
    send(&mut c, "orders", b"bare").await; // `>` needs one more token
    send(&mut c, "orders.us.created.late", b"deep").await;
    send(&mut c, "invoices.eu.created", b"other").await;
    send(&mut c, "orders.us.created", b"us-2").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(next_message(&mut created).await);
    }
    assert_eq!(
        got,
        vec![
            ("orders.eu.created".to_string(), 2, b"eu-2".to_vec()),
            ("orders.us.created".to_string(), 1, b"us-1".to_vec()),
            ("orders.us.created".to_string(), 2, b"us-2".to_vec()),
        ]
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(next_message(&mut everything).await);
    }
    let addresses: Vec<&str> = got.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(
        addresses,
        [
            "orders.eu.created",
            "orders.us.created",
            "orders.us.shipped",
            "orders.us.created.late",
            "orders.us.created"
        ]
    );
    // Nothing else arrives: a marker sent last is the next event of each stream.
    send(&mut c, "orders.zz.created", b"marker").await;
    assert_eq!(next_message(&mut created).await.2, b"marker");
    assert_eq!(next_message(&mut everything).await.2, b"marker");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_pattern_stream_is_told_exactly_what_it_lost() {
    // More than the queue (16,384) plus what HTTP/2 flow control lets the client buffer
    // (a 2 MiB stream window: ~20,000 of these frames).
    const N: u64 = 100_000;
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "lag.>").await;
    // The subscriber reads nothing while 100,000 messages go to two matching addresses.
    let requests = tokio_stream::iter((0..N).map(|i| SendRequest {
        address: format!("lag.{}", i % 2),
        payload: [i.to_be_bytes().as_slice(), &[0u8; 56]].concat().into(),
        ..Default::default()
    }));
    let mut acks = c.send_stream(requests).await.unwrap().into_inner();
    while step("ack", acks.message()).await.unwrap().is_some() {}
    let mut received = 0u64;
    let mut dropped = 0u64;
    let mut last: HashMap<String, u64> = HashMap::new();
    while received + dropped < N {
        match next_event(&mut stream).await {
            Event::Message(m) => {
                let prev = last.insert(m.address.clone(), m.sequence).unwrap_or(0);
                assert!(m.sequence > prev, "in order per address");
                received += 1;
            }
            Event::Dropped(d) => dropped += d.count,
        }
    }
    assert_eq!(received + dropped, N, "delivered + dropped = sent");
    assert!(dropped > 0, "the bounded queue overflowed");
    // And it is live again.
    send(&mut c, "lag.0", b"after").await;
    assert_eq!(next_message(&mut stream).await.2, b"after");
    // Dropping the stream unregisters the pattern.
    drop(stream);
    let broker = server.broker.clone();
    common::eventually("pattern unregistered", || {
        broker.pattern_subscriptions() == 0
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn patterns_refuse_groups_and_start_positions() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for (req, field) in [
        (
            SubscribeRequest {
                address: "a.*".into(),
                group: "g".into(),
                ..Default::default()
            },
            "group",
        ),
        (
            SubscribeRequest {
                address: "a.>".into(),
                start_sequence: 1,
                ..Default::default()
            },
            "start_sequence",
        ),
        (
            SubscribeRequest {
                address: "a.>".into(),
                start_time: Some(std::time::SystemTime::now().into()),
                ..Default::default()
            },
            "start_time",
        ),
    ] {
        let e = c.subscribe(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    // Send still refuses wildcards.
    let e = c
        .send(SendRequest {
            address: "a.*".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    server.stop().await;
}
