//! Raw HTTP/2 abuse: malformed bodies, oversized frames, a wrong content-type, unknown methods.
//! Each gets a gRPC status (or an HTTP error for a non-gRPC request), nothing panics, and the
//! broker keeps serving others.

mod common;

use bytes::{BufMut, Bytes, BytesMut};
use common::{send, step, TestServer};
use http::{HeaderMap, Request};

/// The outcome of one raw call: HTTP status and the `grpc-status` / `grpc-message` it ended with.
#[derive(Debug)]
struct Outcome {
    http: u16,
    grpc_status: Option<i32>,
    grpc_message: String,
}

fn grpc_of(h: &HeaderMap) -> Option<(i32, String)> {
    let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
    let msg = h
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    Some((code, msg))
}

async fn raw_call(server: &TestServer, path: &str, content_type: &str, body: Bytes) -> Outcome {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let request = Request::post(format!("http://{}{path}", server.addr))
        .header("content-type", content_type)
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut stream) = client.send_request(request, false).unwrap();
    stream.send_data(body, true).unwrap();
    let response = step("response", response).await.unwrap();
    let http = response.status().as_u16();
    if let Some((code, msg)) = grpc_of(response.headers()) {
        return Outcome {
            http,
            grpc_status: Some(code),
            grpc_message: msg,
        };
    }
    let mut body = response.into_body();
    while let Some(chunk) = step("body", body.data()).await {
        if chunk.is_err() {
            break;
        }
    }
    let trailers = step("trailers", body.trailers()).await.ok().flatten();
    let (grpc_status, grpc_message) = trailers
        .as_ref()
        .and_then(grpc_of)
        .map_or((None, String::new()), |(c, m)| (Some(c), m));
    Outcome {
        http,
        grpc_status,
        grpc_message,
    }
}

fn frame(len_prefix: u32, bytes: &[u8]) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(len_prefix);
    b.put_slice(bytes);
    b.freeze()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_gets_statuses_and_the_broker_keeps_serving() {
    let server = TestServer::start().await;
    let grpc = "application/grpc";
    let garbage = [0xffu8, 0xff, 0xff, 0xff, 0x0f, 0x12, 0x99];

    // Malformed protobuf, through tonic (Send) and through our Subscribe route.
    for path in ["/switchboard.v1.Broker/Send", "/switchboard.v1.Broker/Recv"] {
        let o = raw_call(&server, path, grpc, frame(7, &garbage)).await;
        assert_eq!(o.http, 200, "{path}: {o:?}");
        assert!(matches!(o.grpc_status, Some(c) if c != 0), "{path}: {o:?}");
    }
    let o = raw_call(
        &server,
        "/switchboard.v1.Broker/Subscribe",
        grpc,
        frame(7, &garbage),
    )
    .await;
    assert_eq!(o.grpc_status, Some(3), "INVALID_ARGUMENT: {o:?}");
    assert!(o.grpc_message.contains("SubscribeRequest"), "{o:?}");

    // A length prefix far above the limit (1 GiB), with a little data behind it.
    for path in [
        "/switchboard.v1.Broker/Send",
        "/switchboard.v1.Broker/Subscribe",
    ] {
        let o = raw_call(&server, path, grpc, frame(1 << 30, &[0u8; 1024])).await;
        assert!(matches!(o.grpc_status, Some(c) if c != 0), "{path}: {o:?}");
    }
    // A truncated frame (prefix says more than was sent).
    let o = raw_call(
        &server,
        "/switchboard.v1.Broker/Subscribe",
        grpc,
        frame(100, b"ab"),
    )
    .await;
    assert_eq!(o.grpc_status, Some(3), "{o:?}");

    // Unknown methods and services.
    for path in ["/switchboard.v1.Broker/Nope", "/no.such.Service/Call"] {
        let o = raw_call(&server, path, grpc, frame(0, &[])).await;
        assert_eq!(o.grpc_status, Some(12), "UNIMPLEMENTED for {path}: {o:?}");
    }

    // A wrong content-type: refused, with an HTTP or gRPC error, never a success.
    let o = raw_call(
        &server,
        "/switchboard.v1.Broker/Send",
        "text/plain",
        Bytes::from_static(b"hi"),
    )
    .await;
    assert!(
        o.http != 200 || matches!(o.grpc_status, Some(c) if c != 0),
        "{o:?}"
    );

    // The broker still serves everyone, and nothing was stored by the abuse.
    assert_eq!(server.broker.address_count(), 0);
    let mut c = server.client().await;
    assert_eq!(send(&mut c, "after.abuse", b"ok").await, 1);
    server.stop().await;
}
