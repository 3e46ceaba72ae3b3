//! The Redis engine with several nodes on one real `redis-server` (started here on a free
//! loopback port): fan-out across nodes, a consumer group spread over nodes, a node killed with
//! SIGKILL, a subscriber moving between nodes, Redis killed and restarted, Redis unreachable.
//!
//! The engine conformance suites (replay, groups, acks, dedup, ...) also run on Redis:
//! `scripts/redis-suites` runs them with `SWITCHBOARD_TEST_REDIS_URL` set.

mod common;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{
    next_event,
    prereq::{require, REDIS_SERVER},
    redis::RedisServer,
    step, subscribe, BrokerProcess, TestServer,
};
use switchboard::{
    config::Limits,
    pb::{
        broker_client::BrokerClient, subscribe_response::Event, AckRequest, BatchMessage,
        CreateGroupRequest, RecvRequest, SendBatchRequest, SendRequest, SubscribeRequest,
    },
};
use tonic::transport::Channel;

/// A Send answered OK: (sequence, payload).
type Sent = (u64, Vec<u8>);

async fn nodes(redis: &RedisServer, n: usize) -> Vec<TestServer> {
    let config = common::redis::config(&redis.url(), &common::redis::namespace());
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(TestServer::with_redis(Limits::default(), &config).await);
    }
    out
}

async fn client(addr: &str) -> BrokerClient<Channel> {
    step("connect", BrokerClient::connect(format!("http://{addr}")))
        .await
        .expect("connect")
}

fn send_req(address: &str, payload: Vec<u8>) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: payload.into(),
        ..Default::default()
    }
}

async fn create_acked_group(c: &mut BrokerClient<Channel>, address: &str, ack_wait: Duration) {
    c.create_group(CreateGroupRequest {
        address: address.into(),
        group: "workers".into(),
        ack_wait: Some(ack_wait.try_into().unwrap()),
        max_ack_pending: 100_000,
        ..Default::default()
    })
    .await
    .expect("create group");
}

/// A fan-out stream of `address` from sequence `from` on.
async fn replay(
    c: &mut BrokerClient<Channel>,
    address: &str,
    from: u64,
) -> tonic::Streaming<switchboard::pb::SubscribeResponse> {
    c.subscribe(SubscribeRequest {
        address: address.into(),
        start_sequence: from,
        ..Default::default()
    })
    .await
    .expect("subscribe")
    .into_inner()
}

