//! Graceful shutdown: open streams end with UNAVAILABLE, long-polls return, the server stops.

mod common;

use std::time::Duration;

use common::{recv, step, subscribe, TestServer};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_stream_ends_with_unavailable_and_waiting_recv_returns() {
    let server = TestServer::start().await;
    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "live", "").await;
    let mut group_stream = subscribe(&mut sub_client, "live", "g").await;
    let mut recv_client = server.client().await;
    let waiting = tokio::spawn(async move {
        recv(&mut recv_client, "polled", "", 1, Duration::from_secs(60)).await
    });
    let broker = server.broker.clone();
    common::eventually("recv waiting", || broker.waiting_recvs("polled") == 1).await;

    let stopping = tokio::spawn(server.stop());
    for s in [&mut stream, &mut group_stream] {
        let status = step("stream ends", s.message())
            .await
            .expect_err("stream ends with a status");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "server shutting down");
    }
    let r = step("recv returns", waiting).await.unwrap();
    assert!(r.messages.is_empty());
    step("server stopped", stopping).await.unwrap();
}
