//! The Redis engine on a real Redis Cluster: three masters started here on free loopback ports
//! and joined with `redis-cli --cluster create`, three switchboard nodes with
//! `--redis-cluster`. Addresses land on different masters (each address's keys share one hash
//! slot); fan-out, replay, a consumer group with acks, dedup and Admin work across them.
//!
//! `SWITCHBOARD_CLUSTER_MESSAGES` messages per address (default 500; `scripts/redis-cluster`
//! runs the long version).

mod common;

use std::{collections::HashMap, time::Duration};

use common::{
    next_event,
    prereq::{require, REDIS_CLI, REDIS_SERVER},
    redis::RedisServer,
    step, TestServer,
};
use switchboard::{
    config::Limits,
    engine::redis::RedisConfig,
    pb::{
        subscribe_response::Event, AckRequest, BatchMessage, CreateGroupRequest, RecvRequest,
        SendBatchRequest, SendRequest, SubscribeRequest,
    },
};

/// Three cluster masters, slots spread by `redis-cli --cluster create`.
fn cluster() -> Vec<RedisServer> {
    let masters: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
        })
        .collect();
    let mut create = std::process::Command::new("redis-cli");
    create.arg("--cluster").arg("create");
    for m in &masters {
        create.arg(format!("127.0.0.1:{}", m.port));
    }
    let out = create
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli on PATH (apt-get install redis-server)");
    assert!(out.status.success(), "cluster create: {out:?}");
    // `--cluster create` returns once every slot is assigned; wait until each master agrees.
    for m in &masters {
        let deadline = std::time::Instant::now() + common::step_limit();
        loop {
            let info = std::process::Command::new("redis-cli")
                .args(["-p", &m.port.to_string(), "cluster", "info"])
                .output()
                .expect("redis-cli");
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "cluster never ok");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    masters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_a_three_master_cluster() {
    if !(require(&REDIS_SERVER) && require(&REDIS_CLI)) {
        return;
    }
    let n: u64 = std::env::var("SWITCHBOARD_CLUSTER_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let masters = cluster();
    let config = RedisConfig {
        urls: masters.iter().map(RedisServer::url).collect(),
        cluster: true,
        namespace: common::redis::namespace(),
        ca_cert: None,
    };
    // Retention above what is sent: nothing may be evicted here (dedup needs the first message).
    let limits = Limits {
        retention_messages: usize::try_from(2 * n).unwrap().max(65_536),
        ..Limits::default()
    };
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(TestServer::with_redis(limits.clone(), &config).await);
    }
    let addresses: Vec<String> = (0..6).map(|i| format!("cl.{i}")).collect();
    // A fan-out subscriber per address on node 2, a group per address created on node 3.
    let mut streams = Vec::new();
    for a in &addresses {
        let mut c = nodes[1].client().await;
        streams.push(common::subscribe(&mut c, a, "").await);
        let mut c = nodes[2].client().await;
        c.create_group(CreateGroupRequest {
            address: a.clone(),
            group: "w".into(),
            ack_wait: Some(Duration::from_secs(60).try_into().unwrap()),
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .expect("create group");
    }
    // Sends through node 1: batches of 100, plus a duplicate of the first message.
    let mut c = nodes[0].client().await;
    for a in &addresses {
        let mut sent = 0;
        while sent < n {
            let k = (n - sent).min(100);
            let r = c
                .send_batch(SendBatchRequest {
                    address: a.clone(),
                    messages: (sent..sent + k)
                        .map(|i| BatchMessage {
                            payload: i.to_string().into_bytes().into(),
                            message_id: format!("id-{i}"),
                            ..Default::default()
                        })
                        .collect(),
                })
                .await
                .expect("send batch")
                .into_inner();
            assert!(r.results.iter().all(|r| !r.duplicate));
            sent += k;
        }
        let dup = c
            .send(SendRequest {
                address: a.clone(),
                payload: b"0".to_vec().into(),
                message_id: "id-0".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!((dup.sequence, dup.duplicate), (1, true), "dedup on {a}");
    }
    // Each address's keys sit on the master that owns its slot; six addresses cover all three.
    for m in &masters {
        let keys = std::process::Command::new("redis-cli")
            .args(["-p", &m.port.to_string(), "--scan", "--pattern"])
            .arg(format!("{}:*", config.namespace))
            .output()
            .expect("redis-cli");
        assert!(
            !keys.stdout.is_empty(),
            "master on port {} holds some addresses",
            m.port
        );
    }
    for (a, stream) in addresses.iter().zip(&mut streams) {
        for want in 1..=n {
            match next_event(stream).await {
                Event::Message(m) => {
                    assert_eq!(m.sequence, want, "{a}: dense, in order");
                    assert_eq!(m.payload.as_ref(), (want - 1).to_string().as_bytes());
                }
                Event::Dropped(d) => panic!("{a}: dropped {}", d.count),
            }
        }
    }
    // Workers on all three nodes share each group; every message acked exactly once.
    for a in &addresses {
        let mut taken: HashMap<u64, u32> = HashMap::new();
        let mut turn = 0;
        while (taken.len() as u64) < n {
            let mut c = nodes[turn % 3].client().await;
            turn += 1;
            let r = step(
                "recv",
                c.recv(RecvRequest {
                    address: a.clone(),
                    group: "w".into(),
                    max_messages: 97,
                    wait: Some(Duration::from_secs(1).try_into().unwrap()),
                    max_bytes: 0,
                }),
            )
            .await
            .expect("recv")
            .into_inner();
            let seqs: Vec<u64> = r.messages.iter().map(|m| m.sequence).collect();
            for s in &seqs {
                *taken.entry(*s).or_default() += 1;
            }
            if !seqs.is_empty() {
                let not = c
                    .ack(AckRequest {
                        address: a.clone(),
                        group: "w".into(),
                        sequences: seqs,
                    })
                    .await
                    .expect("ack")
                    .into_inner();
                assert!(not.not_pending.is_empty());
            }
        }
        assert!(taken.values().all(|&k| k == 1), "{a}: exactly once");
        let (info, groups) = nodes[0].broker.inspect(a, true).await.unwrap().unwrap();
        assert_eq!((info.first_sequence, info.last_sequence), (1, n));
        let g = groups.iter().find(|g| g.group == "w").unwrap();
        assert_eq!((g.pending, g.lag), (0, 0), "{a}");
    }
    // A replay from the middle, through node 3.
    let mut c = nodes[2].client().await;
    let mut replay = c
        .subscribe(SubscribeRequest {
            address: addresses[0].clone(),
            start_sequence: n / 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    match next_event(&mut replay).await {
        Event::Message(m) => assert_eq!(m.sequence, n / 2),
        Event::Dropped(d) => panic!("dropped {}", d.count),
    }
    let (list, _) = nodes[1].broker.list("cl.", "", 100).await.unwrap();
    assert_eq!(
        list.len(),
        addresses.len(),
        "ListAddresses sees every address"
    );
    let purged = nodes[0].broker.purge(&addresses[5]).await.unwrap();
    assert_eq!(
        purged,
        Some(usize::try_from(n).unwrap()),
        "DeleteAddress on a cluster"
    );
    assert!(nodes[1]
        .broker
        .inspect(&addresses[5], false)
        .await
        .unwrap()
        .is_none());
    eprintln!(
        "cluster: {} addresses x {n} messages over 3 masters: fan-out, dedup, groups, replay ok",
        addresses.len()
    );
    for node in nodes {
        node.stop().await;
    }
}
