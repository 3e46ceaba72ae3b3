//! Faults: a client killed mid-stream and a peer that vanishes without closing (half-open TCP)
//! both free their subscriber.

mod common;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use common::{eventually, subscribe, TestServer};
use switchboard::config::ServerConfig;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_client_frees_its_subscriber() {
    let server = TestServer::start().await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "subscribe",
            "victim",
            "--server",
            &format!("http://{}", server.addr),
        ])
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let broker = server.broker.clone();
    eventually("client subscribed", || {
        broker.subscriber_count("victim") == 1
    })
    .await;
    child.kill().await.unwrap(); // SIGKILL: no goodbye
    eventually("subscriber freed", || {
        broker.subscriber_count("victim") == 0
    })
    .await;
    server.stop().await;
}

/// Forwards bytes both ways until `freeze` is set; then stops reading and writing but keeps both
/// sockets open, like a peer whose network vanished.
async fn freezing_proxy(upstream: SocketAddr, freeze: watch::Receiver<bool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, freeze.clone()));
            tokio::spawn(pipe(sr, cw, freeze.clone()));
        }
    });
    addr
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut freeze: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => if to.write_all(&buf[..n]).await.is_err() { return },
            },
            _ = async { freeze.wait_for(|f| *f).await.map(|_| ()) } => {
                // Half-open: hold both halves, never read or write again.
                std::future::pending::<()>().await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_peer_is_detected_by_keepalive() {
    let server = TestServer::with_config(ServerConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    let (freeze_tx, freeze_rx) = watch::channel(false);
    let proxy = freezing_proxy(server.addr, freeze_rx).await;
    let mut client =
        switchboard::pb::broker_client::BrokerClient::connect(format!("http://{proxy}"))
            .await
            .unwrap();
    let _stream = subscribe(&mut client, "halfopen", "").await;
    let broker = server.broker.clone();
    assert_eq!(broker.subscriber_count("halfopen"), 1);
    freeze_tx.send(true).unwrap();
    // The client's socket stays open (we still hold it), but the server's pings go unanswered.
    eventually("keepalive frees the subscriber", || {
        broker.subscriber_count("halfopen") == 0
    })
    .await;
    server.stop().await;
}
