//! A client that goes away frees its subscriber; idle addresses are reclaimed.

mod common;

use std::time::Duration;

use common::{eventually, recv, send, subscribe, TestServer};
use switchboard::config::Limits;

fn quick_reclaim() -> Limits {
    Limits {
        idle_address: Duration::from_millis(50),
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_frees_its_subscriber_and_the_address_is_reclaimed() {
    let server = TestServer::with_limits(quick_reclaim()).await;
    let broker = server.broker.clone();
    {
        let mut client = server.client().await;
        let _stream = subscribe(&mut client, "ephemeral", "").await;
        assert_eq!(broker.subscriber_count("ephemeral"), 1);
        // The address is live while a subscriber is there, even past the idle time.
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(broker.contains("ephemeral"));
        // Client and stream dropped here: the connection closes, the server drops the stream.
    }
    eventually("subscriber freed", || {
        broker.subscriber_count("ephemeral") == 0
    })
    .await;
    eventually("address reclaimed", || !broker.contains("ephemeral")).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_messages_stay_as_history_and_keep_their_address() {
    let server = TestServer::with_limits(quick_reclaim()).await;
    let broker = server.broker.clone();
    let mut c = server.client().await;
    send(&mut c, "kept", b"waiting for a reader").await;
    send(&mut c, "read", b"read at once").await;
    assert_eq!(
        recv(&mut c, "read", "", 10, Duration::ZERO)
            .await
            .messages
            .len(),
        1
    );
    // A witness address touched after both: once it is reclaimed, a sweep has run with both
    // idle for longer than the idle period.
    {
        let mut client = server.client().await;
        let _stream = subscribe(&mut client, "witness", "").await;
    }
    eventually("witness reclaimed", || !broker.contains("witness")).await;
    // Retention is history: both keep their message, read or not, and so their address.
    assert_eq!(broker.retained_messages("kept"), 1);
    assert_eq!(broker.retained_messages("read"), 1);
    assert_eq!(send(&mut c, "read", b"again").await, 2, "sequences go on");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_whose_history_aged_out_are_reclaimed() {
    let server = TestServer::with_limits(Limits {
        retention_age: Duration::from_millis(100),
        ..quick_reclaim()
    })
    .await;
    let broker = server.broker.clone();
    let mut c = server.client().await;
    for i in 0..200 {
        let address = format!("churn.{i}");
        send(&mut c, &address, b"x").await;
        assert_eq!(
            recv(&mut c, &address, "", 1, Duration::ZERO)
                .await
                .messages
                .len(),
            1
        );
    }
    eventually("all churned addresses aged out and reclaimed", || {
        broker.address_count() == 0
    })
    .await;
    assert_eq!(broker.total_retained_bytes(), 0);
    // A reclaimed address starts over: sequences restart (documented).
    assert_eq!(send(&mut c, "churn.0", b"again").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reclaim_never_forgets_a_groups_unreported_loss() {
    const MSG: usize = 1000 + 128;
    let server = TestServer::with_limits(Limits {
        max_message_bytes: 1024,
        retention_bytes: 2 * MSG,
        max_retained_bytes: 2 * MSG,
        ..quick_reclaim()
    })
    .await;
    let broker = server.broker.clone();
    let mut c = server.client().await;
    // "behind" has a reading group; "pubsub" has only its (never read) default group.
    recv(&mut c, "behind", "g", 1, Duration::ZERO).await;
    send(&mut c, "behind", &[1; 1000]).await;
    send(&mut c, "pubsub", &[2; 1000]).await;
    // Two more elsewhere: the broker-wide bound evicts both older messages.
    send(&mut c, "elsewhere", &[3; 1000]).await;
    send(&mut c, "elsewhere", &[3; 1000]).await;
    assert_eq!(broker.retained_messages("behind"), 0);
    assert_eq!(broker.retained_messages("pubsub"), 0);
    // "pubsub" owes nobody a report and is reclaimed; "behind" is kept for its group.
    eventually("pubsub reclaimed", || !broker.contains("pubsub")).await;
    assert!(broker.contains("behind"));
    let r = recv(&mut c, "behind", "g", 10, Duration::ZERO).await;
    assert_eq!(r.dropped, 1, "the group is told, even after the idle time");
    // Reported: now it may go.
    eventually("behind reclaimed after the report", || {
        !broker.contains("behind")
    })
    .await;
    server.stop().await;
}
