//! SendBatch over a real server: consecutive sequences in one step, all-or-nothing validation
//! naming the index, limits, deduplication inside and across batches, delivery to subscribers.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{next_event, recv, send, step, subscribe, TestServer};
use switchboard::{
    config::Limits,
    pb::{subscribe_response::Event, BatchMessage, SendBatchRequest},
};
use tonic::Code;

fn batch(address: &str, payloads: &[&[u8]]) -> SendBatchRequest {
    SendBatchRequest {
        address: address.into(),
        messages: payloads
            .iter()
            .map(|p| BatchMessage {
                payload: p.to_vec().into(),
                ..Default::default()
            })
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_gets_consecutive_sequences_and_is_delivered_in_order() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut stream = subscribe(&mut c, "b.orders", "").await;
    send(&mut c, "b.orders", b"single").await;
    let payloads: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; 3]).collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    let r = step("batch", c.send_batch(batch("b.orders", &refs)))
        .await
        .unwrap()
        .into_inner();
    let seqs: Vec<u64> = r.results.iter().map(|r| r.sequence).collect();
    assert_eq!(seqs, (2..=101).collect::<Vec<_>>());
    assert!(r.results.iter().all(|r| !r.duplicate && r.error.is_none()));
    for want in 1..=101u64 {
        match next_event(&mut stream).await {
            Event::Message(m) => {
                assert_eq!(m.sequence, want);
                if want > 1 {
                    assert_eq!(m.payload.as_ref(), [u8::try_from(want - 2).unwrap(); 3]);
                }
            }
            Event::Dropped(d) => panic!("dropped {}", d.count),
        }
    }
    let got = recv(&mut c, "b.orders", "", 1000, Duration::ZERO).await;
    assert_eq!(got.messages.len(), 101);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_shares_one_sent_at_and_counts_each_message_sent() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let before = server.scrape().await;
    send(&mut c, "b.stamp", b"before").await;
    // Small payloads of mixed sizes (some share a copy buffer, the largest get their own).
    let payloads: Vec<Vec<u8>> = (0..300usize)
        .map(|i| vec![u8::try_from(i % 251).unwrap(); [0, 1, 100, 1500][i % 4]])
        .collect();
    let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
    step("batch", c.send_batch(batch("b.stamp", &refs)))
        .await
        .unwrap();
    let after = server.scrape().await;
    let key = "switchboard_messages_sent_total";
    let sent = after.get(key).copied().unwrap_or(0.0) - before.get(key).copied().unwrap_or(0.0);
    assert_eq!(sent, 301.0, "the single Send and every batched message");
    let got = recv(&mut c, "b.stamp", "", 1000, Duration::ZERO).await;
    assert_eq!(got.messages.len(), 301);
    let stamps: Vec<_> = got.messages.iter().map(|m| m.sent_at.unwrap()).collect();
    assert!(
        stamps[1..].iter().all(|t| *t == stamps[1]),
        "one sent_at per batch"
    );
    let at = |t: &prost_types::Timestamp| (t.seconds, t.nanos);
    assert!(at(&stamps[0]) <= at(&stamps[1]));
    for (m, want) in got.messages[1..].iter().zip(&payloads) {
        assert_eq!(
            m.payload.as_ref(),
            want.as_slice(),
            "sequence {}",
            m.sequence
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_message_refuses_the_whole_batch_naming_its_index() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert_eq!(send(&mut c, "b.bad", b"first").await, 1);
    let mut req = batch("b.bad", &[b"a", b"b", b"c", b"d"]);
    req.messages[3].payload = vec![0u8; 4 * 1024 * 1024 + 1].into();
    let e = c.send_batch(req).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().starts_with("messages[3]: payload:"),
        "{}",
        e.message()
    );
    let mut req = batch("b.bad", &[b"a", b"b"]);
    req.messages[1].headers = HashMap::from([(String::new(), "v".to_string())]);
    let e = c.send_batch(req).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("messages[1]: headers"),
        "{}",
        e.message()
    );
    let mut req = batch("b.bad", &[b"a"]);
    req.messages[0].message_id = "x".repeat(256);
    let e = c.send_batch(req).await.unwrap_err();
    assert!(
        e.message().starts_with("messages[0]: message_id"),
        "{}",
        e.message()
    );
    for n in [0usize, 1001] {
        let payloads = vec![b"x".as_slice(); n];
        let e = c.send_batch(batch("b.bad", &payloads)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().starts_with("messages:"), "{}", e.message());
    }
    let e = c
        .send_batch(batch("bad address", &[b"x"]))
        .await
        .unwrap_err();
    assert!(e.message().starts_with("address"), "{}", e.message());
    // Nothing of any refused batch was stored.
    assert_eq!(send(&mut c, "b.bad", b"next").await, 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_bytes_are_bounded_by_retention_bytes() {
    let server = TestServer::with_limits(Limits {
        max_message_bytes: 1024,
        retention_bytes: 10 * 1024,
        max_retained_bytes: 10 * 1024,
        ..Limits::default()
    })
    .await;
    let mut c = server.client().await;
    let big = vec![0u8; 1000];
    let payloads = vec![big.as_slice(); 10];
    let e = c.send_batch(batch("b.bytes", &payloads)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().starts_with("messages:") && e.message().contains("--retention-bytes"),
        "{}",
        e.message()
    );
    assert!(!server.exists("b.bytes").await);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_inside_and_across_batches_are_not_stored() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut req = batch("b.dedup", &[b"a", b"b", b"a-again"]);
    req.messages[0].message_id = "id-a".into();
    req.messages[2].message_id = "id-a".into();
    let r = c.send_batch(req).await.unwrap().into_inner();
    let got: Vec<(u64, bool)> = r
        .results
        .iter()
        .map(|r| (r.sequence, r.duplicate))
        .collect();
    assert_eq!(got, [(1, false), (2, false), (1, true)]);
    let mut req = batch("b.dedup", &[b"a", b"c"]);
    req.messages[0].message_id = "id-a".into();
    let r = c.send_batch(req).await.unwrap().into_inner();
    let got: Vec<(u64, bool)> = r
        .results
        .iter()
        .map(|r| (r.sequence, r.duplicate))
        .collect();
    assert_eq!(got, [(1, true), (3, false)]);
    assert_eq!(server.retained("b.dedup").await, 3);
    server.stop().await;
}
