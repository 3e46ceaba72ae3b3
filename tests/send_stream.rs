//! SendStream: pipelined sends, one response per request in order; refusals do not end it.

mod common;

use common::{recv, step, TestServer};
use switchboard::pb::SendRequest;
use tokio_stream::StreamExt;
use tonic::Code;

fn req(address: &str, payload: &[u8]) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: payload.to_vec().into(),
        headers: Default::default(),
        message_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_in_order_and_refusals_do_not_end_the_stream() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut requests: Vec<SendRequest> = (0..1000u32)
        .map(|i| req("piped", &i.to_be_bytes()))
        .collect();
    requests.insert(500, req("bad address", b"x"));
    requests.insert(700, req("piped", &vec![0; 4 * 1024 * 1024 + 1]));
    let mut responses = step("open", c.send_stream(tokio_stream::iter(requests)))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(r) = step("response", responses.next()).await {
        got.push(r.unwrap());
    }
    assert_eq!(got.len(), 1002, "one response per request");
    let bad = &got[500];
    assert_eq!(bad.sequence, 0);
    let e = bad.error.as_ref().unwrap();
    assert_eq!(e.code, Code::InvalidArgument as i32);
    assert!(e.message.contains("address"), "{}", e.message);
    let big = &got[700];
    assert_eq!(big.sequence, 0);
    assert_eq!(
        big.error.as_ref().unwrap().code,
        Code::ResourceExhausted as i32
    );
    let seqs: Vec<u64> = got
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 500 && *i != 700)
        .map(|(_, r)| {
            assert!(r.error.is_none());
            r.sequence
        })
        .collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<_>>());
    // Every accepted message is stored, in order, and only those.
    let r = recv(&mut c, "piped", "", 1000, std::time::Duration::ZERO).await;
    assert_eq!(r.messages.len(), 1000);
    for (i, m) in r.messages.iter().enumerate() {
        assert_eq!(m.payload.as_ref(), u32::try_from(i).unwrap().to_be_bytes());
    }
    // Unary Send never sets `error`.
    let unary = c.send(req("piped", b"u")).await.unwrap().into_inner();
    assert_eq!((unary.sequence, unary.error), (1001, None));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_send_stream_ends_with_unavailable_at_shutdown() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let (tx, rx) = tokio::sync::mpsc::channel::<SendRequest>(4);
    let mut responses = c
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(req("s", b"1")).await.unwrap();
    assert_eq!(
        step("first", responses.next())
            .await
            .unwrap()
            .unwrap()
            .sequence,
        1
    );
    let stopping = tokio::spawn(server.stop());
    let status = step("ends", responses.next()).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    drop(tx);
    step("stopped", stopping).await.unwrap();
}
