//! gRPC-Web: browsers' protocol, on the gRPC port (HTTP/1.1) and on the console's HTTP listener,
//! through tonic-web's client layer over a real HTTP/1.1 connection; the `-text` variant and
//! CORS preflights with raw HTTP/1.1 requests; permissions exactly as over gRPC.

mod common;

use std::{net::SocketAddr, time::Duration};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use common::{step_limit, TestServer};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use prost::Message as _;
use switchboard::{
    config::{Security, ServerConfig},
    grpc::{
        auth::{new_token, token_sha256},
        web::parse_origin,
    },
    pb::{
        broker_client::BrokerClient, subscribe_response::Event, RecvRequest, SendRequest,
        SendResponse, SubscribeRequest,
    },
};
use tonic::{metadata::MetadataValue, Code, Request};
use tonic_web::{GrpcWebClientLayer, GrpcWebClientService};

type WebChannel = GrpcWebClientService<
    Client<
        hyper_util::client::legacy::connect::HttpConnector,
        tonic_web::GrpcWebCall<tonic::body::Body>,
    >,
>;

/// A Broker client that speaks gRPC-Web over HTTP/1.1 (tonic-web's client layer on hyper's
/// HTTP/1.1 client): what a browser sends, byte for byte.
fn web_client(addr: SocketAddr) -> BrokerClient<WebChannel> {
    let http = Client::builder(TokioExecutor::new()).build_http();
    let svc = tower::ServiceBuilder::new()
        .layer(GrpcWebClientLayer::new())
        .service(http);
    let origin = format!("http://{addr}").parse().expect("origin uri");
    BrokerClient::with_origin(svc, origin)
}

fn send_req(address: &str, payload: &[u8]) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: Bytes::copy_from_slice(payload),
        ..Default::default()
    }
}

async fn step<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(step_limit(), f)
        .await
        .expect("step timed out")
}

/// Send, Recv and a Subscribe stream of 1,000 messages in order, all over gRPC-Web, against
/// `addr`; a second, ordinary gRPC client sends most of the messages.
async fn send_recv_subscribe(server: &TestServer, addr: SocketAddr, address: &str) {
    let mut web = web_client(addr);
    let mut grpc = server.client().await;

    let first = step(web.send(send_req(address, b"m-1")))
        .await
        .expect("gRPC-Web Send")
        .into_inner();
    assert_eq!(first.sequence, 1);
    assert!(!first.duplicate);

    let got = step(web.recv(RecvRequest {
        address: address.into(),
        max_messages: 10,
        ..Default::default()
    }))
    .await
    .expect("gRPC-Web Recv")
    .into_inner();
    assert_eq!(got.messages.len(), 1);
    assert_eq!(got.messages[0].payload.as_ref(), b"m-1");

    // From sequence 1, so the first message arrives by replay and proves the stream is open
    // before the rest are sent live.
    let mut stream = step(web.subscribe(SubscribeRequest {
        address: address.into(),
        start_sequence: 1,
        ..Default::default()
    }))
    .await
    .expect("gRPC-Web Subscribe")
    .into_inner();
    let mut next = 1u64;
    let mut seen = 0usize;
    while next <= 1000 {
        let event = step(stream.message())
            .await
            .expect("stream item")
            .expect("stream open");
        let Some(Event::Message(m)) = event.event else {
            panic!("unexpected event {event:?}");
        };
        assert_eq!(m.sequence, next, "messages arrive in order");
        assert_eq!(m.payload.as_ref(), format!("m-{next}").as_bytes());
        next += 1;
        seen += 1;
        if m.sequence == 1 {
            for i in 2..=1000u64 {
                let r = grpc
                    .send(send_req(address, format!("m-{i}").as_bytes()))
                    .await
                    .expect("gRPC Send");
                assert_eq!(r.into_inner().sequence, i);
            }
        }
    }
    assert_eq!(seen, 1000);
}

#[tokio::test]
async fn grpc_web_on_the_grpc_port_serves_send_recv_and_subscribe() {
    let server = TestServer::start().await;
    send_recv_subscribe(&server, server.addr, "web.grpc-port").await;
    server.stop().await;
}

