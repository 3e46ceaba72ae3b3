//! Retention bounds: per-address count and bytes, and the broker-wide byte bound that evicts the
//! oldest messages first, whichever address holds them.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{recv, send, TestServer};
use proptest::prelude::*;
use switchboard::{
    config::Limits,
    pb::{BatchMessage, SendBatchRequest},
    shutdown::Shutdown,
    validate::{Address, Group},
    Broker,
};

const MSG: usize = 1000 + 128; // payload + per-message overhead

/// Room for ten 1,000-byte messages, per address and broker-wide.
fn ten_messages_broker_wide() -> Limits {
    Limits {
        max_message_bytes: 1024,
        retention_bytes: 10 * MSG,
        max_retained_bytes: 10 * MSG,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_bound_evicts_oldest_across_addresses_and_tells_the_group() {
    let server = TestServer::with_limits(ten_messages_broker_wide()).await;
    let mut c = server.client().await;
    for _ in 0..5 {
        send(&mut c, "old", &[1; 1000]).await;
    }
    for _ in 0..5 {
        send(&mut c, "new", &[2; 1000]).await;
    }
    assert_eq!(server.broker.total_retained_bytes(), 10 * MSG);
    // Two more on a third address: the two oldest broker-wide ("old" 1 and 2) leave.
    send(&mut c, "third", &[3; 1000]).await;
    send(&mut c, "third", &[3; 1000]).await;
    assert!(server.broker.total_retained_bytes() <= 10 * MSG);
    let old = recv(&mut c, "old", "", 100, Duration::ZERO).await;
    assert_eq!(old.dropped, 2);
    assert_eq!(
        old.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    let new = recv(&mut c, "new", "", 100, Duration::ZERO).await;
    assert_eq!((new.dropped, new.messages.len()), (0, 5));
    let third = recv(&mut c, "third", "", 100, Duration::ZERO).await;
    assert_eq!((third.dropped, third.messages.len()), (0, 2));
    // Retention is history: consumed messages stay until a bound removes them.
    assert_eq!(server.broker.total_retained_bytes(), 10 * MSG);
    assert_eq!(server.broker.retained_messages("third"), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_bound_counts_batched_messages_like_single_sends() {
    let server = TestServer::with_limits(ten_messages_broker_wide()).await;
    let mut c = server.client().await;
    let batch = |address: &str, n: usize, byte: u8| SendBatchRequest {
        address: address.into(),
        messages: (0..n)
            .map(|_| BatchMessage {
                payload: vec![byte; 1000].into(),
                ..Default::default()
            })
            .collect(),
    };
    c.send_batch(batch("old", 5, 1)).await.unwrap();
    c.send_batch(batch("new", 5, 2)).await.unwrap();
    // Every batched message is charged to the broker-wide budget.
    assert_eq!(server.broker.total_retained_bytes(), 10 * MSG);
    // A batch of two more: the two oldest broker-wide ("old" 1 and 2) leave.
    c.send_batch(batch("third", 2, 3)).await.unwrap();
    assert_eq!(server.broker.total_retained_bytes(), 10 * MSG);
    let old = recv(&mut c, "old", "", 100, Duration::ZERO).await;
    assert_eq!(old.dropped, 2);
    assert_eq!(
        old.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert!(old.messages.iter().all(|m| m.payload.as_ref() == [1; 1000]));
    let third = recv(&mut c, "third", "", 100, Duration::ZERO).await;
    assert_eq!((third.dropped, third.messages.len()), (0, 2));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_address_byte_bound_evicts_oldest_of_that_address() {
    let limits = Limits {
        max_message_bytes: 1024,
        retention_bytes: 3 * MSG,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut c = server.client().await;
    for _ in 0..5 {
        send(&mut c, "bytes", &[0; 1000]).await;
    }
    send(&mut c, "other", &[0; 1000]).await;
    assert_eq!(server.broker.retained_bytes("bytes"), 3 * MSG);
    let r = recv(&mut c, "bytes", "", 100, Duration::ZERO).await;
    assert_eq!(r.dropped, 2);
    assert_eq!(r.messages.len(), 3);
    assert_eq!(
        server.broker.retained_messages("other"),
        1,
        "other addresses untouched"
    );
    server.stop().await;
}

#[derive(Debug, Clone)]
enum Op {
    Send { address: u8, len: usize },
    Recv { address: u8, max: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..4, 0usize..600).prop_map(|(address, len)| Op::Send { address, len }),
        1 => (0u8..4, 1usize..20).prop_map(|(address, max)| Op::Recv { address, max }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Window invariants: retained bytes never exceed the bounds, and for the default group
    /// every message is either received or counted as dropped, exactly once.
    #[test]
    fn delivered_plus_dropped_equals_sent(ops in proptest::collection::vec(op(), 1..300)) {
        let limits = Limits {
            max_message_bytes: 600,
            retention_messages: 7,
            retention_bytes: 3_000,
            max_retained_bytes: 6_000,
            idle_address: Duration::from_secs(3600),
            ..Limits::default()
        };
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let broker = Broker::new(limits.clone());
        let shutdown = Shutdown::new();
        let mut token = shutdown.token();
        let mut sent = [0u64; 4];
        let mut accounted = [0u64; 4];
        let mut next = [1u64; 4];
        let group = Group::default();
        for op in ops {
            match op {
                Op::Send { address, len } => {
                    let a = Address::parse(format!("p{address}")).unwrap();
                    let seq = rt.block_on(broker.send(&a, Bytes::from(vec![0; len]), Default::default())).unwrap();
                    sent[address as usize] += 1;
                    prop_assert_eq!(seq, sent[address as usize]);
                }
                Op::Recv { address, max } => {
                    let a = Address::parse(format!("p{address}")).unwrap();
                    let b = rt.block_on(broker.recv(&a, &group, max, usize::MAX, Duration::ZERO, &mut token)).unwrap();
                    let i = address as usize;
                    next[i] += b.dropped;
                    for m in &b.messages {
                        prop_assert_eq!(m.message.sequence, next[i], "contiguous after dropped gaps");
                        next[i] += 1;
                    }
                    accounted[i] += b.dropped + b.messages.len() as u64;
                }
            }
            prop_assert!(broker.total_retained_bytes() <= limits.max_retained_bytes);
            for i in 0..4 {
                let name = format!("p{i}");
                prop_assert!(broker.retained_bytes(&name) <= limits.retention_bytes);
                prop_assert!(broker.retained_messages(&name) <= limits.retention_messages);
            }
        }
        // Drain: everything sent is now received or reported dropped.
        for i in 0..4u8 {
            let a = Address::parse(format!("p{i}")).unwrap();
            let b = rt.block_on(broker.recv(&a, &group, 1000, usize::MAX, Duration::ZERO, &mut token)).unwrap();
            accounted[i as usize] += b.dropped + b.messages.len() as u64;
            prop_assert_eq!(accounted[i as usize], sent[i as usize]);
        }
        // Reading removes nothing (only the bounds do), and sequences are never reused.
        prop_assert!(broker.total_retained_bytes() <= limits.max_retained_bytes);
        for (i, &n) in sent.iter().enumerate() {
            if n > 0 {
                let info = broker.address_info(&format!("p{i}"), false).unwrap().0;
                prop_assert_eq!(info.last_sequence, n);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_bound_evicts_with_exact_dropped() {
    let server = TestServer::with_limits(Limits {
        retention_age: Duration::from_secs(1),
        idle_address: Duration::from_secs(3600),
        ..Limits::default()
    })
    .await;
    let mut c = server.client().await;
    for i in 1..=3u8 {
        send(&mut c, "aged", &[i]).await;
    }
    let broker = server.broker.clone();
    // The periodic sweep removes them without any read or send on the address.
    common::eventually("aged out", || broker.retained_messages("aged") == 0).await;
    assert_eq!(send(&mut c, "aged", b"fresh").await, 4, "sequences go on");
    let r = recv(&mut c, "aged", "", 10, Duration::ZERO).await;
    assert_eq!(r.dropped, 3, "the default group is told exactly");
    assert_eq!(
        r.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        vec![4]
    );
    // A replay from 1 gets the same account.
    let mut s = c
        .subscribe(switchboard::pb::SubscribeRequest {
            address: "aged".into(),
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    use switchboard::pb::subscribe_response::Event;
    assert!(matches!(common::next_event(&mut s).await, Event::Dropped(d) if d.count == 3));
    assert!(matches!(common::next_event(&mut s).await, Event::Message(m) if m.sequence == 4));
    server.stop().await;
}
