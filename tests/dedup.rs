//! Publish deduplication over a real server: a retried Send with the same `message_id` stores
//! nothing and returns the first sequence; ids are per address; the window ends; racing senders
//! store exactly one message; SendStream deduplicates too.

mod common;

use std::time::Duration;

use common::{recv, step, TestServer};
use switchboard::{
    config::Limits,
    pb::{broker_client::BrokerClient, SendRequest, SendResponse},
};
use tonic::{transport::Channel, Code};

fn req(address: &str, payload: &[u8], id: &str) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: payload.to_vec().into(),
        message_id: id.into(),
        ..Default::default()
    }
}

async fn send_id(
    c: &mut BrokerClient<Channel>,
    address: &str,
    payload: &[u8],
    id: &str,
) -> SendResponse {
    step("send", c.send(req(address, payload, id)))
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_send_is_stored_and_delivered_once() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let first = send_id(&mut c, "d.orders", b"order 1", "order-1").await;
    assert_eq!((first.sequence, first.duplicate), (1, false));
    let retry = send_id(&mut c, "d.orders", b"order 1", "order-1").await;
    assert_eq!((retry.sequence, retry.duplicate), (1, true));
    // Another id, and the same id on another address, are new messages.
    assert_eq!(
        send_id(&mut c, "d.orders", b"order 2", "order-2")
            .await
            .sequence,
        2
    );
    let other = send_id(&mut c, "d.invoices", b"x", "order-1").await;
    assert_eq!((other.sequence, other.duplicate), (1, false));
    let got = recv(&mut c, "d.orders", "", 10, Duration::ZERO).await;
    let payloads: Vec<&[u8]> = got.messages.iter().map(|m| m.payload.as_ref()).collect();
    assert_eq!(payloads, [b"order 1".as_slice(), b"order 2"]);
    // SendStream deduplicates the same way.
    let mut responses = c
        .send_stream(tokio_stream::iter(vec![
            req("d.orders", b"order 1", "order-1"),
            req("d.orders", b"order 3", "order-3"),
            req("d.orders", b"order 3", "order-3"),
        ]))
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(r) = step("stream", responses.message()).await.unwrap() {
        seen.push((r.sequence, r.duplicate));
    }
    assert_eq!(seen, [(1, true), (3, false), (3, true)]);
    assert_eq!(server.retained("d.orders").await, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_window_the_same_id_is_a_new_message() {
    let server = TestServer::with_limits(Limits {
        dedup_window: Duration::from_millis(200),
        ..Limits::default()
    })
    .await;
    let mut c = server.client().await;
    assert!(!send_id(&mut c, "d.window", b"a", "id").await.duplicate);
    assert!(send_id(&mut c, "d.window", b"a", "id").await.duplicate);
    // Let the window pass (time passing is the subject here, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(250)).await;
    let again = send_id(&mut c, "d.window", b"a", "id").await;
    assert_eq!((again.sequence, again.duplicate), (2, false));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_racing_senders_store_exactly_one_message() {
    let server = TestServer::start().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let mut c = server.client().await;
        tasks.push(tokio::spawn(async move {
            send_id(&mut c, "d.race", b"once", "the-id").await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(step("sender", t).await.unwrap());
    }
    assert!(results.iter().all(|r| r.sequence == 1));
    assert_eq!(results.iter().filter(|r| !r.duplicate).count(), 1);
    assert_eq!(server.retained("d.race").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_are_checked_and_a_zero_window_turns_dedup_off() {
    let server = TestServer::with_limits(Limits {
        dedup_window: Duration::ZERO,
        ..Limits::default()
    })
    .await;
    let mut c = server.client().await;
    let e = c
        .send(req("d.bad", b"x", &"i".repeat(256)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("message_id"), "{}", e.message());
    assert!(!server.exists("d.bad").await);
    assert!(!send_id(&mut c, "d.off", b"x", "id").await.duplicate);
    let second = send_id(&mut c, "d.off", b"x", "id").await;
    assert_eq!((second.sequence, second.duplicate), (2, false));
    server.stop().await;
}
