//! Every validation rule: the status code, the field named in the message, and nothing stored.

mod common;

use std::collections::HashMap;

use common::{send, subscribe, TestServer};
use switchboard::{
    config::Limits,
    pb::{RecvRequest, SendRequest, SubscribeRequest},
};
use tonic::Code;

fn assert_status(r: Result<impl std::fmt::Debug, tonic::Status>, code: Code, needles: &[&str]) {
    let status = r.expect_err("request must be rejected");
    assert_eq!(status.code(), code, "{status:?}");
    for n in needles {
        assert!(
            status.message().contains(n),
            "message {:?} should mention {n:?}",
            status.message()
        );
    }
}

fn send_req(address: &str, payload: Vec<u8>, headers: HashMap<String, String>) -> SendRequest {
    SendRequest {
        address: address.into(),
        payload: payload.into(),
        headers,
        message_id: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_addresses_are_rejected_and_nothing_is_created() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let long = "a".repeat(256);
    for bad in [
        "",
        long.as_str(),
        "two words",
        "tab\there",
        "bell\u{7}",
        "orders.*",
        "orders.>",
        // Invisible format characters: look-alike names in the console and logs.
        "pay\u{200B}ments",
        "\u{202E}stnemyap",
        "\u{FEFF}payments",
        "pay\u{2066}ments",
    ] {
        assert_status(
            c.send(send_req(bad, b"x".to_vec(), HashMap::new())).await,
            Code::InvalidArgument,
            &["address"],
        );
        assert_status(
            c.recv(RecvRequest {
                address: bad.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["address"],
        );
        if bad.contains(['*', '>']) {
            continue; // a valid pattern for Subscribe (tests/wildcards.rs)
        }
        assert_status(
            c.subscribe(SubscribeRequest {
                address: bad.into(),
                group: String::new(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["address"],
        );
    }
    // Malformed patterns.
    for bad in ["orders.*x", "a.>.b", "a..*", "*.", ">>", "sp *"] {
        assert_status(
            c.subscribe(SubscribeRequest {
                address: bad.into(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["address"],
        );
    }
    assert_eq!(server.broker.address_count(), 0, "no address was created");
    // The longest legal address works.
    assert_eq!(send(&mut c, &"a".repeat(255), b"").await, 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_groups_are_rejected() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for bad in ["a b".to_string(), "g".repeat(256), "nl\n".to_string()] {
        assert_status(
            c.recv(RecvRequest {
                address: "ok".into(),
                group: bad.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["group"],
        );
        assert_status(
            c.subscribe(SubscribeRequest {
                address: "ok".into(),
                group: bad,
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["group"],
        );
    }
    assert_eq!(server.broker.address_count(), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_limit_is_ours_not_tonics() {
    // Default limits: 4 MiB payloads. One byte more must be our RESOURCE_EXHAUSTED naming the
    // field and the limit, not tonic's bare OUT_OF_RANGE.
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert_eq!(send(&mut c, "big", b"first").await, 1);
    let limit = 4 * 1024 * 1024;
    assert_status(
        c.send(send_req("big", vec![0; limit + 1], HashMap::new()))
            .await,
        Code::ResourceExhausted,
        &["payload", &limit.to_string(), "--max-message-bytes"],
    );
    // Far above it (6 MB, the 64 MiB ceiling, beyond it): still ours, refused from the message's
    // length prefix before it is read. A SendStream cannot skip such a message: it ends.
    for size in [6_000_000, 64 * 1024 * 1024, 65 * 1024 * 1024] {
        assert_status(
            c.send(send_req("big", vec![0; size], HashMap::new())).await,
            Code::ResourceExhausted,
            &[
                "payload: a message of",
                "--max-message-bytes",
                &limit.to_string(),
            ],
        );
        let mut responses = c
            .send_stream(tokio_stream::iter(vec![send_req(
                "big",
                vec![0; size],
                HashMap::new(),
            )]))
            .await
            .unwrap()
            .into_inner();
        let e = responses.message().await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(
            e.message().contains("--max-message-bytes"),
            "{}",
            e.message()
        );
    }
    // Just above the limit, within the decode headroom: per message in a SendStream.
    let mut responses = c
        .send_stream(tokio_stream::iter(vec![
            send_req("big", vec![0; limit + 1], HashMap::new()),
            send_req("big", b"fine".to_vec(), HashMap::new()),
        ]))
        .await
        .unwrap()
        .into_inner();
    let first = responses.message().await.unwrap().unwrap();
    assert_eq!(first.error.unwrap().code, Code::ResourceExhausted as i32);
    assert_eq!(responses.message().await.unwrap().unwrap().sequence, 2);
    // Nothing else stored: the next message gets sequence 3. Exactly the limit is accepted.
    assert_eq!(send(&mut c, "big", &vec![1; limit]).await, 3);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_payload_is_valid() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert_eq!(send(&mut c, "empty", b"").await, 1);
    let r = common::recv(&mut c, "empty", "", 1, std::time::Duration::ZERO).await;
    assert_eq!(r.messages.len(), 1);
    assert!(r.messages[0].payload.is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_limits() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    assert_eq!(send(&mut c, "h", b"x").await, 1);
    let too_many: HashMap<String, String> = (0..65)
        .map(|i| (format!("k{i}"), "v".to_string()))
        .collect();
    assert_status(
        c.send(send_req("h", b"x".to_vec(), too_many)).await,
        Code::InvalidArgument,
        &["headers", "64"],
    );
    let mut too_big = HashMap::new();
    too_big.insert("k".to_string(), "v".repeat(16 * 1024));
    assert_status(
        c.send(send_req("h", b"x".to_vec(), too_big)).await,
        Code::ResourceExhausted,
        &["headers", "16384"],
    );
    let mut empty_key = HashMap::new();
    empty_key.insert(String::new(), "v".to_string());
    assert_status(
        c.send(send_req("h", b"x".to_vec(), empty_key)).await,
        Code::InvalidArgument,
        &["headers"],
    );
    // 64 headers of 16 KiB in all are fine.
    let mut max: HashMap<String, String> = (0..63)
        .map(|i| (format!("k{i:02}"), String::new()))
        .collect();
    let used: usize = max.keys().map(String::len).sum();
    max.insert("last".into(), "v".repeat(16 * 1024 - used - 4));
    assert_eq!(
        c.send(send_req("h", b"x".to_vec(), max))
            .await
            .unwrap()
            .into_inner()
            .sequence,
        2
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recv_argument_limits() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    send(&mut c, "r", b"kept").await;
    let req = |max_messages: u32, seconds: i64, nanos: i32| RecvRequest {
        address: "r".into(),
        group: String::new(),
        max_messages,
        wait: Some(prost_types::Duration { seconds, nanos }),
        max_bytes: 0,
    };
    assert_status(
        c.recv(req(1001, 0, 0)).await,
        Code::InvalidArgument,
        &["max_messages", "1000"],
    );
    assert_status(
        c.recv(req(1, -1, 0)).await,
        Code::InvalidArgument,
        &["wait"],
    );
    assert_status(
        c.recv(req(1, 0, -5)).await,
        Code::InvalidArgument,
        &["wait"],
    );
    assert_status(
        c.recv(req(1, 61, 0)).await,
        Code::InvalidArgument,
        &["wait", "60s"],
    );
    assert_status(
        c.recv(req(1, 60, 1)).await,
        Code::InvalidArgument,
        &["wait", "60s"],
    );
    // Nothing was taken by the rejected calls.
    let r = c.recv(req(1000, 0, 0)).await.unwrap().into_inner();
    assert_eq!(r.messages.len(), 1);
    assert_eq!(r.messages[0].payload.as_ref(), b"kept");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_alone_above_a_retention_bound_is_refused() {
    let limits = Limits {
        max_message_bytes: 1024,
        retention_bytes: 1024,
        max_retained_bytes: 1024,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut c = server.client().await;
    assert_eq!(send(&mut c, "tight", &[0; 100]).await, 1);
    // 1000 payload bytes + 128 overhead > 1024 retained bytes per address.
    assert_status(
        c.send(send_req("tight", vec![0; 1000], HashMap::new()))
            .await,
        Code::ResourceExhausted,
        &["payload", "--retention-bytes", "1024"],
    );
    assert_eq!(
        server.retained("tight").await,
        1,
        "nothing stored or evicted"
    );
    assert_eq!(send(&mut c, "tight", &[0; 100]).await, 2);
    // Subscribe with a group works on the same address afterwards (no state was damaged).
    let _s = subscribe(&mut c, "tight", "g").await;
    server.stop().await;
}

/// A start_time past 9999-12-31T23:59:59Z (the end of a protobuf Timestamp's range) is
/// INVALID_ARGUMENT naming start_time, for CreateGroup and Subscribe, on every engine; the
/// address gets no group and the broker keeps serving. Before, the Redis engine panicked
/// formatting the year-10000 time in CreateGroup (and the others accepted it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_times_past_the_timestamp_range_are_refused() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    send(&mut c, "far.future", b"x").await;
    for seconds in [253_402_300_800i64, 253_402_300_800 * 4, i64::MAX] {
        let t = prost_types::Timestamp { seconds, nanos: 0 };
        assert_status(
            c.create_group(switchboard::pb::CreateGroupRequest {
                address: "far.future".into(),
                group: "g".into(),
                start_time: Some(t),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["start_time", "9999-12-31"],
        );
        assert_status(
            c.subscribe(SubscribeRequest {
                address: "far.future".into(),
                start_time: Some(t),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            &["start_time", "9999-12-31"],
        );
    }
    // The last second of the range is a valid start: the group starts at the end.
    let r = c
        .create_group(switchboard::pb::CreateGroupRequest {
            address: "far.future".into(),
            group: "last".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: 253_402_300_799,
                nanos: 999_999_999,
            }),
            ..Default::default()
        })
        .await
        .expect("the last second of year 9999 is valid")
        .into_inner();
    assert_eq!(r.next_sequence, 2);
    let groups = common::group_names(&server, "far.future").await;
    assert!(!groups.iter().any(|g| g == "g"), "{groups:?}");
    assert_eq!(send(&mut c, "far.future", b"y").await, 2);
    server.stop().await;
}
