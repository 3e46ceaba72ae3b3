//! The Prometheus endpoint: counters move by exactly the traffic sent, gauges say what is there.

mod common;

use std::{collections::HashMap, time::Duration};

use common::{next_event, recv, send, subscribe, TestServer};
use switchboard::{config::Limits, pb::subscribe_response::Event, pb::SendRequest};

fn get(m: &HashMap<String, f64>, key: &str) -> f64 {
    m.get(key).copied().unwrap_or(0.0)
}

fn delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, key: &str) -> f64 {
    get(after, key) - get(before, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_by_the_exact_traffic() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    let before = server.scrape().await;

    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "m.orders", "").await;
    recv(&mut c, "m.orders", "billing", 1, Duration::ZERO).await; // creates the named group
    for i in 0..5u8 {
        send(&mut c, "m.orders", &[i]).await;
    }
    for _ in 0..5 {
        assert!(matches!(next_event(&mut stream).await, Event::Message(_)));
    }
    let got = recv(&mut c, "m.orders", "billing", 100, Duration::ZERO).await;
    assert_eq!(got.messages.len(), 5);
    let refused = c
        .send(SendRequest {
            address: "bad address".into(),
            ..Default::default()
        })
        .await;
    assert!(refused.is_err());

    let after = server.scrape().await;
    assert_eq!(
        delta(&before, &after, "switchboard_messages_sent_total"),
        5.0
    );
    // 5 to the subscriber + 5 to the billing group.
    assert_eq!(
        delta(&before, &after, "switchboard_messages_delivered_total"),
        10.0
    );
    assert_eq!(
        delta(&before, &after, "switchboard_messages_dropped_total"),
        0.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            r#"switchboard_rpcs_total{method="Send",code="OK"}"#
        ),
        5.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            r#"switchboard_rpcs_total{method="Send",code="INVALID_ARGUMENT"}"#
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            r#"switchboard_rpcs_total{method="Recv",code="OK"}"#
        ),
        2.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            r#"switchboard_rpcs_total{method="Subscribe",code="OK"}"#
        ),
        1.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            r#"switchboard_rpc_duration_seconds_count{method="Send"}"#
        ),
        6.0
    );
    assert_eq!(get(&after, "switchboard_addresses"), 1.0);
    assert_eq!(get(&after, "switchboard_subscribers"), 1.0);
    assert_eq!(get(&after, "switchboard_groups"), 2.0, "default + billing");
    // The default group has not read the 5 messages: they are still retained.
    assert_eq!(get(&after, "switchboard_retained_messages"), 5.0);
    assert_eq!(
        get(&after, "switchboard_retained_bytes"),
        5.0 * (1.0 + 128.0)
    );
    // No per-address label anywhere.
    assert!(after.keys().all(|k| !k.contains("m.orders")));

    drop(stream);
    drop(sub_client);
    common::eventually("subscriber gauge back to 0", || {
        server.broker.subscriber_count("m.orders") == 0
    })
    .await;
    assert_eq!(get(&server.scrape().await, "switchboard_subscribers"), 0.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_and_evicted_counters_are_exact() {
    let limits = Limits {
        retention_messages: 10,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut c = server.client().await;
    for i in 0..25u8 {
        send(&mut c, "m.small", &[i]).await;
    }
    let r = recv(&mut c, "m.small", "", 100, Duration::ZERO).await;
    assert_eq!(r.dropped, 15);
    let m = server.scrape().await;
    assert_eq!(get(&m, "switchboard_messages_evicted_total"), 15.0);
    assert_eq!(get(&m, "switchboard_messages_dropped_total"), 15.0);
    assert_eq!(get(&m, "switchboard_messages_delivered_total"), 10.0);
    // Retention is history: the 10 read messages are still retained.
    assert_eq!(get(&m, "switchboard_retained_messages"), 10.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_counted_with_their_final_status() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    common::send(&mut c, "m.closed", b"x").await;
    // Ends NOT_FOUND when an operator deletes the address.
    let mut deleted = common::subscribe(&mut c, "m.closed", "").await;
    // Ends CANCELLED: the client goes away.
    let mut other = server.client().await;
    let cancelled = common::subscribe(&mut other, "m.cancel", "").await;
    server
        .admin()
        .await
        .delete_address(switchboard::pb::DeleteAddressRequest {
            address: "m.closed".into(),
        })
        .await
        .unwrap();
    let end = common::step("deleted stream ends", deleted.message())
        .await
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::NotFound);
    drop(cancelled);
    drop(other);
    // A SendStream that completes: OK.
    let mut acks = c
        .send_stream(tokio_stream::iter(vec![SendRequest {
            address: "m.closed".into(),
            ..Default::default()
        }]))
        .await
        .unwrap()
        .into_inner();
    while common::step("ack", acks.message()).await.unwrap().is_some() {}
    let key = |method: &str, code: &str| {
        format!(r#"switchboard_streams_closed_total{{method="{method}",code="{code}"}}"#)
    };
    let broker = server.broker.clone();
    common::eventually("cancelled stream dropped", || {
        broker.subscriber_count("m.cancel") == 0
    })
    .await;
    let mut m = server.scrape().await;
    // The SendStream's end is counted when its response stream is dropped after the trailers.
    for _ in 0..200 {
        if get(&m, &key("SendStream", "OK")) == 1.0
            && get(&m, &key("Subscribe", "CANCELLED")) == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        m = server.scrape().await;
    }
    assert_eq!(get(&m, &key("Subscribe", "NOT_FOUND")), 1.0);
    assert_eq!(get(&m, &key("Subscribe", "CANCELLED")), 1.0);
    assert_eq!(get(&m, &key("SendStream", "OK")), 1.0);
    server.stop().await;
}
