//! The HTTP listener (`--http-listen`: console, `/metrics`, gRPC-Web) cannot be held or
//! borrowed: silent TLS sockets do not block it, foreign `Host` / `Origin` headers (DNS
//! rebinding) are refused with nothing done, its connections are bounded and idle ones closed;
//! and the process raises its open-file limit.

mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{BufMut, Bytes, BytesMut};
use common::{pki::Pki, step, step_limit, TestServer};
use switchboard::{
    config::{Admission, HttpListener, Security, ServerConfig},
    grpc::hosts::AllowedHosts,
    pb::{broker_client::BrokerClient, DeleteAddressRequest, SendRequest, SubscribeRequest},
};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// A raw HTTP/1.1 exchange on a fresh connection (`connection: close`): the status code, the
/// head, and the raw body bytes.
async fn http1(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str(&format!(
        "content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    ));
    s.write_all(req.as_bytes()).await.expect("write head");
    s.write_all(body).await.expect("write body");
    let mut out = Vec::new();
    step("http response", s.read_to_end(&mut out))
        .await
        .expect("read response");
    response_parts(&out)
}

fn response_parts(raw: &[u8]) -> (u16, String, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let (head, _) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("an HTTP response: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let body = raw[head.len() + 4..].to_vec();
    (status, head.to_string(), body)
}

/// A gRPC-Web (binary) request frame.
fn frame(msg: &impl prost::Message) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(0);
    b.put_u32(u32::try_from(msg.encoded_len()).expect("small"));
    msg.encode(&mut b).expect("encode");
    b.to_vec()
}

/// DeleteAddress over gRPC-Web (HTTP/1.1) with the given `Host` and optional `Origin`.
async fn web_delete(
    addr: SocketAddr,
    host: &str,
    origin: Option<&str>,
    address: &str,
) -> (u16, String, Vec<u8>) {
    let mut headers = vec![
        ("host", host),
        ("content-type", "application/grpc-web+proto"),
        ("x-grpc-web", "1"),
    ];
    if let Some(o) = origin {
        headers.push(("origin", o));
    }
    let body = frame(&DeleteAddressRequest {
        address: address.into(),
    });
    http1(
        addr,
        "POST",
        "/switchboard.v1.Admin/DeleteAddress",
        &headers,
        &body,
    )
    .await
}

async fn send(server: &TestServer, address: &str) {
    let mut c = server.client().await;
    common::send(&mut c, address, b"keep me").await;
}

fn metric(server: &TestServer, line_start: &str) -> f64 {
    let text = server.broker.metrics().render(0, 0, 0);
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit_once(' '))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0.0)
}

fn tls_client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.path("ca.pem")).expect("ca");
    for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

#[tokio::test]
async fn silent_tls_sockets_do_not_hold_the_console_or_the_grpc_port() {
    switchboard::grpc::tls::install_provider();
    let pki = Pki::new("http-silent");
    // A long handshake timeout: before the fix, each silent socket held the HTTP listener's
    // accept loop for all of it, one after the other.
    let server = TestServer::with_config(ServerConfig {
        security: Security {
            auth_file: None,
            tls: Some(pki.tls(false, false)),
        },
        admission: Admission {
            handshake_timeout: Duration::from_secs(120),
            max_connections: 65_536,
        },
        ..ServerConfig::default()
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(
            TcpStream::connect(server.metrics_addr)
                .await
                .expect("connect"),
        );
        silent.push(TcpStream::connect(server.addr).await.expect("connect"));
    }
    // The console's /metrics over TLS answers while they sit there.
    let tcp = TcpStream::connect(server.metrics_addr)
        .await
        .expect("connect");
    let mut tls = step(
        "TLS handshake with the HTTP listener",
        tokio_rustls::TlsConnector::from(tls_client_config(&pki))
            .connect("localhost".try_into().expect("name"), tcp),
    )
    .await
    .expect("the HTTP listener completes a TLS handshake beside silent sockets");
    tls.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut body = Vec::new();
    step("metrics over TLS", tls.read_to_end(&mut body))
        .await
        .expect("read");
    let (status, _, body) = response_parts(&body);
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("switchboard_"));
    // And a gRPC client over TLS is served too.
    let channel = Endpoint::from_shared(format!("https://{}", server.addr))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new()
                .domain_name("localhost")
                .ca_certificate(Certificate::from_pem(
                    std::fs::read(pki.path("ca.pem")).expect("ca"),
                )),
        )
        .expect("tls config")
        .connect_timeout(step_limit())
        .connect()
        .await
        .expect("gRPC TLS connect beside silent sockets");
    let mut grpc = BrokerClient::new(channel);
    let r = step(
        "gRPC send",
        grpc.send(SendRequest {
            address: "silent.ok".into(),
            payload: Bytes::from_static(b"x"),
            ..Default::default()
        }),
    )
    .await
    .expect("send");
    assert_eq!(r.into_inner().sequence, 1);
    drop(silent);
    server.stop().await;
}

