//! Limits on what one client can take, each enforced with a clear RESOURCE_EXHAUSTED.

mod common;

use common::{send, subscribe, TestServer};
use switchboard::{
    config::{Limits, ServerConfig},
    pb::{DeleteAddressRequest, RecvRequest, SendRequest, SubscribeRequest},
};
use tonic::Code;

fn assert_limit(status: tonic::Status, flag: &str) {
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(flag),
        "{:?} should name {flag}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_addresses() {
    let server = TestServer::with_limits(Limits {
        max_addresses: 3,
        ..Limits::default()
    })
    .await;
    let mut c = server.client().await;
    for a in ["l.1", "l.2", "l.3"] {
        send(&mut c, a, b"x").await;
    }
    let req = |address: &str| SendRequest {
        address: address.into(),
        ..Default::default()
    };
    assert_limit(c.send(req("l.4")).await.unwrap_err(), "--max-addresses");
    assert_limit(
        c.recv(RecvRequest {
            address: "l.4".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "--max-addresses",
    );
    assert_limit(
        c.subscribe(SubscribeRequest {
            address: "l.4".into(),
            group: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        "--max-addresses",
    );
    assert!(!server.broker.contains("l.4"));
    // Existing addresses keep working.
    assert_eq!(send(&mut c, "l.1", b"y").await, 2);
    // Deleting one makes room.
    server
        .admin()
        .await
        .delete_address(DeleteAddressRequest {
            address: "l.2".into(),
        })
        .await
        .unwrap();
    assert_eq!(send(&mut c, "l.4", b"z").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_subscribers_per_address() {
    let server = TestServer::with_limits(Limits {
        max_subscribers_per_address: 2,
        ..Limits::default()
    })
    .await;
    let mut c1 = server.client().await;
    let mut c2 = server.client().await;
    let s1 = subscribe(&mut c1, "crowded", "").await;
    let _s2 = subscribe(&mut c2, "crowded", "g").await;
    let mut c3 = server.client().await;
    let refused = c3
        .subscribe(SubscribeRequest {
            address: "crowded".into(),
            group: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_limit(refused, "--max-subscribers-per-address");
    // Another address is not affected.
    let _other = subscribe(&mut c3, "quiet", "").await;
    drop(s1);
    drop(c1);
    let broker = server.broker.clone();
    common::eventually("a place frees up", || {
        broker.subscriber_count("crowded") == 1
    })
    .await;
    let _s3 = subscribe(&mut c3, "crowded", "").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_streams_per_connection() {
    let server = TestServer::with_config(ServerConfig {
        max_streams_per_connection: 3,
        ..ServerConfig::default()
    })
    .await;
    let mut c = server.client().await;
    let _a = subscribe(&mut c, "s.a", "").await;
    let _b = subscribe(&mut c, "s.b", "").await;
    let (_tx, rx) = tokio::sync::mpsc::channel::<SendRequest>(1);
    let _stream = c
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let refused = c
        .subscribe(SubscribeRequest {
            address: "s.c".into(),
            group: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_limit(refused, "--max-streams-per-connection");
    // Unary calls on the same connection still work, and so do other connections.
    assert_eq!(send(&mut c, "s.c", b"x").await, 1);
    let mut other = server.client().await;
    let _d = subscribe(&mut other, "s.c", "").await;
    server.stop().await;
}
