//! Security with the real binary: a bad auth file refuses to start and says where; SIGHUP
//! rotates the TLS certificate while an open stream carries on; the metrics endpoint serves the
//! same certificate.

mod common;

use common::{pki::Pki, sigterm, step, BrokerProcess};
use switchboard::pb::{
    broker_client::BrokerClient, subscribe_response::Event, SendRequest, SubscribeRequest,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

async fn tls_client(addr: &str, ca_pem: Vec<u8>) -> BrokerClient<Channel> {
    switchboard::grpc::tls::install_provider();
    let tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(ca_pem));
    let ch = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS connect");
    BrokerClient::new(ch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auth_file_with_a_syntax_error_refuses_to_start_with_the_line() {
    let pki = Pki::new("badauth");
    let path = pki.dir.join("auth.toml");
    std::fs::write(
        &path,
        "[[principal]]\nname = \"a\"\nsend = [\"x\"\nadmin = false\n",
    )
    .unwrap();
    let out = step(
        "serve exits",
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", "127.0.0.1:0", "--auth-file"])
            .arg(&path)
            .output(),
    )
    .await
    .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--auth-file") && stderr.contains("line 4"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("switchboard listening"),
        "refused before listening: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_while_a_stream_stays_open() {
    let pki = Pki::new("rotate");
    let mut broker = BrokerProcess::start(&[
        "--tls-cert",
        pki.path("server.pem").to_str().unwrap(),
        "--tls-key",
        pki.path("server.key").to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ])
    .await;
    let metrics_addr = broker.metrics_addr().await;
    let BrokerProcess {
        child,
        addr,
        mut logs,
    } = broker;
    let old_ca = std::fs::read(pki.path("ca.pem")).unwrap();
    let mut c = tls_client(&addr, old_ca.clone()).await;
    let mut stream = step(
        "subscribe",
        c.subscribe(SubscribeRequest {
            address: "rot.x".into(),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    // The metrics endpoint presents the same certificate.
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut old_ca.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&metrics_addr).await.unwrap();
    let mut tls_stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("metrics endpoint speaks TLS with the broker's certificate");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls_stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    let _ = step("metrics", tls_stream.read_to_string(&mut body)).await;
    assert!(body.contains("switchboard_connections"), "{body}");

    // New material from another CA, then SIGHUP.
    pki.issue("ca2", "client", &[]);
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    loop {
        let line = step("reload line", logs.next_line())
            .await
            .unwrap()
            .unwrap();
        if line.contains("TLS certificate reloaded") {
            break;
        }
        assert!(!line.contains("reload failed"), "{line}");
    }
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    // New connections get the new certificate; the open stream carries on.
    let mut fresh = tls_client(&addr, std::fs::read(pki.path("ca2.pem")).unwrap()).await;
    fresh
        .send(SendRequest {
            address: "rot.x".into(),
            payload: b"after rotation".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap();
    match common::next_event(&mut stream).await {
        Event::Message(m) => assert_eq!(m.payload.as_ref(), b"after rotation"),
        Event::Dropped(d) => panic!("dropped {}", d.count),
    }
    sigterm(&child);
    let mut child = child;
    assert!(step("exit", child.wait()).await.unwrap().success());
}
