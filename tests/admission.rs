//! Connection admission against the real binary: silent sockets are closed by the handshake
//! timeout while a well-behaved client keeps working; beyond `--max-connections` new
//! connections are refused and the open ones keep working.

mod common;

use common::{sigterm, step, BrokerProcess};
use switchboard::pb::{broker_client::BrokerClient, SendRequest};
use tokio::{io::AsyncReadExt, net::TcpStream};

fn req(i: u32) -> SendRequest {
    SendRequest {
        address: "adm.ok".into(),
        payload: i.to_be_bytes().to_vec().into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sockets_are_closed_by_the_handshake_timeout() {
    let BrokerProcess {
        mut child,
        addr,
        mut logs,
    } = BrokerProcess::start(&["--handshake-timeout-ms", "500"]).await;
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let mut silent = Vec::new();
    for _ in 0..2000 {
        silent.push(TcpStream::connect(&addr).await.unwrap());
    }
    // A well-behaved client is served while they sit there.
    let mut c = BrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for i in 1..=200u32 {
        let r = step("send", c.send(req(i))).await.unwrap().into_inner();
        assert_eq!(r.sequence, u64::from(i));
    }
    // Every silent socket is closed by the broker (EOF), none is left open.
    for mut s in silent {
        let mut buf = [0u8; 1];
        let n = step("silent socket closed", s.read(&mut buf))
            .await
            .unwrap_or(0);
        assert_eq!(n, 0, "the broker closed it without a byte");
    }
    assert_eq!(
        step("send after", c.send(req(201)))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        201
    );
    sigterm(&child);
    assert!(step("exit", child.wait()).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_max_connections_new_ones_are_refused_and_open_ones_work() {
    let BrokerProcess {
        mut child,
        addr,
        mut logs,
    } = BrokerProcess::start(&["--max-connections", "5"]).await;
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let mut clients = Vec::new();
    for i in 0..5u32 {
        let mut c = BrokerClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        step("send", c.send(req(i))).await.unwrap();
        clients.push(c);
    }
    // The sixth connection is closed at once: its call fails.
    let extra = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await;
    let refused = match extra {
        Err(_) => true,
        Ok(ch) => step("refused call", BrokerClient::new(ch).send(req(99)))
            .await
            .is_err(),
    };
    assert!(refused, "a sixth connection must not be served");
    for c in &mut clients {
        step("send", c.send(req(7))).await.unwrap();
    }
    // Closing one frees a slot.
    drop(clients.pop());
    let mut again = None;
    for _ in 0..100 {
        if let Ok(mut c) = BrokerClient::connect(format!("http://{addr}")).await {
            if c.send(req(8)).await.is_ok() {
                again = Some(c);
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "a freed slot admits a new connection");
    sigterm(&child);
    assert!(step("exit", child.wait()).await.unwrap().success());
}