#[tokio::test]
async fn foreign_host_and_origin_are_refused_and_nothing_is_done() {
    let server = TestServer::start().await;
    let http = server.metrics_addr;
    let port = http.port();
    send(&server, "rebind.victim").await;

    // A DNS-rebinding page's requests name its own host.
    let evil_host = format!("evil.example:{port}");
    let (status, _, body) = web_delete(http, &evil_host, None, "rebind.victim").await;
    assert_eq!(status, 421, "{}", String::from_utf8_lossy(&body));
    let text = String::from_utf8_lossy(&body);
    assert!(text.contains("evil.example"), "{text}");
    assert!(text.contains("--http-allowed-hosts"), "{text}");
    let evil_origin = format!("http://evil.example:{port}");
    let loopback = format!("127.0.0.1:{port}");
    let (status, _, body) = web_delete(http, &loopback, Some(&evil_origin), "rebind.victim").await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("evil.example"));
    // Reading is refused too: the page, /metrics.
    for path in ["/", "/metrics"] {
        let (status, _, _) = http1(http, "GET", path, &[("host", &evil_host)], b"").await;
        assert_eq!(status, 421, "{path}");
    }
    // gRPC-Web on the gRPC port: a foreign Origin is refused as well.
    let grpc_origin = format!("http://evil.example:{}", server.addr.port());
    let (status, _, _) = web_delete(
        server.addr,
        &format!("evil.example:{}", server.addr.port()),
        Some(&grpc_origin),
        "rebind.victim",
    )
    .await;
    assert_eq!(status, 403);
    // Nothing was deleted: a real gRPC client still sees the message.
    assert_eq!(server.retained("rebind.victim").await, 1);
    assert_eq!(
        metric(
            &server,
            "switchboard_http_requests_refused_total{reason=\"host\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &server,
            "switchboard_http_requests_refused_total{reason=\"origin\"}"
        ),
        2.0
    );

    // The console's own requests (same origin, on loopback) still work.
    let own_origin = format!("http://{loopback}");
    let (status, _, body) = web_delete(http, &loopback, Some(&own_origin), "rebind.victim").await;
    assert_eq!(status, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("grpc-status:0"),
        "{body:?}"
    );
    assert!(!server.exists("rebind.victim").await, "deleted");
    let (status, _, _) = http1(http, "GET", "/metrics", &[("host", "localhost")], b"").await;
    assert_eq!(status, 200);
    // A native gRPC client under any name is not affected.
    send(&server, "rebind.other").await;
    let mut admin = server.admin().await;
    step(
        "admin delete",
        admin.delete_address(DeleteAddressRequest {
            address: "rebind.other".into(),
        }),
    )
    .await
    .expect("native gRPC");
    server.stop().await;
}