#[tokio::test]
async fn grpc_web_on_the_http_listener_serves_send_recv_and_subscribe() {
    let server = TestServer::start().await;
    send_recv_subscribe(&server, server.metrics_addr, "web.http-listener").await;
    server.stop().await;
}

#[tokio::test]
async fn grpc_web_errors_carry_the_status_and_the_field() {
    let server = TestServer::start().await;
    let mut web = web_client(server.addr);
    let e = step(web.send(send_req("bad address", b"x")))
        .await
        .expect_err("an address with a space is refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("address"), "{e:?}");
    // Nothing was stored, and the broker still serves.
    let ok = step(web.send(send_req("web.after-error", b"x")))
        .await
        .expect("send after an error");
    assert_eq!(ok.into_inner().sequence, 1);
    server.stop().await;
}

/// One raw HTTP/1.1 request; returns status, headers and the whole body.
async fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> (http::StatusCode, http::HeaderMap, Bytes) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = step(client.request(req.body(Full::new(body)).expect("request")))
        .await
        .expect("HTTP/1.1 request");
    let (parts, body) = resp.into_parts();
    let body = step(body.collect())
        .await
        .expect("response body")
        .to_bytes();
    (parts.status, parts.headers, body)
}

async fn last_sequence(server: &TestServer, address: &str) -> u64 {
    let info = server
        .admin()
        .await
        .get_address(switchboard::pb::GetAddressRequest {
            address: address.into(),
        })
        .await
        .expect("GetAddress")
        .into_inner();
    info.address.expect("address info").last_sequence
}

fn frame(msg: &impl prost::Message) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.encoded_len()).expect("small"));
    msg.encode(&mut b).expect("encode");
    b.freeze()
}

/// Splits a gRPC-Web body into its message frames and its trailer block.
fn split_frames(mut body: Bytes) -> (Vec<Bytes>, String) {
    let (mut messages, mut trailers) = (Vec::new(), String::new());
    while body.len() >= 5 {
        let flag = body.get_u8();
        let len = body.get_u32() as usize;
        let data = body.split_to(len);
        if flag & 0x80 != 0 {
            trailers = String::from_utf8(data.to_vec()).expect("trailers are text");
        } else {
            messages.push(data);
        }
    }
    assert!(body.is_empty(), "no bytes after the last frame");
    (messages, trailers)
}

#[tokio::test]
async fn grpc_web_text_is_base64_both_ways() {
    let server = TestServer::start().await;
    let b64 = base64::engine::general_purpose::STANDARD;
    let request = b64.encode(frame(&send_req("web.text", b"hello")));
    let (status, headers, body) = raw(
        server.addr,
        "POST",
        "/switchboard.v1.Broker/Send",
        &[
            ("content-type", "application/grpc-web-text"),
            ("accept", "application/grpc-web-text"),
            ("x-grpc-web", "1"),
        ],
        Bytes::from(request),
    )
    .await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(
        headers[http::header::CONTENT_TYPE]
            .to_str()
            .expect("ascii")
            .starts_with("application/grpc-web-text"),
        "{headers:?}"
    );
    // Each frame may be encoded on its own: decode the base64 chunks one padded block at a time.
    let text = String::from_utf8(body.to_vec()).expect("base64 text");
    let mut decoded = Vec::new();
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let end = rest.find('=').map_or(rest.len(), |i| {
            i + rest[i..].chars().take_while(|c| *c == '=').count()
        });
        decoded.extend(b64.decode(&rest[..end]).expect("valid base64"));
        rest = &rest[end..];
    }
    let (messages, trailers) = split_frames(Bytes::from(decoded));
    assert_eq!(messages.len(), 1);
    let r = SendResponse::decode(messages[0].clone()).expect("a SendResponse");
    assert_eq!(r.sequence, 1);
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");
    // The message is really stored.
    assert_eq!(last_sequence(&server, "web.text").await, 1);
    server.stop().await;
}