/// Reads a fan-out stream until `n` messages came: their (sequence, payload).
async fn take_messages(
    stream: &mut tonic::Streaming<switchboard::pb::SubscribeResponse>,
    n: usize,
) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match next_event(stream).await {
            Event::Message(m) => out.push((m.sequence, m.payload.to_vec())),
            Event::Dropped(d) => panic!("nothing may be dropped here, {} were", d.count),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_from_each_node_reaches_subscribers_on_all_three() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 3).await;
    let mut streams = Vec::new();
    for node in &nodes {
        for _ in 0..2 {
            let mut c = node.client().await;
            streams.push(subscribe(&mut c, "fan", "").await);
        }
    }
    const PER_NODE: usize = 100;
    let mut senders = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut c = node.client().await;
        senders.push(tokio::spawn(async move {
            for k in 0..PER_NODE {
                let r = c
                    .send(send_req("fan", format!("{i}:{k}").into_bytes()))
                    .await
                    .expect("send");
                assert!(r.into_inner().sequence > 0);
            }
        }));
    }
    for s in senders {
        step("senders", s).await.unwrap();
    }
    for (n, stream) in streams.iter_mut().enumerate() {
        let got = take_messages(stream, 3 * PER_NODE).await;
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=(3 * PER_NODE) as u64).collect::<Vec<_>>(),
            "subscriber {n}: every message, dense and in order, whichever node sent it"
        );
        for i in 0..3 {
            let from_i: Vec<usize> = got
                .iter()
                .filter_map(|(_, p)| {
                    let p = String::from_utf8(p.clone()).unwrap();
                    let (node, k) = p.split_once(':').unwrap();
                    (node == i.to_string()).then(|| k.parse().unwrap())
                })
                .collect();
            assert_eq!(
                from_i,
                (0..PER_NODE).collect::<Vec<_>>(),
                "node {i}'s messages in its send order"
            );
        }
    }
    for node in nodes {
        node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_workers_over_three_nodes_take_ten_thousand_exactly_once() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 3).await;
    const N: u64 = 10_000;
    let mut c = nodes[0].client().await;
    create_acked_group(&mut c, "jobs", Duration::from_secs(60)).await;
    for b in 0..(N / 100) {
        let node = &nodes[(b % 3) as usize];
        let mut c = node.client().await;
        let r = c
            .send_batch(SendBatchRequest {
                address: "jobs".into(),
                messages: (0..100)
                    .map(|i| BatchMessage {
                        payload: (b * 100 + i).to_string().into_bytes().into(),
                        ..Default::default()
                    })
                    .collect(),
            })
            .await
            .expect("send batch")
            .into_inner();
        assert_eq!(r.results.len(), 100);
    }
    let acked: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let mut workers = Vec::new();
    for w in 0..6 {
        let mut c = nodes[w % 3].client().await;
        let acked = Arc::clone(&acked);
        workers.push(tokio::spawn(async move {
            loop {
                if acked.lock().unwrap().len() as u64 >= N {
                    return;
                }
                let r = c
                    .recv(RecvRequest {
                        address: "jobs".into(),
                        group: "workers".into(),
                        max_messages: 50,
                        wait: Some(Duration::from_millis(200).try_into().unwrap()),
                        max_bytes: 0,
                    })
                    .await
                    .expect("recv")
                    .into_inner();
                if r.messages.is_empty() {
                    continue;
                }
                let seqs: Vec<u64> = r.messages.iter().map(|m| m.sequence).collect();
                for m in &r.messages {
                    assert_eq!(
                        m.payload.as_ref(),
                        (m.sequence - 1).to_string().as_bytes(),
                        "payload matches its sequence"
                    );
                }
                let not = c
                    .ack(AckRequest {
                        address: "jobs".into(),
                        group: "workers".into(),
                        sequences: seqs.clone(),
                    })
                    .await
                    .expect("ack")
                    .into_inner();
                assert!(not.not_pending.is_empty(), "every ack was pending");
                let mut a = acked.lock().unwrap();
                for s in seqs {
                    *a.entry(s).or_default() += 1;
                }
            }
        }));
    }
    for w in workers {
        step("workers", w).await.unwrap();
    }
    let a = acked.lock().unwrap().clone();
    assert_eq!(a.len() as u64, N, "every message taken");
    assert!(a.values().all(|&n| n == 1), "each exactly once");
    let (_, groups) = nodes[2]
        .broker
        .inspect("jobs", true)
        .await
        .unwrap()
        .unwrap();
    let g = groups.iter().find(|g| g.group == "workers").unwrap();
    assert_eq!((g.pending, g.lag, g.redelivered), (0, 0, 0));
    for node in nodes {
        node.stop().await;
    }
}

