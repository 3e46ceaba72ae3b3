//! Fan-out: every subscriber sees every message sent after it subscribed, in order, byte-identical.

mod common;

use common::{next_event, send, subscribe, TestServer};
use switchboard::pb::subscribe_response::Event;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_subscribers_each_see_every_message_in_order() {
    const N: u64 = 2_000;
    let server = TestServer::start().await;
    let mut c = server.client().await;
    // Sent before anyone subscribed: not part of any subscription.
    send(&mut c, "news", b"before").await;

    let mut readers = Vec::new();
    for _ in 0..8 {
        let mut client = server.client().await;
        // Returns once registered: everything sent after this is delivered.
        let mut stream = subscribe(&mut client, "news", "").await;
        readers.push(tokio::spawn(async move {
            let mut got = Vec::new();
            while (got.len() as u64) < N {
                match next_event(&mut stream).await {
                    Event::Message(m) => got.push((m.sequence, m.payload)),
                    Event::Dropped(d) => panic!("unexpected Dropped({})", d.count),
                }
            }
            got
        }));
    }
    assert_eq!(server.broker.subscriber_count("news"), 8);

    let payload = |i: u64| -> Vec<u8> {
        (0..u8::try_from(i % 251).unwrap())
            .chain(i.to_le_bytes())
            .collect()
    };
    for i in 0..N {
        send(&mut c, "news", &payload(i)).await;
    }
    for r in readers {
        let got = common::step("reader", r).await.unwrap();
        assert_eq!(got.len() as u64, N);
        for (i, (seq, p)) in got.iter().enumerate() {
            let i = i as u64;
            assert_eq!(*seq, i + 2, "sequence order");
            assert_eq!(p.as_ref(), payload(i).as_slice(), "byte-identical payload");
        }
    }
    server.stop().await;
}