#[tokio::test]
async fn listed_hosts_are_served() {
    let server = TestServer::with_config(ServerConfig {
        http: HttpListener {
            allowed_hosts: AllowedHosts::parse(&["console.example"]).expect("hosts"),
            ..HttpListener::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let (status, _, _) = http1(
        server.metrics_addr,
        "GET",
        "/metrics",
        &[("host", "Console.Example:9443")],
        b"",
    )
    .await;
    assert_eq!(status, 200);
    let (status, _, _) = http1(
        server.metrics_addr,
        "GET",
        "/metrics",
        &[("host", "other.example")],
        b"",
    )
    .await;
    assert_eq!(status, 421);
    server.stop().await;
}

#[tokio::test]
async fn beyond_the_http_connection_limit_new_connections_are_closed() {
    let server = TestServer::with_config(ServerConfig {
        http: HttpListener {
            max_connections: 3,
            ..HttpListener::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let addr = server.metrics_addr;
    // Three connections, each proven open (and counted) by a keep-alive request.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /console.css HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .expect("write");
        let mut r = tokio::io::BufReader::new(s);
        let mut line = String::new();
        step("status line", r.read_line(&mut line))
            .await
            .expect("read");
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        held.push(r);
    }
    // The fourth is closed without an answer.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    // Closed: end of file, or a reset (the request was never read).
    let n = step("refused connection", s.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(
        n,
        0,
        "the connection over the limit got an answer: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert_eq!(
        metric(
            &server,
            "switchboard_connections_rejected_total{reason=\"http_max_connections\"}"
        ),
        1.0
    );
    // Once one closes, a new connection is served (the slot is freed when the server sees the
    // close, so retry until then).
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + step_limit();
    loop {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await;
        let mut out = Vec::new();
        let _ = step("retry", s.read_to_end(&mut out)).await;
        if out.starts_with(b"HTTP/1.1 200") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a freed slot was never reused"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(held);
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_but_a_quiet_stream_is_not() {
    let idle = Duration::from_millis(300);
    let server = TestServer::with_config(ServerConfig {
        http: HttpListener {
            idle_timeout: idle,
            ..HttpListener::default()
        },
        ..ServerConfig::default()
    })
    .await;
    let addr = server.metrics_addr;
    // A silent socket is closed.
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    let mut out = Vec::new();
    let _ = step("silent socket closed", silent.read_to_end(&mut out)).await;
    assert!(started.elapsed() >= idle, "not before the timeout");
    // A keep-alive socket is closed after its response, once idle.
    let mut kept = TcpStream::connect(addr).await.expect("connect");
    kept.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    step("idle keep-alive socket closed", kept.read_to_end(&mut out))
        .await
        .expect("read");
    assert!(out.starts_with(b"HTTP/1.1 200"), "answered first");

    // A Subscribe over gRPC-Web (the console's live tail) with nothing to say for longer than
    // the idle timeout is not cut: a request being answered is not idle. (From sequence 1, so
    // the message sent after the quiet spell arrives however soon the stream registered.)
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let body = frame(&SubscribeRequest {
        address: "idle.tail".into(),
        start_sequence: 1,
        ..Default::default()
    });
    let head = format!(
        "POST /switchboard.v1.Broker/Subscribe HTTP/1.1\r\nHost: localhost\r\n\
         content-type: application/grpc-web+proto\r\nx-grpc-web: 1\r\n\
         content-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(&body).await.expect("write");
    // Quiet for three idle timeouts: the point of the test is time passing.
    tokio::time::sleep(idle * 3).await;
    send(&server, "idle.tail").await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("keep me") {
        let n = step("message on the quiet stream", s.read(&mut buf))
            .await
            .expect("read");
        assert!(
            n > 0,
            "the stream was closed: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    server.stop().await;
}

/// `(soft, hard)` "Max open files" of a process.
fn open_files_limit(pid: &str) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    let mut n = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(u64::MAX));
    (n.next().expect("soft"), n.next().expect("hard"))
}

/// Starts `switchboard serve` under `sh` after `ulimit`, returns it and its log lines up to the
/// start-up line.
async fn serve_with_ulimit(ulimit: &str) -> (tokio::process::Child, Vec<String>) {
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit {ulimit} && exec \"$0\" serve --listen 127.0.0.1:0 --http-listen 127.0.0.1:0"
        ))
        .arg(env!("CARGO_BIN_EXE_switchboard"))
        .env("RUST_LOG", "switchboard=info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start sh");
    let stderr = child.stderr.take().expect("stderr");
    let mut logs = tokio::io::BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = step("start-up line", logs.next_line())
            .await
            .expect("stderr")
            .unwrap_or_else(|| panic!("exited before listening: {seen:#?}"));
        let done = line.contains("switchboard listening");
        seen.push(line);
        if done {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    (child, seen)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test]
async fn the_open_file_soft_limit_is_raised_to_the_hard_limit_and_a_shortfall_warned() {
    if !common::prereq::require(&common::prereq::OPEN_FILES_ABOVE_256) {
        return;
    }
    let (_, hard) = open_files_limit("self");
    let (child, logs) = serve_with_ulimit("-S -n 256").await;
    let pid = child.id().expect("running").to_string();
    let (soft, hard_there) = open_files_limit(&pid);
    assert_eq!(hard_there, hard);
    assert_eq!(
        soft, hard,
        "the soft limit is raised to the hard one: {logs:#?}"
    );
    assert!(
        logs.iter()
            .any(|l| l.contains("open-file limit") && l.contains("raised_from=256")),
        "{logs:#?}"
    );
    drop(child);

    // A hard limit below --max-connections (65,536 by default): a warning naming the flags.
    let (child, logs) = serve_with_ulimit("-n 512").await;
    let pid = child.id().expect("running").to_string();
    assert_eq!(open_files_limit(&pid), (512, 512));
    let warning = logs
        .iter()
        .find(|l| l.contains("WARN") && l.contains("open-file limit of 512"))
        .unwrap_or_else(|| panic!("no warning: {logs:#?}"));
    assert!(warning.contains("--max-connections (65536)"), "{warning}");
    assert!(
        warning.contains("--http-max-connections (256)"),
        "{warning}"
    );
    drop(child);
}
