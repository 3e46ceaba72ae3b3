//! Lag is never silent: whoever falls behind the retention window is told the exact count lost.

mod common;

use std::time::Duration;

use common::{recv, send, step, subscribe, TestServer};
use switchboard::{config::Limits, pb::subscribe_response::Event};

fn small_window() -> Limits {
    Limits {
        retention_messages: 100,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_gets_dropped_with_exact_count() {
    // 1,000 × 32 KiB = 32 MiB: far more than HTTP/2 windows and buffers hold, so the
    // subscriber must fall behind the 100-message window while it does not read.
    const N: u64 = 1_000;
    let server = TestServer::with_limits(small_window()).await;
    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "firehose", "").await;
    // Two fast subscribers next to the stalled one: they keep up and lose nothing.
    let mut fast = Vec::new();
    for _ in 0..2 {
        let mut c = server.client().await;
        let mut s = subscribe(&mut c, "firehose", "").await;
        fast.push(tokio::spawn(async move {
            let _c = c;
            let mut next = 1u64;
            while next <= N {
                match common::next_event(&mut s).await {
                    Event::Message(m) => {
                        assert_eq!(m.sequence, next, "fast subscriber in order");
                        next += 1;
                    }
                    Event::Dropped(d) => panic!("fast subscriber dropped {}", d.count),
                }
            }
        }));
    }
    let mut c = server.client().await;
    let payload = vec![7u8; 32 * 1024];
    for _ in 0..N {
        send(&mut c, "firehose", &payload).await;
    }
    for f in fast {
        step("fast subscriber", f).await.unwrap();
    }
    // Now read everything: messages plus dropped counts must account for every message sent,
    // with sequences contiguous across each Dropped gap.
    let mut expected = 1u64;
    let mut dropped_total = 0u64;
    let mut received = 0u64;
    while expected <= N {
        let event = step("lagging subscriber", stream.message())
            .await
            .expect("stream ok")
            .expect("stream open")
            .event
            .expect("event");
        match event {
            Event::Message(m) => {
                assert_eq!(m.sequence, expected, "no silent gap");
                assert_eq!(m.payload.len(), payload.len());
                expected += 1;
                received += 1;
            }
            Event::Dropped(d) => {
                assert!(d.count > 0);
                expected += d.count;
                dropped_total += d.count;
            }
        }
    }
    assert_eq!(expected, N + 1, "dropped counts are exact");
    assert_eq!(received + dropped_total, N);
    assert!(
        dropped_total > 0,
        "the stalled subscriber was told it lost messages"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_behind_the_window_sees_dropped_in_recv() {
    let server = TestServer::with_limits(small_window()).await;
    let mut c = server.client().await;
    // Create the named group at sequence 1.
    assert!(recv(&mut c, "backlog", "slow", 1, Duration::ZERO)
        .await
        .messages
        .is_empty());
    for i in 0..250u32 {
        send(&mut c, "backlog", &i.to_be_bytes()).await;
    }
    for group in ["slow", ""] {
        let r = recv(&mut c, "backlog", group, 1000, Duration::ZERO).await;
        assert_eq!(
            r.dropped, 150,
            "group {group:?}: exactly the evicted messages"
        );
        let seqs: Vec<u64> = r.messages.iter().map(|m| m.sequence).collect();
        assert_eq!(seqs, (151..=250).collect::<Vec<_>>());
        // Reported once.
        let again = recv(&mut c, "backlog", group, 1000, Duration::ZERO).await;
        assert_eq!(again.dropped, 0);
        assert!(again.messages.is_empty());
    }
    server.stop().await;
}