/// Nodes as real processes: one is killed with SIGKILL mid-run. Every Send it acknowledged
/// is kept, and the messages it had leased go to the other nodes' workers after `ack_wait`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_nothing_acknowledged_and_its_leases_go_to_the_others() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let url = redis.url();
    let ns = common::redis::namespace();
    let args = [
        "--engine",
        "redis",
        "--redis-url",
        url.as_str(),
        "--redis-namespace",
        ns.as_str(),
    ];
    let a = BrokerProcess::start(&args).await;
    let mut doomed = BrokerProcess::start(&args).await;
    let mut ca = client(&a.addr).await;
    create_acked_group(&mut ca, "work", Duration::from_secs(2)).await;

    // A flood through the doomed node, acknowledged Sends recorded.
    let acknowledged: Arc<Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let flood = {
        let acknowledged = Arc::clone(&acknowledged);
        let mut c = client(&doomed.addr).await;
        tokio::spawn(async move {
            for i in 0..100_000u64 {
                let payload = format!("m{i}").into_bytes();
                match c.send(send_req("work", payload.clone())).await {
                    Ok(r) => {
                        acknowledged
                            .lock()
                            .unwrap()
                            .insert(r.into_inner().sequence, payload);
                    }
                    Err(_) => return,
                }
            }
        })
    };
    // The doomed node's worker leases 20 messages and never acks them.
    let mut cd = client(&doomed.addr).await;
    let mut leased = Vec::new();
    while leased.len() < 20 {
        let r = cd
            .recv(RecvRequest {
                address: "work".into(),
                group: "workers".into(),
                max_messages: u32::try_from(20 - leased.len()).unwrap(),
                wait: Some(Duration::from_secs(5).try_into().unwrap()),
                max_bytes: 0,
            })
            .await
            .expect("recv on the doomed node")
            .into_inner();
        leased.extend(r.messages.iter().map(|m| m.sequence));
    }
    common::eventually("the flood is under way", || {
        acknowledged.lock().unwrap().len() >= 500
    })
    .await;
    doomed.child.start_kill().expect("SIGKILL the node");
    let _ = doomed.child.wait().await;
    let _ = step("flood ends", flood).await;
    let acknowledged = acknowledged.lock().unwrap().clone();
    let last = acknowledged.keys().next_back().copied().unwrap();

    // Every acknowledged Send is there, byte-identical, read through the surviving node.
    let mut stream = replay(&mut ca, "work", 1).await;
    let mut stored = BTreeMap::new();
    while stored.keys().next_back().copied().unwrap_or(0) < last {
        if let Event::Message(m) = next_event(&mut stream).await {
            stored.insert(m.sequence, m.payload.to_vec());
        }
    }
    for (seq, payload) in &acknowledged {
        assert_eq!(stored.get(seq), Some(payload), "acknowledged {seq} kept");
    }

    // The surviving node's worker takes everything; the doomed node's leases come back after
    // ack_wait with their delivery attempt moved on.
    let mut attempts: BTreeMap<u64, u32> = BTreeMap::new();
    while !leased
        .iter()
        .all(|s| attempts.get(s).is_some_and(|&a| a >= 2))
        || !acknowledged.keys().all(|s| attempts.contains_key(s))
    {
        let r = ca
            .recv(RecvRequest {
                address: "work".into(),
                group: "workers".into(),
                max_messages: 1000,
                wait: Some(Duration::from_secs(5).try_into().unwrap()),
                max_bytes: 0,
            })
            .await
            .expect("recv")
            .into_inner();
        let seqs: Vec<u64> = r.messages.iter().map(|m| m.sequence).collect();
        for m in &r.messages {
            attempts.insert(m.sequence, m.delivery_attempt);
        }
        if !seqs.is_empty() {
            ca.ack(AckRequest {
                address: "work".into(),
                group: "workers".into(),
                sequences: seqs,
            })
            .await
            .expect("ack");
        }
    }
    for s in &leased {
        assert_eq!(
            attempts[s], 2,
            "leased {s} on the killed node, delivered again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_moved_to_another_node_resumes_without_a_gap() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut sender = nodes[0].client().await;
    for i in 0..100u32 {
        common::send(&mut sender, "moves", &i.to_be_bytes()).await;
    }
    let mut c1 = nodes[0].client().await;
    let mut s1 = replay(&mut c1, "moves", 1).await;
    let first = take_messages(&mut s1, 60).await;
    drop(s1);
    let resume = first.last().unwrap().0 + 1;
    // More arrive while it moves.
    for i in 100..150u32 {
        common::send(&mut sender, "moves", &i.to_be_bytes()).await;
    }
    let mut c2 = nodes[1].client().await;
    let mut s2 = replay(&mut c2, "moves", resume).await;
    let rest = take_messages(&mut s2, 90).await;
    let all: Vec<u64> = first.iter().chain(&rest).map(|(s, _)| *s).collect();
    assert_eq!(all, (1..=150).collect::<Vec<_>>(), "no gap, no duplicate");
    for (s, p) in first.iter().chain(&rest) {
        assert_eq!(p.as_slice(), &u32::try_from(*s - 1).unwrap().to_be_bytes());
    }
    for node in nodes {
        node.stop().await;
    }
}

/// Redis with `appendfsync always` is killed with SIGKILL under a SendStream flood and
/// restarted: every Send answered OK is still there, and no sequence is used twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_loses_nothing_acknowledged() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let aof = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ];
    let redis = RedisServer::start_with(&aof);
    let node = nodes(&redis, 1).await.remove(0);
    let acknowledged: Arc<Mutex<Vec<Sent>>> = Arc::default();
    let flood = {
        let acknowledged = Arc::clone(&acknowledged);
        let mut c = node.client().await;
        tokio::spawn(async move {
            // Unary Sends, one after another, until the deadline; failures (Redis down) are
            // expected and not recorded.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(6);
            let mut i = 0u64;
            let mut refused = 0u64;
            while tokio::time::Instant::now() < deadline {
                i += 1;
                let payload = format!("p{i}").into_bytes();
                match c.send(send_req("durable", payload.clone())).await {
                    Ok(r) => acknowledged
                        .lock()
                        .unwrap()
                        .push((r.into_inner().sequence, payload)),
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
                        assert!(s.message().contains("redis"), "{s:?}");
                        refused += 1;
                    }
                }
            }
            refused
        })
    };
    common::eventually("flood under way", || {
        acknowledged.lock().unwrap().len() >= 300
    })
    .await;
    let (dir, port) = redis.kill();
    let before = acknowledged.lock().unwrap().len();
    let redis = RedisServer::start_in(dir, Some(port), &aof);
    let refused = step("flood", flood).await.unwrap();
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(
        acknowledged.len() > before,
        "Sends succeed again once Redis is back"
    );
    let mut seen = std::collections::HashSet::new();
    for (s, _) in &acknowledged {
        assert!(seen.insert(*s), "sequence {s} acknowledged twice");
    }
    let last = acknowledged.iter().map(|(s, _)| *s).max().unwrap();
    let mut c = node.client().await;
    let mut stream = replay(&mut c, "durable", 1).await;
    let stored: BTreeMap<u64, Vec<u8>> = take_messages(&mut stream, usize::try_from(last).unwrap())
        .await
        .into_iter()
        .collect();
    for (s, p) in &acknowledged {
        assert_eq!(
            stored.get(s),
            Some(p),
            "acknowledged {s} survived the restart"
        );
    }
    eprintln!(
        "acknowledged {} ({} before the kill), refused while down {refused}",
        acknowledged.len(),
        before
    );
    node.stop().await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_unreachable_is_unavailable_and_not_serving_then_everything_resumes() {
    if !require(&REDIS_SERVER) {
        return;
    }
    use tonic_health::pb::{
        health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
    };
    let aof = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
    ];
    let redis = RedisServer::start_with(&aof);
    let node = nodes(&redis, 1).await.remove(0);
    let mut c = node.client().await;
    assert_eq!(common::send(&mut c, "outage", b"before").await, 1);
    let mut stream = subscribe(&mut c, "outage", "").await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let status = |h: &mut HealthClient<Channel>| {
        let mut h = h.clone();
        async move {
            h.check(HealthCheckRequest {
                service: "switchboard.v1.Broker".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
        }
    };
    assert_eq!(status(&mut health).await, ServingStatus::Serving as i32);

    let (dir, port) = redis.kill();
    let e = c
        .send(send_req("outage", b"while down".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    assert!(e.message().contains("redis"), "names Redis: {e:?}");
    let e = c
        .recv(RecvRequest {
            address: "outage".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable);
    // Health follows (probed every second).
    let deadline = tokio::time::Instant::now() + common::step_limit();
    while status(&mut health).await != ServingStatus::NotServing as i32 {
        assert!(tokio::time::Instant::now() < deadline, "never NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let redis = RedisServer::start_in(dir, Some(port), &aof);
    let deadline = tokio::time::Instant::now() + common::step_limit();
    while status(&mut health).await != ServingStatus::Serving as i32 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never SERVING again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let after = loop {
        match c.send(send_req("outage", b"after".to_vec())).await {
            Ok(r) => break r.into_inner().sequence,
            Err(s) => assert_eq!(s.code(), tonic::Code::Unavailable),
        }
    };
    assert_eq!(after, 2, "the sequence goes on from what Redis kept");
    // The stream stayed open through the outage and delivers what came after.
    match next_event(&mut stream).await {
        Event::Message(m) => assert_eq!((m.sequence, m.payload.as_ref()), (2, &b"after"[..])),
        Event::Dropped(d) => panic!("dropped {}", d.count),
    }
    node.stop().await;
    drop(redis);
}

/// Count retention trims the stream in the same step as the Send, and groups and replays are
/// told exactly what they lost; the age sweep (every second) trims without any traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_on_redis_reports_exact_loss() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let config = common::redis::config(&redis.url(), &common::redis::namespace());
    let node = TestServer::with_redis(
        Limits {
            retention_messages: 10,
            retention_age: Duration::from_secs(1),
            ..Limits::default()
        },
        &config,
    )
    .await;
    let mut c = node.client().await;
    for i in 0..25u8 {
        common::send(&mut c, "kept", &[i]).await;
    }
    assert_eq!(node.retained("kept").await, 10);
    let r = common::recv(&mut c, "kept", "", 100, Duration::ZERO).await;
    assert_eq!(r.dropped, 15, "the default group is told exactly");
    assert_eq!(
        r.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        (16..=25).collect::<Vec<_>>()
    );
    let mut stream = replay(&mut c, "kept", 3).await;
    match next_event(&mut stream).await {
        Event::Dropped(d) => assert_eq!(d.count, 13, "a replay from 3 lost 3..=15"),
        Event::Message(m) => panic!("expected Dropped, got {}", m.sequence),
    }
    match next_event(&mut stream).await {
        Event::Message(m) => assert_eq!(m.sequence, 16),
        Event::Dropped(d) => panic!("dropped twice: {}", d.count),
    }
    // The age sweep empties it with no Send or read on the address.
    let deadline = tokio::time::Instant::now() + common::step_limit();
    while node.retained("kept").await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never aged out");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        common::send(&mut c, "kept", b"fresh").await,
        26,
        "sequences go on"
    );
    let r = common::recv(&mut c, "kept", "", 100, Duration::ZERO).await;
    assert_eq!(r.dropped, 0, "the group had taken 16..=25 already");
    assert_eq!(r.messages.len(), 1);
    node.stop().await;
}

/// The conformance case `evicted_pending_messages_are_reported_dropped` on Redis: pending
/// messages that retention takes are reported to the group at its next read (not when their
/// lease falls due), and an Ack of one is answered "not pending".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_pending_messages_are_reported_dropped() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let config = common::redis::config(&redis.url(), &common::redis::namespace());
    let node = TestServer::with_redis(
        Limits {
            retention_messages: 3,
            ..Limits::default()
        },
        &config,
    )
    .await;
    let mut c = node.client().await;
    for i in 0..3u8 {
        common::send(&mut c, "ep", &[i]).await;
    }
    c.create_group(CreateGroupRequest {
        address: "ep".into(),
        group: "w".into(),
        start_sequence: 1,
        ack_wait: Some(Duration::from_secs(600).try_into().unwrap()),
        ..Default::default()
    })
    .await
    .unwrap();
    let r = common::recv(&mut c, "ep", "w", 2, Duration::ZERO).await;
    assert_eq!(
        r.messages.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        [1, 2]
    );
    for i in 3..6u8 {
        common::send(&mut c, "ep", &[i]).await;
    }
    let r = common::recv(&mut c, "ep", "w", 10, Duration::ZERO).await;
    assert_eq!(r.dropped, 3, "1 and 2 (pending) and 3 (never taken)");
    assert_eq!(
        r.messages
            .iter()
            .map(|m| (m.sequence, m.delivery_attempt))
            .collect::<Vec<_>>(),
        [(4, 1), (5, 1), (6, 1)]
    );
    let not = c
        .ack(AckRequest {
            address: "ep".into(),
            group: "w".into(),
            sequences: vec![1],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(not.not_pending, [1]);
    node.stop().await;
}

/// One SendStream's messages keep their order although a node has several append scripts in
/// flight for the address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_stream_keeps_its_order() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let node = nodes(&redis, 1).await.remove(0);
    let mut c = node.client().await;
    const N: u32 = 20_000;
    let requests =
        tokio_stream::iter((0..N).map(|i| send_req("ordered", i.to_be_bytes().to_vec())));
    let mut responses = c.send_stream(requests).await.unwrap().into_inner();
    let mut seqs = Vec::new();
    while let Some(r) = step("responses", responses.message()).await.unwrap() {
        assert!(r.error.is_none(), "{r:?}");
        seqs.push(r.sequence);
    }
    assert_eq!(
        seqs,
        (1..=u64::from(N)).collect::<Vec<_>>(),
        "responses in order"
    );
    let mut stream = replay(&mut c, "ordered", 1).await;
    let got = take_messages(&mut stream, N as usize).await;
    for (s, p) in got {
        assert_eq!(
            p,
            u32::try_from(s - 1).unwrap().to_be_bytes(),
            "sequence {s}"
        );
    }
    node.stop().await;
}

/// `rediss://`: Redis serving TLS only (certificates made here), verified with
/// `--redis-ca-cert`; a node that does not trust the CA is refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_with_a_ca_certificate() {
    if !require(&REDIS_SERVER) {
        return;
    }
    switchboard::grpc::tls::install_provider();
    let pki = common::pki::Pki::new("redis-tls");
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        pki.path("ca.pem"),
    );
    let port = common::redis::free_port().to_string();
    let redis = RedisServer::start_with(&[
        "--port",
        "0",
        "--tls-port",
        &port,
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-ca-cert-file",
        ca.to_str().unwrap(),
        "--tls-auth-clients",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let url = format!("rediss://127.0.0.1:{port}");
    let mut config = common::redis::config(&url, &common::redis::namespace());
    // Without the CA, the server's certificate is not trusted.
    let refused = switchboard::Broker::with_redis(Limits::default(), &config)
        .await
        .unwrap_err();
    assert!(refused.contains("redis"), "{refused}");
    config.ca_cert = Some(ca.clone());
    let node = TestServer::with_redis(Limits::default(), &config).await;
    let mut c = node.client().await;
    assert_eq!(common::send(&mut c, "tls", b"over TLS").await, 1);
    let r = common::recv(&mut c, "tls", "", 10, Duration::ZERO).await;
    assert_eq!(r.messages[0].payload.as_ref(), b"over TLS");
    node.stop().await;
    drop(redis);
}

/// Sequences past 10^14 keep their exact digits in entry ids (Lua would write `1e+14`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequences_past_ten_to_the_fourteen_stay_exact() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let ns = common::redis::namespace();
    let node =
        TestServer::with_redis(Limits::default(), &common::redis::config(&redis.url(), &ns)).await;
    let mut c = node.client().await;
    // Start the address's sequence as if it had lived long.
    let mut r = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let last: u64 = 99_999_999_999_998;
    let _: () = redis::cmd("HSET")
        .arg(format!("{ns}:{{big}}:m"))
        .arg("seq")
        .arg(last)
        .query_async(&mut r)
        .await
        .unwrap();
    for (i, want) in (last + 1..=last + 3).enumerate() {
        assert_eq!(
            common::send(&mut c, "big", &[u8::try_from(i).unwrap()]).await,
            want
        );
    }
    let mut stream = replay(&mut c, "big", last + 2).await;
    let got = take_messages(&mut stream, 2).await;
    assert_eq!(got, [(last + 2, vec![1]), (last + 3, vec![2])]);
    node.stop().await;
}

/// One section of Redis's `INFO`.
async fn redis_info(redis: &RedisServer, section: &str) -> String {
    let mut r = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("INFO")
        .arg(section)
        .query_async(&mut r)
        .await
        .unwrap()
}

/// Take scripts Redis has run (`EVALSHA` calls; the send script goes by `EVAL`).
async fn take_scripts(redis: &RedisServer) -> u64 {
    redis_info(redis, "commandstats")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A pool of 16 waiting Recv calls in one group and one waiter in a second group, on one node:
/// each message wakes one waiting reader per group, not the whole pool (each woken reader runs
/// a take script in Redis), and both groups still get every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_wakes_one_waiting_reader_per_group_not_the_pool() {
    if !require(&REDIS_SERVER) {
        return;
    }
    const N: u64 = 100;
    const POOL: usize = 16;
    let redis = RedisServer::start();
    let node = nodes(&redis, 1).await.remove(0);
    let addr = node.addr.to_string();
    let mut c = client(&addr).await;
    // Both groups begin at the first message.
    for g in ["pool", "audit"] {
        common::recv(&mut c, "jobs", g, 1, Duration::ZERO).await;
    }
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, u64)>();
    let mut workers = Vec::new();
    for w in 0..=POOL {
        let group = if w == POOL { "audit" } else { "pool" };
        let (mut c, tx, done) = (client(&addr).await, tx.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            while !*done.borrow() {
                let r = common::recv(&mut c, "jobs", group, 10, Duration::from_secs(1)).await;
                for m in r.messages {
                    tx.send((group, m.sequence)).unwrap();
                }
            }
        }));
    }
    drop(tx);
    // Let the readers begin to wait, then send one message at a time, each once both groups
    // have it, so the whole pool is waiting when the next one arrives.
    common::eventually("17 readers waiting", || {
        node.broker.redis_waiters("jobs") == POOL + 1
    })
    .await;
    let before = take_scripts(&redis).await;
    let mut got: HashMap<&str, Vec<u64>> = HashMap::new();
    for i in 0..N {
        let seq = common::send(&mut c, "jobs", &i.to_be_bytes()).await;
        for _ in 0..2 {
            let (group, s) = step("receive", rx.recv()).await.expect("a worker");
            got.entry(group).or_default().push(s);
        }
        assert_eq!(got["pool"].last(), Some(&seq));
        assert_eq!(got["audit"].last(), Some(&seq));
    }
    let takes = take_scripts(&redis).await - before;
    done_tx.send(true).unwrap();
    for w in workers {
        step("worker", w).await.unwrap();
    }
    assert!(rx.recv().await.is_none(), "nothing received twice");
    assert_eq!(got["pool"], (1..=N).collect::<Vec<_>>());
    assert_eq!(got["audit"], (1..=N).collect::<Vec<_>>());
    // Per message and group: the woken reader's take and its next Recv's, plus each waiter's
    // 500 ms re-poll. Waking the pool would run at least 17 per message.
    assert!(
        takes < 8 * N,
        "{takes} take scripts for {N} messages in 2 groups (16 + 1 waiting readers)"
    );
    node.stop().await;
}

