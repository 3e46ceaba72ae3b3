//! Replay: fan-out streams that start at a sequence or a time, over a real server. Resume after
//! a reconnect, exact `Dropped` for what retention no longer holds, `OUT_OF_RANGE` past the end,
//! and a catch-up that races concurrent Sends with no gap and no duplicate.

mod common;

use std::time::{Duration, SystemTime};

use common::{next_event, send, step, TestServer};
use switchboard::{
    config::Limits,
    pb::{
        broker_client::BrokerClient, subscribe_response::Event, SubscribeRequest, SubscribeResponse,
    },
};
use tonic::{transport::Channel, Code, Streaming};

async fn subscribe_at(
    c: &mut BrokerClient<Channel>,
    address: &str,
    start_sequence: u64,
) -> Result<Streaming<SubscribeResponse>, tonic::Status> {
    step(
        "subscribe",
        c.subscribe(SubscribeRequest {
            address: address.into(),
            start_sequence,
            ..Default::default()
        }),
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn next_sequence(s: &mut Streaming<SubscribeResponse>) -> u64 {
    match next_event(s).await {
        Event::Message(m) => m.sequence,
        Event::Dropped(d) => panic!("unexpected Dropped{{{}}}", d.count),
    }
}

fn small_window() -> Limits {
    Limits {
        retention_messages: 10,
        ..Limits::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_sequence_inside_the_window() {
    let server = TestServer::with_limits(small_window()).await;
    let mut c = server.client().await;
    for i in 1..=20u8 {
        send(&mut c, "r.inside", &[i]).await;
    }
    let mut s = subscribe_at(&mut c, "r.inside", 15).await.unwrap();
    for want in 15..=20 {
        match next_event(&mut s).await {
            Event::Message(m) => {
                assert_eq!(m.sequence, want);
                assert_eq!(m.payload.as_ref(), [u8::try_from(want).unwrap()]);
            }
            Event::Dropped(d) => panic!("dropped {}", d.count),
        }
    }
    // Then live, with no gap.
    send(&mut c, "r.inside", b"live").await;
    assert_eq!(next_sequence(&mut s).await, 21);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_before_the_window_reports_exactly_what_is_gone() {
    let server = TestServer::with_limits(small_window()).await;
    let mut c = server.client().await;
    for i in 1..=20u8 {
        send(&mut c, "r.before", &[i]).await;
    }
    let mut s = subscribe_at(&mut c, "r.before", 4).await.unwrap();
    match next_event(&mut s).await {
        Event::Dropped(d) => assert_eq!(d.count, 7, "4..=10 are gone"),
        Event::Message(m) => panic!("expected Dropped first, got {}", m.sequence),
    }
    for want in 11..=20 {
        assert_eq!(next_sequence(&mut s).await, want);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_at_last_plus_one_is_live_and_past_it_is_out_of_range() {
    let server = TestServer::with_limits(small_window()).await;
    let mut c = server.client().await;
    for i in 1..=5u8 {
        send(&mut c, "r.end", &[i]).await;
    }
    let err = subscribe_at(&mut c, "r.end", 7).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("start_sequence")
            && err.message().contains('7')
            && err.message().contains("last sequence 5"),
        "{}",
        err.message()
    );
    assert_eq!(server.broker.subscriber_count("r.end"), 0);
    let mut s = subscribe_at(&mut c, "r.end", 6).await.unwrap();
    send(&mut c, "r.end", b"six").await;
    assert_eq!(next_sequence(&mut s).await, 6);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_time() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for i in 1..=3u8 {
        send(&mut c, "r.time", &[i]).await;
    }
    // Wall-clock steps around the cut, so sent_at tells the batches apart.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let cut = SystemTime::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 4..=6u8 {
        send(&mut c, "r.time", &[i]).await;
    }
    let mut s = step(
        "subscribe",
        c.subscribe(SubscribeRequest {
            address: "r.time".into(),
            start_time: Some(cut.into()),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner();
    for want in 4..=6 {
        assert_eq!(next_sequence(&mut s).await, want);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fields_are_validated() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    send(&mut c, "r.bad", b"x").await;
    let both = c
        .subscribe(SubscribeRequest {
            address: "r.bad".into(),
            start_sequence: 1,
            start_time: Some(SystemTime::now().into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(both.code(), Code::InvalidArgument);
    assert!(both.message().contains("start_sequence"), "{both:?}");
    let with_group = c
        .subscribe(SubscribeRequest {
            address: "r.bad".into(),
            group: "g".into(),
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(with_group.code(), Code::InvalidArgument);
    assert!(with_group.message().contains("group"), "{with_group:?}");
    let bad_time = c
        .subscribe(SubscribeRequest {
            address: "r.bad".into(),
            start_time: Some(prost_types::Timestamp {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_time.code(), Code::InvalidArgument);
    assert!(bad_time.message().contains("start_time"), "{bad_time:?}");
    assert_eq!(server.broker.subscriber_count("r.bad"), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_reconnect_with_last_seen_plus_one() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let mut s = subscribe_at(&mut c, "r.resume", 0).await.unwrap();
    for i in 1..=5u8 {
        send(&mut c, "r.resume", &[i]).await;
    }
    let mut last = 0;
    for _ in 0..3 {
        last = next_sequence(&mut s).await;
    }
    assert_eq!(last, 3);
    drop(s);
    for i in 6..=8u8 {
        send(&mut c, "r.resume", &[i]).await;
    }
    let mut s = subscribe_at(&mut c, "r.resume", last + 1).await.unwrap();
    for want in 4..=8 {
        assert_eq!(next_sequence(&mut s).await, want);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_racing_ten_thousand_sends_has_no_gap_and_no_duplicate() {
    const BEFORE: u64 = 5_000;
    const DURING: u64 = 10_000;
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let backlog = tokio_stream::iter((0..BEFORE).map(|i| switchboard::pb::SendRequest {
        address: "r.race".into(),
        payload: i.to_be_bytes().to_vec().into(),
        headers: Default::default(),
        message_id: String::new(),
    }));
    let mut acks = c.send_stream(backlog).await.unwrap().into_inner();
    while let Some(r) = step("backlog ack", acks.message()).await.unwrap() {
        assert!(r.error.is_none());
    }
    // Concurrent Sends from two other connections while the subscriber catches up.
    let mut senders = Vec::new();
    for k in 0..2u64 {
        let mut c = server.client().await;
        senders.push(tokio::spawn(async move {
            for i in 0..DURING / 2 {
                let v = BEFORE + k * DURING / 2 + i;
                send(&mut c, "r.race", &v.to_be_bytes()).await;
            }
        }));
    }
    let mut s = subscribe_at(&mut c, "r.race", 1).await.unwrap();
    let mut next = 1;
    while next <= BEFORE + DURING {
        let seq = next_sequence(&mut s).await;
        assert_eq!(seq, next, "contiguous: no gap, no duplicate");
        next += 1;
    }
    for t in senders {
        step("senders", t).await.unwrap();
    }
    // Nothing more than was sent.
    send(&mut c, "r.race", b"last").await;
    assert_eq!(next_sequence(&mut s).await, BEFORE + DURING + 1);
    server.stop().await;
}
