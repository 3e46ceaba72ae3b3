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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_flood_loses_no_acknowledged_message() {
    use std::collections::HashSet;
    use switchboard::pb::{subscribe_response::Event, SendRequest};

    let server = TestServer::start().await;
    let broker = server.broker.clone();
    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "flood", "").await;
    let reader = tokio::spawn(async move {
        let mut seen = HashSet::new();
        loop {
            match stream.message().await {
                Ok(Some(r)) => match r.event {
                    Some(Event::Message(m)) => {
                        seen.insert(m.sequence);
                    }
                    other => panic!("unexpected {other:?}"),
                },
                Ok(None) => return (seen, None),
                Err(status) => return (seen, Some(status.code())),
            }
        }
    });
    let mut senders = Vec::new();
    for _ in 0..4 {
        let mut c = server.client().await;
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            // Bounded: stops at the first refusal (the server is going away) or 20,000 sends.
            for _ in 0..20_000 {
                match c
                    .send(SendRequest {
                        address: "flood".into(),
                        payload: vec![0u8; 64].into(),
                        headers: Default::default(),
                        message_id: String::new(),
                    })
                    .await
                {
                    Ok(r) => acked.push(r.into_inner().sequence),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    common::eventually("flood under way", || {
        broker.retained_messages("flood") > 200
    })
    .await;
    step("server stops", server.stop()).await;
    let mut acked = Vec::new();
    for s in senders {
        acked.extend(step("sender", s).await.unwrap());
    }
    let (seen, end) = step("reader", reader).await.unwrap();
    assert_eq!(end, Some(Code::Unavailable));
    let (info, _) = broker.address_info("flood", false).unwrap();
    let retained = info.first_sequence..=info.last_sequence;
    assert!(!acked.is_empty());
    for s in &acked {
        assert!(
            seen.contains(s) || (info.first_sequence > 0 && retained.contains(s)),
            "acknowledged message {s} was neither delivered nor retained"
        );
    }
    // The subscriber was handed everything retained for it before its stream ended.
    assert!(
        acked.iter().all(|s| seen.contains(s)),
        "fan-out drained at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_flood_exits_zero_without_panic() {
    let common::BrokerProcess {
        child: mut broker,
        addr,
        logs: mut lines,
    } = common::BrokerProcess::start(&["--shutdown-grace-ms", "3000"]).await;
    let mut c = switchboard::pb::broker_client::BrokerClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let mut responses = c
        .send_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let feeder = tokio::spawn(async move {
        for _ in 0..1_000_000u32 {
            let req = switchboard::pb::SendRequest {
                address: "term".into(),
                payload: vec![1u8; 32].into(),
                headers: Default::default(),
                message_id: String::new(),
            };
            if tx.send(req).await.is_err() {
                return;
            }
        }
    });
    // Once the flood is acknowledged at full speed, SIGTERM our own child by its PID.
    for _ in 0..1000 {
        step("ack", responses.message()).await.unwrap().unwrap();
    }
    common::sigterm(&broker);
    let mut log = Vec::new();
    while let Some(line) = step("logs", lines.next_line()).await.unwrap() {
        log.push(line);
    }
    let status = step("exit within the grace period", broker.wait())
        .await
        .unwrap();
    assert!(status.success(), "exit status {status:?}; log: {log:?}");
    assert!(log.iter().all(|l| !l.contains("panicked")), "{log:?}");
    feeder.abort();
}
