//! `switchboard.v1.Admin`: listing with paging, inspecting groups' lag, deleting an address.

mod common;

use std::time::Duration;

use common::{recv, send, step, subscribe, TestServer};
use switchboard::{
    config::Limits,
    pb::{DeleteAddressRequest, GetAddressRequest, ListAddressesRequest},
};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_addresses_filters_by_prefix_and_pages() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for name in ["a.1", "a.2", "a.3", "a.4", "a.5", "b.1"] {
        send(&mut c, name, b"x").await;
    }
    send(&mut c, "a.3", b"yy").await;
    let mut admin = server.admin().await;
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .list_addresses(ListAddressesRequest {
                prefix: "a.".into(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        assert!(page.addresses.len() <= 2);
        seen.extend(page.addresses);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let names: Vec<&str> = seen.iter().map(|a| a.address.as_str()).collect();
    assert_eq!(names, ["a.1", "a.2", "a.3", "a.4", "a.5"]);
    let a3 = &seen[2];
    assert_eq!(
        (a3.retained_messages, a3.first_sequence, a3.last_sequence),
        (2, 1, 2)
    );
    assert_eq!(a3.retained_bytes, (1 + 128) + (2 + 128));
    assert_eq!((a3.subscribers, a3.groups), (0, 1));

    let too_big = admin
        .list_addresses(ListAddressesRequest {
            page_size: 1001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_big.code(), Code::InvalidArgument);
    assert!(too_big.message().contains("page_size"));
    let bad_token = admin
        .list_addresses(ListAddressesRequest {
            page_token: "%%%".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_token.code(), Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_address_reports_each_groups_lag_and_dropped() {
    let limits = Limits {
        retention_messages: 10,
        ..Limits::default()
    };
    let server = TestServer::with_limits(limits).await;
    let mut c = server.client().await;
    recv(&mut c, "g.addr", "fast", 1, Duration::ZERO).await;
    recv(&mut c, "g.addr", "slow", 1, Duration::ZERO).await;
    for i in 0..15u8 {
        send(&mut c, "g.addr", &[i]).await;
    }
    assert_eq!(
        recv(&mut c, "g.addr", "fast", 100, Duration::ZERO)
            .await
            .dropped,
        5
    );
    let mut sub_client = server.client().await;
    let _stream = subscribe(&mut sub_client, "g.addr", "").await;

    let mut admin = server.admin().await;
    let r = admin
        .get_address(GetAddressRequest {
            address: "g.addr".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let info = r.address.unwrap();
    assert_eq!(
        (
            info.retained_messages,
            info.first_sequence,
            info.last_sequence
        ),
        (10, 6, 15)
    );
    assert_eq!((info.subscribers, info.groups), (1, 3));
    let groups: Vec<(String, u64, u64, u64)> = r
        .groups
        .into_iter()
        .map(|g| (g.group, g.lag, g.dropped, g.next_sequence))
        .collect();
    assert_eq!(
        groups,
        vec![
            (String::new(), 10, 5, 6), // default: never read; 5 evicted, 10 waiting
            ("fast".into(), 0, 0, 16), // read everything; its 5 dropped already reported
            ("slow".into(), 10, 5, 6),
        ]
    );
    let missing = admin
        .get_address(GetAddressRequest {
            address: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains("nope"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_address_purges_and_ends_its_subscribers_with_not_found() {
    let server = TestServer::start().await;
    let mut c = server.client().await;
    for i in 0..3u8 {
        send(&mut c, "doomed", &[i]).await;
    }
    let mut sub_client = server.client().await;
    let mut stream = subscribe(&mut sub_client, "doomed", "").await;
    let mut recv_client = server.client().await;
    let waiting = tokio::spawn(async move {
        recv_client
            .recv(switchboard::pb::RecvRequest {
                address: "doomed".into(),
                group: "late".into(),
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
    common::eventually("recv waiting", || broker.waiting_recvs("doomed") == 1).await;

    let mut admin = server.admin().await;
    let r = admin
        .delete_address(DeleteAddressRequest {
            address: "doomed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.purged_messages, 3);
    let status = step("stream ends", stream.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "address deleted");
    let status = step("recv returns", waiting).await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(server.broker.total_retained_bytes(), 0);
    assert!(!server.exists("doomed").await);
    // A later Send creates it afresh.
    assert_eq!(send(&mut c, "doomed", b"again").await, 1);
    let again = admin
        .delete_address(DeleteAddressRequest {
            address: "never".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    server.stop().await;
}