/// Bytes Redis has sent to its clients so far (`INFO stats`).
async fn redis_output_bytes(redis: &RedisServer) -> u64 {
    redis_info(redis, "stats")
        .await
        .lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// A node's own Sends reach its subscribers from the append script's reply, not read back from
/// Redis: 2,000 messages of 1,000 bytes cost Redis well under their 2 MB of output. A second
/// node, which must read them from Redis, sees exactly the same messages (sequence, payload,
/// headers, `sent_at`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_own_sends_reach_its_subscribers_without_a_read_back() {
    if !require(&REDIS_SERVER) {
        return;
    }
    const BATCHES: usize = 2;
    const PER_BATCH: usize = 1000;
    const PAYLOAD: usize = 1000;
    let redis = RedisServer::start();
    let nodes = nodes(&redis, 2).await;
    let mut c = client(&nodes[0].addr.to_string()).await;
    let mut own = subscribe(&mut c, "own", "").await;
    // The node follows the address from here on.
    common::send(&mut c, "own", b"first").await;
    let first = match next_event(&mut own).await {
        Event::Message(m) => m,
        Event::Dropped(d) => panic!("{} dropped", d.count),
    };
    assert_eq!(first.sequence, 1);
    let before = redis_output_bytes(&redis).await;
    for b in 0..BATCHES {
        let messages = (0..PER_BATCH)
            .map(|k| BatchMessage {
                payload: vec![u8::try_from(k % 251).unwrap(); PAYLOAD].into(),
                headers: if k % 2 == 0 {
                    HashMap::from([("batch".to_string(), b.to_string())])
                } else {
                    HashMap::new()
                },
                ..Default::default()
            })
            .collect();
        c.send_batch(SendBatchRequest {
            address: "own".into(),
            messages,
        })
        .await
        .expect("send batch");
    }
    let n = BATCHES * PER_BATCH;
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        match next_event(&mut own).await {
            Event::Message(m) => seen.push(m),
            Event::Dropped(d) => panic!("{} dropped", d.count),
        }
    }
    let output = redis_output_bytes(&redis).await - before;
    assert!(
        output < (n * PAYLOAD / 4) as u64,
        "Redis sent {output} bytes for {n} messages of {PAYLOAD} bytes the node sent itself"
    );
    assert_eq!(
        seen.iter().map(|m| m.sequence).collect::<Vec<_>>(),
        (2..=n as u64 + 1).collect::<Vec<_>>()
    );
    // The other node reads them from Redis: the same messages.
    let mut other = client(&nodes[1].addr.to_string()).await;
    let mut read_back = replay(&mut other, "own", 2).await;
    for m in &seen {
        match next_event(&mut read_back).await {
            Event::Message(r) => assert_eq!(&r, m, "sequence {}", m.sequence),
            Event::Dropped(d) => panic!("{} dropped", d.count),
        }
    }
    for node in nodes {
        node.stop().await;
    }
}

