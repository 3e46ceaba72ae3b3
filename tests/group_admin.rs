//! Named groups with a start: CreateGroup (idempotent, ALREADY_EXISTS, start positions) and
//! DeleteGroup (its streams and waiting Recv calls end NOT_FOUND), over a real server.

mod common;

use std::time::Duration;

use common::{eventually, group_names, next_event, recv, send, step, subscribe, TestServer};
use switchboard::pb::{
    subscribe_response::Event, CreateGroupRequest, CreateGroupResponse, DeleteGroupRequest,
    RecvRequest,
};
use tonic::Code;

fn create(address: &str, group: &str, start_sequence: u64) -> CreateGroupRequest {
    CreateGroupRequest {
        address: address.into(),
        group: group.into(),
        start_sequence,
        ..Default::default()
    }
}

fn delete(address: &str, group: &str) -> DeleteGroupRequest {
    DeleteGroupRequest {
        address: address.into(),
        group: group.into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_created_at_one_after_100_sends_takes_all_100() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for i in 0..100u8 {
        send(&mut c, "g.late", &[i]).await;
    }
    // The default group reads everything first: history stays for the new group.
    assert_eq!(
        recv(&mut c, "g.late", "", 1000, Duration::ZERO)
            .await
            .messages
            .len(),
        100
    );
    let r = c.create_group(create("g.late", "audit", 1)).await.unwrap();
    assert_eq!(
        r.into_inner(),
        CreateGroupResponse {
            created: true,
            next_sequence: 1
        }
    );
    let got = recv(&mut c, "g.late", "audit", 1000, Duration::ZERO).await;
    assert_eq!(got.dropped, 0);
    let seqs: Vec<u64> = got.messages.iter().map(|m| m.sequence).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    for (i, m) in got.messages.iter().enumerate() {
        assert_eq!(m.payload.as_ref(), [u8::try_from(i).unwrap()]);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_group_is_idempotent_and_other_settings_already_exist() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for _ in 0..10 {
        send(&mut c, "g.idem", b"x").await;
    }
    let first = c.create_group(create("g.idem", "g", 3)).await.unwrap();
    assert!(first.get_ref().created);
    let again = c.create_group(create("g.idem", "g", 3)).await.unwrap();
    assert_eq!(
        again.into_inner(),
        CreateGroupResponse {
            created: false,
            next_sequence: 3
        }
    );
    let other = c.create_group(create("g.idem", "g", 5)).await.unwrap_err();
    assert_eq!(other.code(), Code::AlreadyExists);
    assert!(
        other.message().contains("\"g\"") && other.message().contains("start_sequence 3"),
        "{other:?}"
    );
    // Default: only messages sent after creation.
    let end = c.create_group(create("g.idem", "fresh", 0)).await.unwrap();
    assert_eq!(end.get_ref().next_sequence, 11);
    assert!(recv(&mut c, "g.idem", "fresh", 10, Duration::ZERO)
        .await
        .messages
        .is_empty());
    // Errors name the field.
    let past = c.create_group(create("g.idem", "p", 12)).await.unwrap_err();
    assert_eq!(past.code(), Code::OutOfRange);
    assert!(past.message().contains("start_sequence"), "{past:?}");
    let default = c.create_group(create("g.idem", "", 1)).await.unwrap_err();
    assert_eq!(default.code(), Code::InvalidArgument);
    assert!(default.message().starts_with("group:"), "{default:?}");
    let bad = c.create_group(create("g idem", "g", 0)).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("address:"), "{bad:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_group_ends_its_streams_and_waiting_recvs() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    c.create_group(create("g.del", "workers", 0)).await.unwrap();
    let mut stream = subscribe(&mut c, "g.del", "workers").await;
    let mut fanout = subscribe(&mut c, "g.del", "").await;
    let mut waiting_client = server.client().await;
    let waiting = tokio::spawn(async move {
        waiting_client
            .recv(RecvRequest {
                address: "g.del".into(),
                group: "workers".into(),
                max_messages: 1,
                wait: Some(prost_types::Duration {
                    seconds: 30,
                    nanos: 0,
                }),
                max_bytes: 0,
            })
            .await
    });
    let broker = server.broker.clone();
    eventually("the Recv is waiting", || broker.waiting_recvs("g.del") == 1).await;
    c.delete_group(delete("g.del", "workers")).await.unwrap();
    let ended = step("group stream ends", stream.message())
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::NotFound);
    assert_eq!(ended.message(), "group deleted");
    let r = step("waiting recv ends", waiting)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(r.code(), Code::NotFound);
    assert_eq!(r.message(), "group deleted");
    // The address and its fan-out subscriber are untouched.
    send(&mut c, "g.del", b"still here").await;
    match next_event(&mut fanout).await {
        Event::Message(m) => assert_eq!(m.sequence, 1),
        Event::Dropped(d) => panic!("dropped {}", d.count),
    }
    // Unknown now; the default group cannot be deleted.
    let again = c
        .delete_group(delete("g.del", "workers"))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    assert!(again.message().contains("workers"), "{again:?}");
    let unknown = c.delete_group(delete("g.nope", "x")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let default = c.delete_group(delete("g.del", "")).await.unwrap_err();
    assert_eq!(default.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_group_keeps_its_address_past_the_idle_time() {
    let server = TestServer::with_limits(switchboard::config::Limits {
        idle_address: Duration::from_millis(50),
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    c.create_group(create("g.keep", "g", 0)).await.unwrap();
    // A witness created afterwards: once it is reclaimed, g.keep was idle long enough too.
    {
        let mut client = server.client().await;
        let _s = subscribe(&mut client, "g.witness", "").await;
    }
    let broker = server.broker.clone();
    eventually("witness reclaimed", || !broker.contains("g.witness")).await;
    assert!(
        broker.contains("g.keep"),
        "the created group keeps its address"
    );
    send(&mut c, "g.keep", b"for g").await;
    let got = recv(&mut c, "g.keep", "g", 10, Duration::ZERO).await;
    assert_eq!(got.messages.len(), 1);
    server.stop().await;
}

/// `--max-groups-per-address` bounds the named groups one address holds, however they are
/// made (Recv, Subscribe, CreateGroup): the next one is RESOURCE_EXHAUSTED naming the flag,
/// nothing is created, the existing groups and the default group go on, and deleting one makes
/// room. Before the bound, any Recv with a new name made a group (60,000 in 21 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_per_address_are_bounded() {
    let server = TestServer::with_limits(switchboard::config::Limits {
        max_groups_per_address: 3,
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let a = "g.bounded";
    send(&mut c, a, b"m").await;
    recv(&mut c, a, "by-recv", 1, Duration::ZERO).await;
    let _stream = subscribe(&mut c, a, "by-stream").await;
    step("create", c.create_group(create(a, "created", 1)))
        .await
        .expect("third group");
    let refused = |s: tonic::Status| {
        assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        assert!(s.message().contains("--max-groups-per-address"), "{s:?}");
    };
    refused(
        c.recv(RecvRequest {
            address: a.into(),
            group: "fourth".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    refused(
        c.subscribe(switchboard::pb::SubscribeRequest {
            address: a.into(),
            group: "fourth".into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    refused(c.create_group(create(a, "fourth", 1)).await.unwrap_err());
    let mut names = group_names(&server, a).await;
    names.sort();
    assert_eq!(names, ["", "by-recv", "by-stream", "created"]);
    // The default group and the existing groups are not affected.
    assert_eq!(
        recv(&mut c, a, "", 10, Duration::ZERO).await.messages.len(),
        1
    );
    assert_eq!(
        recv(&mut c, a, "created", 10, Duration::ZERO)
            .await
            .messages
            .len(),
        1
    );
    step("delete", c.delete_group(delete(a, "by-recv")))
        .await
        .expect("delete");
    step("create", c.create_group(create(a, "fourth", 1)))
        .await
        .expect("room again");
    server.stop().await;
}

/// A group made by a Recv (a typo, a one-off reader) and then left unread is removed after
/// `--idle-group`; groups made by CreateGroup and the default group stay. Before, such groups
/// were kept for as long as the address held messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_made_by_a_read_are_removed_when_idle() {
    let server = TestServer::with_limits(switchboard::config::Limits {
        idle_group: Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut c = server.client().await;
    let a = "g.idle";
    step("create", c.create_group(create(a, "kept", 1)))
        .await
        .expect("create");
    send(&mut c, a, b"m").await;
    recv(&mut c, a, "typo", 1, Duration::ZERO).await;
    let mut names = group_names(&server, a).await;
    names.sort();
    assert_eq!(names, ["", "kept", "typo"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let names = group_names(&server, a).await;
        if !names.iter().any(|n| n == "typo") {
            let mut names = names;
            names.sort();
            assert_eq!(names, ["", "kept"], "only the idle read-made group goes");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle group was not removed: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A later read makes it again, at the end.
    send(&mut c, a, b"n").await;
    let r = recv(&mut c, a, "typo", 10, Duration::ZERO).await;
    assert!(r.messages.is_empty(), "made again at the end: {r:?}");
    assert_eq!(
        recv(&mut c, a, "kept", 10, Duration::ZERO)
            .await
            .messages
            .len(),
        2
    );
    server.stop().await;
}

/// On the disk engine the removal of an idle group made by a read is journaled: after a
/// restart on the same directory (the real binary, SIGTERM) the group is still gone and the
/// group made by CreateGroup is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_group_removed_on_disk_stays_removed_after_a_restart() {
    use switchboard::pb::{admin_client::AdminClient, broker_client::BrokerClient};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_string();
    let a = "g.idle.disk";
    let names = |addr: String| async move {
        let mut admin = AdminClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut names: Vec<String> = admin
            .get_address(switchboard::pb::GetAddressRequest { address: a.into() })
            .await
            .unwrap()
            .into_inner()
            .groups
            .into_iter()
            .map(|g| g.group)
            .collect();
        names.sort();
        names
    };
    let broker =
        common::BrokerProcess::start(&["--data-dir", &data, "--idle-group", "300ms"]).await;
    let mut c = BrokerClient::connect(format!("http://{}", broker.addr))
        .await
        .unwrap();
    step("create", c.create_group(create(a, "kept", 1)))
        .await
        .expect("create");
    send(&mut c, a, b"m").await;
    recv(&mut c, a, "typo", 1, Duration::ZERO).await;
    assert_eq!(names(broker.addr.clone()).await, ["", "kept", "typo"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while names(broker.addr.clone()).await.iter().any(|n| n == "typo") {
        assert!(tokio::time::Instant::now() < deadline, "never removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut child = broker.child;
    common::sigterm(&child);
    assert!(step("exit", child.wait()).await.unwrap().success());
    let again = common::BrokerProcess::start(&["--data-dir", &data]).await;
    assert_eq!(names(again.addr.clone()).await, ["", "kept"]);
    let mut child = again.child;
    common::sigterm(&child);
    assert!(step("exit", child.wait()).await.unwrap().success());
}
