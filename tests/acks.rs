//! Acknowledged delivery over a real server: leases, redelivery with `delivery_attempt`, Ack,
//! Nack with a delay, ExtendLease, `max_ack_pending`, dead-letter addresses, a group stream's
//! leases returned when it ends, and a worker pool with workers killed mid-way.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{next_event, send, step, subscribe, TestServer};
use switchboard::pb::{
    broker_client::BrokerClient, subscribe_response::Event, AckRequest, CreateGroupRequest,
    ExtendLeaseRequest, GetAddressRequest, Message, NackRequest, RecvRequest,
};
use tonic::{transport::Channel, Code};

fn pd(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap()
}

fn acked_group(address: &str, group: &str, ack_wait: Duration) -> CreateGroupRequest {
    CreateGroupRequest {
        address: address.into(),
        group: group.into(),
        ack_wait: Some(pd(ack_wait)),
        ..Default::default()
    }
}

async fn take(
    c: &mut BrokerClient<Channel>,
    address: &str,
    group: &str,
    max: u32,
    wait: Duration,
) -> Vec<Message> {
    step(
        "recv",
        c.recv(RecvRequest {
            address: address.into(),
            group: group.into(),
            max_messages: max,
            wait: Some(pd(wait)),
            max_bytes: 0,
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .messages
}

async fn ack(c: &mut BrokerClient<Channel>, address: &str, group: &str, seqs: &[u64]) -> Vec<u64> {
    c.ack(AckRequest {
        address: address.into(),
        group: group.into(),
        sequences: seqs.to_vec(),
    })
    .await
    .unwrap()
    .into_inner()
    .not_pending
}

async fn nack(
    c: &mut BrokerClient<Channel>,
    address: &str,
    group: &str,
    seq: u64,
    delay: Duration,
) {
    let r = c
        .nack(NackRequest {
            address: address.into(),
            group: group.into(),
            sequences: vec![seq],
            delay: Some(pd(delay)),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.not_pending.is_empty(), "{r:?}");
}

fn attempts(ms: &[Message]) -> Vec<(u64, u32)> {
    ms.iter()
        .map(|m| (m.sequence, m.delivery_attempt))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_message_is_redelivered_after_ack_wait_and_ack_stops_it() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(acked_group("a.lease", "w", Duration::from_secs(1)))
        .await
        .unwrap();
    send(&mut c, "a.lease", b"job").await;
    let first = take(&mut c, "a.lease", "w", 10, Duration::ZERO).await;
    assert_eq!(attempts(&first), vec![(1, 1)]);
    // Not acknowledged: the waiting Recv gets it again once the lease expires.
    let again = take(&mut c, "a.lease", "w", 10, Duration::from_secs(10)).await;
    assert_eq!(attempts(&again), vec![(1, 2)]);
    assert_eq!(again[0].payload.as_ref(), b"job");
    assert!(ack(&mut c, "a.lease", "w", &[1]).await.is_empty());
    // Acknowledged: not delivered again, even well past ack_wait.
    let none = take(&mut c, "a.lease", "w", 10, Duration::from_millis(2500)).await;
    assert!(none.is_empty(), "{none:?}");
    // A second Ack, and sequences never handed out, are not pending.
    assert_eq!(
        ack(&mut c, "a.lease", "w", &[1, 2, 99]).await,
        vec![1, 2, 99]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_with_delay_redelivers_after_the_delay_and_not_before() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(acked_group("a.nack", "w", Duration::from_secs(60)))
        .await
        .unwrap();
    send(&mut c, "a.nack", b"retry me").await;
    assert_eq!(
        take(&mut c, "a.nack", "w", 1, Duration::ZERO).await.len(),
        1
    );
    let delay = Duration::from_millis(800);
    let nacked = Instant::now();
    nack(&mut c, "a.nack", "w", 1, delay).await;
    assert!(
        take(&mut c, "a.nack", "w", 1, Duration::ZERO)
            .await
            .is_empty(),
        "not before the delay"
    );
    let again = take(&mut c, "a.nack", "w", 1, Duration::from_secs(10)).await;
    assert_eq!(attempts(&again), vec![(1, 2)]);
    assert!(
        nacked.elapsed() >= delay,
        "redelivered after {:?}",
        nacked.elapsed()
    );
    // Nack without a delay: at once.
    nack(&mut c, "a.nack", "w", 1, Duration::ZERO).await;
    let third = take(&mut c, "a.nack", "w", 1, Duration::ZERO).await;
    assert_eq!(attempts(&third), vec![(1, 3)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extend_lease_keeps_a_message_past_its_original_deadline() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(acked_group("a.extend", "w", Duration::from_secs(2)))
        .await
        .unwrap();
    send(&mut c, "a.extend", b"slow job").await;
    let leased_at = Instant::now();
    assert_eq!(
        take(&mut c, "a.extend", "w", 1, Duration::ZERO).await.len(),
        1
    );
    // Work for a while, then extend: the lease now runs 2 s from here.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = c
        .extend_lease(ExtendLeaseRequest {
            address: "a.extend".into(),
            group: "w".into(),
            sequences: vec![1, 7],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.not_pending, vec![7]);
    // Past the original deadline (2 s after the lease) and nothing came back.
    let until = Duration::from_millis(2600).saturating_sub(leased_at.elapsed());
    assert!(take(&mut c, "a.extend", "w", 1, until).await.is_empty());
    assert!(leased_at.elapsed() > Duration::from_secs(2));
    let again = take(&mut c, "a.extend", "w", 1, Duration::from_secs(10)).await;
    assert_eq!(attempts(&again), vec![(1, 2)]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_deliveries_dead_letters_with_four_headers_after_exactly_three() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(CreateGroupRequest {
        max_deliveries: 3,
        dead_letter_address: "a.dlq".into(),
        ..acked_group("a.poison", "w", Duration::from_secs(60))
    })
    .await
    .unwrap();
    let mut headers = HashMap::new();
    headers.insert("kind".to_string(), "poison".to_string());
    c.send(switchboard::pb::SendRequest {
        address: "a.poison".into(),
        payload: b"bad input".to_vec().into(),
        headers: headers.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    for attempt in 1..=3 {
        let got = take(&mut c, "a.poison", "w", 1, Duration::ZERO).await;
        assert_eq!(attempts(&got), vec![(1, attempt)]);
        assert!(
            take(&mut c, "a.dlq", "", 1, Duration::ZERO)
                .await
                .is_empty(),
            "not dead-lettered before the last attempt fails"
        );
        nack(&mut c, "a.poison", "w", 1, Duration::ZERO).await;
    }
    assert!(take(&mut c, "a.poison", "w", 1, Duration::ZERO)
        .await
        .is_empty());
    let dead = take(&mut c, "a.dlq", "", 10, Duration::ZERO).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!((d.address.as_str(), d.sequence), ("a.dlq", 1));
    assert_eq!(d.payload.as_ref(), b"bad input");
    let mut want = headers;
    for (k, v) in [
        ("switchboard-dead-letter-address", "a.poison"),
        ("switchboard-dead-letter-group", "w"),
        ("switchboard-dead-letter-sequence", "1"),
        ("switchboard-dead-letter-deliveries", "3"),
    ] {
        want.insert(k.into(), v.into());
    }
    assert_eq!(d.headers, want);
    let info = server
        .admin()
        .await
        .get_address(GetAddressRequest {
            address: "a.poison".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let g = info.groups.iter().find(|g| g.group == "w").unwrap();
    assert_eq!((g.pending, g.redelivered, g.dead_lettered), (0, 2, 1));
    assert_eq!(g.max_deliveries, 3);
    assert_eq!(g.dead_letter_address, "a.dlq");
    assert_eq!(g.ack_wait, Some(pd(Duration::from_secs(60))));
    assert_eq!(g.max_ack_pending, 1000);
    let m = server.scrape().await;
    assert_eq!(
        m.get("switchboard_messages_dead_lettered_total"),
        Some(&1.0)
    );
    assert_eq!(m.get("switchboard_messages_redelivered_total"), Some(&2.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_ack_pending_holds_the_next_message_back_until_an_ack() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(CreateGroupRequest {
        max_ack_pending: 10,
        ..acked_group("a.pending", "w", Duration::from_secs(60))
    })
    .await
    .unwrap();
    for i in 0..11u8 {
        send(&mut c, "a.pending", &[i]).await;
    }
    let first = take(&mut c, "a.pending", "w", 100, Duration::ZERO).await;
    assert_eq!(first.len(), 10);
    assert!(take(&mut c, "a.pending", "w", 100, Duration::ZERO)
        .await
        .is_empty());
    // A waiting Recv is woken by the Ack that makes room.
    let mut waiter = server.client().await;
    let waiting = tokio::spawn(async move {
        take(&mut waiter, "a.pending", "w", 100, Duration::from_secs(10)).await
    });
    let broker = server.broker.clone();
    common::eventually("recv waiting", || broker.waiting_recvs("a.pending") == 1).await;
    assert!(ack(&mut c, "a.pending", "w", &[3]).await.is_empty());
    let eleventh = step("woken", waiting).await.unwrap();
    assert_eq!(attempts(&eleventh), vec![(11, 1)]);
    let m = server.scrape().await;
    assert_eq!(m.get("switchboard_messages_acked_total"), Some(&1.0));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_group_stream_returns_its_leases_at_once() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(acked_group("a.stream", "w", Duration::from_secs(600)))
        .await
        .unwrap();
    let mut member = server.client().await;
    let mut stream = subscribe(&mut member, "a.stream", "w").await;
    for i in 1..=5u8 {
        send(&mut c, "a.stream", &[i]).await;
    }
    for want in 1..=5 {
        match next_event(&mut stream).await {
            Event::Message(m) => assert_eq!((m.sequence, m.delivery_attempt), (want, 1)),
            Event::Dropped(d) => panic!("dropped {}", d.count),
        }
    }
    drop(stream);
    drop(member);
    // Another member gets all five again long before ack_wait (600 s).
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(take(&mut c, "a.stream", "w", 10, Duration::from_secs(10)).await);
    }
    assert_eq!(attempts(&got), (1..=5).map(|s| (s, 2)).collect::<Vec<_>>());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_two_killed_every_message_acked_exactly_once() {
    const N: u64 = 10_000;
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(CreateGroupRequest {
        max_ack_pending: 2000,
        ..acked_group("a.pool", "workers", Duration::from_secs(1))
    })
    .await
    .unwrap();
    let requests = tokio_stream::iter((0..N).map(|i| switchboard::pb::SendRequest {
        address: "a.pool".into(),
        payload: i.to_be_bytes().to_vec().into(),
        ..Default::default()
    }));
    let mut acks = c.send_stream(requests).await.unwrap().into_inner();
    while step("send ack", acks.message()).await.unwrap().is_some() {}
    // Successful acks per sequence, across all workers.
    let acked: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..8 {
        let mut c = server.client().await;
        let acked = Arc::clone(&acked);
        workers.push(tokio::spawn(async move {
            let mut batches = 0;
            loop {
                if acked.lock().unwrap().len() as u64 == N {
                    return;
                }
                let got = take(&mut c, "a.pool", "workers", 100, Duration::from_millis(200)).await;
                if got.is_empty() {
                    continue;
                }
                batches += 1;
                if w < 2 && batches == 3 {
                    // Killed mid-batch: took messages and never acknowledged them.
                    return;
                }
                for m in &got {
                    assert_eq!(m.payload.as_ref(), (m.sequence - 1).to_be_bytes());
                }
                let seqs: Vec<u64> = got.iter().map(|m| m.sequence).collect();
                let not_pending = ack(&mut c, "a.pool", "workers", &seqs).await;
                let mut a = acked.lock().unwrap();
                for s in seqs.iter().filter(|s| !not_pending.contains(s)) {
                    *a.entry(*s).or_default() += 1;
                }
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(120), w)
            .await
            .expect("workers finish")
            .unwrap();
    }
    {
        let a = acked.lock().unwrap();
        assert_eq!(a.len() as u64, N, "every message acknowledged");
        assert!(a.values().all(|&n| n == 1), "each exactly once");
        assert!((1..=N).all(|s| a.contains_key(&s)));
    }
    let info = server
        .admin()
        .await
        .get_address(GetAddressRequest {
            address: "a.pool".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let g = info.groups.iter().find(|g| g.group == "workers").unwrap();
    assert_eq!(g.pending, 0);
    assert!(
        g.redelivered > 0,
        "the killed workers' messages went out again"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_error_names_its_field() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let cases: Vec<(CreateGroupRequest, &str)> = vec![
        (
            acked_group("a.v", "g", Duration::from_millis(500)),
            "ack_wait",
        ),
        (
            acked_group("a.v", "g", Duration::from_secs(13 * 3600)),
            "ack_wait",
        ),
        (
            CreateGroupRequest {
                address: "a.v".into(),
                group: "g".into(),
                max_deliveries: 3,
                ..Default::default()
            },
            "max_deliveries",
        ),
        (
            CreateGroupRequest {
                address: "a.v".into(),
                group: "g".into(),
                max_ack_pending: 5,
                ..Default::default()
            },
            "max_ack_pending",
        ),
        (
            CreateGroupRequest {
                dead_letter_address: "a.dlq".into(),
                ..acked_group("a.v", "g", Duration::from_secs(5))
            },
            "dead_letter_address",
        ),
        (
            CreateGroupRequest {
                max_deliveries: 2,
                dead_letter_address: "bad address".into(),
                ..acked_group("a.v", "g", Duration::from_secs(5))
            },
            "dead_letter_address",
        ),
        (
            CreateGroupRequest {
                max_deliveries: 2,
                dead_letter_address: "a.v".into(),
                ..acked_group("a.v", "g", Duration::from_secs(5))
            },
            "dead_letter_address",
        ),
        (
            CreateGroupRequest {
                max_ack_pending: 100_001,
                ..acked_group("a.v", "g", Duration::from_secs(5))
            },
            "max_ack_pending",
        ),
    ];
    for (req, field) in cases {
        let e = c.create_group(req.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{req:?}: {e:?}");
        assert!(e.message().starts_with(field), "{req:?}: {}", e.message());
    }
    assert!(!server.exists("a.v").await, "nothing created");

    c.create_group(acked_group("a.v2", "acked", Duration::from_secs(5)))
        .await
        .unwrap();
    c.create_group(CreateGroupRequest {
        address: "a.v2".into(),
        group: "plain".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for group in ["", "plain", "unknown"] {
        let e = c
            .ack(AckRequest {
                address: "a.v2".into(),
                group: group.into(),
                sequences: vec![1],
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{group}: {e:?}");
        assert!(
            e.message().contains(&format!("{group:?}")),
            "{}",
            e.message()
        );
    }
    let none = c
        .ack(AckRequest {
            address: "a.v2".into(),
            group: "acked".into(),
            sequences: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(none.code(), Code::InvalidArgument);
    assert!(none.message().starts_with("sequences"), "{none:?}");
    let many = c
        .extend_lease(ExtendLeaseRequest {
            address: "a.v2".into(),
            group: "acked".into(),
            sequences: (1..=1001).collect(),
        })
        .await
        .unwrap_err();
    assert_eq!(many.code(), Code::InvalidArgument);
    assert!(many.message().contains("1000"), "{many:?}");
    let long = c
        .nack(NackRequest {
            address: "a.v2".into(),
            group: "acked".into(),
            sequences: vec![1],
            delay: Some(pd(Duration::from_secs(13 * 3600))),
        })
        .await
        .unwrap_err();
    assert_eq!(long.code(), Code::InvalidArgument);
    assert!(long.message().starts_with("delay"), "{long:?}");
    // The same settings again: OK; other delivery settings: ALREADY_EXISTS.
    let same = c
        .create_group(acked_group("a.v2", "acked", Duration::from_secs(5)))
        .await
        .unwrap()
        .into_inner();
    assert!(!same.created);
    let other = c
        .create_group(acked_group("a.v2", "acked", Duration::from_secs(6)))
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    assert!(other.message().contains("ack_wait 5s"), "{other:?}");
    server.stop().await;
}