#[tokio::test]
async fn cors_allows_only_the_configured_origins() {
    let allowed = "http://console.example:8080";
    let server = TestServer::with_config(ServerConfig {
        cors_origins: vec![parse_origin(allowed).expect("origin")],
        ..ServerConfig::default()
    })
    .await;
    let addr = server.addr;
    let preflight = |origin: &'static str| async move {
        raw(
            addr,
            "OPTIONS",
            "/switchboard.v1.Broker/Send",
            &[
                ("origin", origin),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "content-type,x-grpc-web,authorization",
                ),
            ],
            Bytes::new(),
        )
        .await
    };
    let (status, headers, _) = preflight(allowed).await;
    assert!(status.is_success(), "{status}");
    assert_eq!(headers["access-control-allow-origin"], allowed);
    let allow_headers = headers["access-control-allow-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    for h in ["content-type", "x-grpc-web", "authorization"] {
        assert!(allow_headers.contains(h), "{allow_headers}");
    }

    let (_, headers, _) = preflight("http://evil.example").await;
    assert!(
        headers.get("access-control-allow-origin").is_none(),
        "an origin not configured is not allowed: {headers:?}"
    );

    // The call itself, from the allowed origin, lets the page read the status.
    let (status, headers, body) = raw(
        server.addr,
        "POST",
        "/switchboard.v1.Broker/Send",
        &[
            ("origin", allowed),
            ("content-type", "application/grpc-web+proto"),
            ("x-grpc-web", "1"),
        ],
        frame(&send_req("web.cors", b"x")),
    )
    .await;
    assert_eq!(status, http::StatusCode::OK);
    assert_eq!(headers["access-control-allow-origin"], allowed);
    let exposed = headers["access-control-expose-headers"]
        .to_str()
        .expect("ascii")
        .to_ascii_lowercase();
    assert!(exposed.contains("grpc-status"), "{exposed}");
    let (messages, trailers) = split_frames(body);
    assert_eq!(
        SendResponse::decode(messages[0].clone())
            .expect("decode")
            .sequence,
        1
    );
    assert!(trailers.contains("grpc-status:0"), "{trailers:?}");
    server.stop().await;
}