/// Byte retention stays exact when two nodes append to one address, with Sends, Sends with a
/// `message_id` (the dedup lookup) and SendBatch, and payload sizes that differ: the retained
/// bytes, count and first sequence match the newest messages that fit (the append script finds
/// the cut by binary search over each entry's cumulative byte count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_retention_is_exact_across_nodes_with_sends_dedup_and_batches() {
    if !require(&REDIS_SERVER) {
        return;
    }
    const RETAIN: usize = 6_000;
    let redis = RedisServer::start();
    let config = common::redis::config(&redis.url(), &common::redis::namespace());
    let limits = Limits {
        retention_bytes: RETAIN,
        max_message_bytes: 1024,
        ..Limits::default()
    };
    let nodes = [
        TestServer::with_redis(limits.clone(), &config).await,
        TestServer::with_redis(limits, &config).await,
    ];
    let mut clients = [
        client(&nodes[0].addr.to_string()).await,
        client(&nodes[1].addr.to_string()).await,
    ];
    let overhead = switchboard::config::MESSAGE_OVERHEAD_BYTES;
    // (sequence, size) of every message stored, in order.
    let mut stored: Vec<(u64, usize)> = Vec::new();
    for i in 0..90usize {
        let c = &mut clients[i % 2];
        let len = 50 + (i * 137) % 900;
        if i % 5 == 4 {
            let messages = (0..3)
                .map(|k| BatchMessage {
                    payload: vec![1; len + k].into(),
                    ..Default::default()
                })
                .collect();
            let r = c
                .send_batch(SendBatchRequest {
                    address: "bytes".into(),
                    messages,
                })
                .await
                .expect("send batch")
                .into_inner();
            for (k, res) in r.results.iter().enumerate() {
                stored.push((res.sequence, len + k + overhead));
            }
        } else {
            let message_id = if i % 3 == 0 {
                format!("id-{i}")
            } else {
                String::new()
            };
            let r = c
                .send(SendRequest {
                    address: "bytes".into(),
                    payload: vec![2; len].into(),
                    message_id,
                    ..Default::default()
                })
                .await
                .expect("send")
                .into_inner();
            assert!(!r.duplicate);
            stored.push((r.sequence, len + overhead));
        }
    }
    let sequences: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (1..=stored.len() as u64).collect::<Vec<_>>());
    // The newest messages whose sizes fit in RETAIN.
    let mut kept = 0;
    let mut bytes = 0;
    for (_, size) in stored.iter().rev() {
        if bytes + size > RETAIN {
            break;
        }
        bytes += size;
        kept += 1;
    }
    for node in &nodes {
        let (info, _) = node
            .broker
            .inspect("bytes", false)
            .await
            .expect("inspect")
            .expect("the address exists");
        assert_eq!(info.retained_bytes, bytes);
        assert_eq!(info.retained_messages, kept);
        assert_eq!(info.first_sequence, stored[stored.len() - kept].0);
    }
    for node in nodes {
        node.stop().await;
    }
}