#[tokio::test]
async fn permissions_apply_to_grpc_web_as_to_grpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (writer, reader) = (new_token(), new_token());
    let auth = dir.path().join("auth.toml");
    std::fs::write(
        &auth,
        format!(
            "[[principal]]\nname = \"web-writer\"\ntoken_sha256 = \"{}\"\nsend = [\"web.>\"]\n\
             [[principal]]\nname = \"web-reader\"\ntoken_sha256 = \"{}\"\nreceive = [\"web.>\"]\n",
            token_sha256(&writer),
            token_sha256(&reader)
        ),
    )
    .expect("write auth file");
    let server = TestServer::with_security(Security {
        auth_file: Some(auth),
        tls: None,
    })
    .await;
    let with_token = |token: &str, r: SendRequest| {
        let mut r = Request::new(r);
        let v: MetadataValue<_> = format!("Bearer {token}").parse().expect("ascii");
        r.metadata_mut().insert("authorization", v);
        r
    };
    for addr in [server.addr, server.metrics_addr] {
        let mut web = web_client(addr);
        let e = step(web.send(send_req("web.orders", b"x")))
            .await
            .expect_err("no token");
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        let e = step(web.send(with_token(&reader, send_req("web.orders", b"x"))))
            .await
            .expect_err("the reader may not send");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("web-reader"), "{e:?}");
        let e = step(web.send(with_token(&writer, send_req("other.orders", b"x"))))
            .await
            .expect_err("outside the writer's addresses");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        step(web.send(with_token(&writer, send_req("web.orders", b"x"))))
            .await
            .expect("the writer may send to web.>");
    }
    assert_eq!(
        server.retained("web.orders").await,
        2,
        "exactly the two permitted sends were stored"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_http_listener_serves_the_console_and_metrics() {
    let server = TestServer::start().await;
    let (status, headers, body) = raw(server.metrics_addr, "GET", "/", &[], Bytes::new()).await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(headers[http::header::CONTENT_TYPE]
        .to_str()
        .expect("ascii")
        .starts_with("text/html"));
    let csp = headers["content-security-policy"].to_str().expect("ascii");
    assert!(csp.contains("connect-src 'self'"), "{csp}");
    let html = String::from_utf8(body.to_vec()).expect("utf-8");
    assert!(html.contains("console.js"), "the page loads its script");
    for path in ["/console.js", "/console.css"] {
        let (status, _, body) = raw(server.metrics_addr, "GET", path, &[], Bytes::new()).await;
        assert_eq!(status, http::StatusCode::OK, "{path}");
        assert!(
            body.len() > 100,
            "{path} is the built asset, not a placeholder"
        );
    }
    let (status, _, body) = raw(server.metrics_addr, "GET", "/metrics", &[], Bytes::new()).await;
    assert_eq!(status, http::StatusCode::OK);
    assert!(String::from_utf8_lossy(&body).contains("switchboard_"));
    let (status, _, _) = raw(server.metrics_addr, "GET", "/nope", &[], Bytes::new()).await;
    assert_eq!(status, http::StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn plain_grpc_still_works_beside_grpc_web() {
    // accept_http1 must not change HTTP/2 gRPC: a tonic client with a long-lived stream.
    let server = TestServer::start().await;
    let mut grpc = server.client().await;
    let r = grpc
        .send(send_req("web.h2", b"x"))
        .await
        .expect("HTTP/2 gRPC Send");
    assert_eq!(r.into_inner().sequence, 1);
    let mut s = grpc
        .subscribe(SubscribeRequest {
            address: "web.h2".into(),
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let m = tokio::time::timeout(Duration::from_secs(5), s.message())
        .await
        .expect("in time")
        .expect("ok")
        .expect("open");
    assert!(matches!(m.event, Some(Event::Message(m)) if m.sequence == 1));
    server.stop().await;
}

#[tokio::test]
async fn grpc_web_over_http2_streams_a_subscribe() {
    // What a browser sends when it reaches the port over HTTP/2 (TLS with ALPN h2, or a proxy):
    // gRPC-Web content types on an HTTP/2 stream, status in the body's trailer frame.
    let server = TestServer::start().await;
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = step(client.ready()).await.expect("h2 ready");
    let request = http::Request::post(format!(
        "http://{}/switchboard.v1.Broker/Subscribe",
        server.addr
    ))
    .header("content-type", "application/grpc-web+proto")
    .header("x-grpc-web", "1")
    .body(())
    .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("send");
    let subscribe = SubscribeRequest {
        address: "web.h2-subscribe".into(),
        start_sequence: 1,
        ..Default::default()
    };
    stream.send_data(frame(&subscribe), true).expect("body");
    let mut grpc = server.client().await;
    for i in 1..=3u64 {
        let r = grpc
            .send(send_req("web.h2-subscribe", format!("h2-{i}").as_bytes()))
            .await
            .expect("send");
        assert_eq!(r.into_inner().sequence, i);
    }
    let response = step(response).await.expect("response");
    assert_eq!(response.status(), http::StatusCode::OK);
    assert!(response.headers()[http::header::CONTENT_TYPE]
        .to_str()
        .expect("ascii")
        .starts_with("application/grpc-web"));
    let mut body = response.into_body();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    while got.len() < 3 {
        let chunk = step(body.data())
            .await
            .expect("the stream stays open")
            .expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        while buf.len() >= 5 {
            let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
            if buf.len() < 5 + len {
                break;
            }
            let flag = buf[0];
            let msg = buf.split_to(5 + len).freeze().slice(5..);
            assert_eq!(flag & 0x80, 0, "no trailers while the stream is open");
            let r = switchboard::pb::SubscribeResponse::decode(msg).expect("decode");
            let Some(Event::Message(m)) = r.event else {
                panic!("unexpected {r:?}")
            };
            got.push((m.sequence, m.payload));
        }
    }
    for (i, (seq, payload)) in got.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(*seq, n);
        assert_eq!(payload.as_ref(), format!("h2-{n}").as_bytes());
    }
    server.stop().await;
}
