//! Property tests of every validation rule, through the gRPC service (no sockets): an input is
//! accepted exactly when the documented rules hold; accepted inputs are stored, rejected ones
//! change nothing.

use std::collections::HashMap;

use proptest::prelude::*;
use switchboard::{
    config::Limits,
    grpc::{connection::StreamLimiter, service::BrokerService},
    pb::{broker_server::Broker as _, RecvRequest, SendRequest},
    shutdown::Shutdown,
    Broker,
};
use tonic::Request;

const MAX_PAYLOAD: usize = 64;

fn limits() -> Limits {
    Limits {
        max_message_bytes: MAX_PAYLOAD,
        ..Limits::default()
    }
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[a-z0-9._-]{1,20}",
        1 => "[a-z .*>\t\u{7}é]{0,12}",
        1 => "[a-z]{250,260}",
    ]
}

fn headers() -> impl Strategy<Value = HashMap<String, String>> {
    prop_oneof![
        4 => proptest::collection::hash_map("[a-z]{0,3}", "[a-z]{0,8}", 0..4),
        1 => proptest::collection::hash_map("[a-z]{1,8}", "[a-z]{0,600}", 0..70),
    ]
}

fn address_ok(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 255
        && !a
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn send_is_accepted_exactly_when_the_rules_hold(
        address in address(),
        payload_len in 0..MAX_PAYLOAD + 8,
        headers in headers(),
    ) {
        let broker = Broker::new(limits());
        let shutdown = Shutdown::new();
        let svc = BrokerService::new(broker.clone(), shutdown.token(), StreamLimiter::new(10));
        let header_bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let expected = address_ok(&address)
            && payload_len <= MAX_PAYLOAD
            && headers.len() <= 64
            && !headers.keys().any(String::is_empty)
            && header_bytes <= 16 * 1024;
        let request = SendRequest {
            address: address.clone(),
            payload: vec![7u8; payload_len].into(),
            headers,
            ..Default::default()
        };
        let r = rt().block_on(svc.send(Request::new(request)));
        prop_assert_eq!(r.is_ok(), expected, "{:?}", r.as_ref().err());
        match r {
            Ok(resp) => {
                prop_assert_eq!(resp.into_inner().sequence, 1);
                prop_assert_eq!(broker.retained_messages(&address), 1);
            }
            Err(status) => {
                prop_assert!(matches!(
                    status.code(),
                    tonic::Code::InvalidArgument | tonic::Code::ResourceExhausted
                ));
                prop_assert_eq!(broker.address_count(), 0, "nothing created");
                prop_assert_eq!(broker.total_retained_bytes(), 0, "nothing stored");
            }
        }
    }

    #[test]
    fn recv_is_accepted_exactly_when_the_rules_hold(
        // Named groups here are all invalid: a valid new one would start empty and wait.
        group in prop_oneof![Just(String::new()), "[a-z]{0,2} [a-z]{0,2}", "[a-z]{256}"],
        max_messages in 0u32..1100,
        seconds in -2i64..70,
        nanos in prop_oneof![Just(0i32), -5i32..5, 999_999_990i32..1_000_000_010],
    ) {
        let broker = Broker::new(limits());
        let shutdown = Shutdown::new();
        let svc = BrokerService::new(broker.clone(), shutdown.token(), StreamLimiter::new(10));
        let rt = rt();
        rt.block_on(svc.send(Request::new(SendRequest {
            address: "p.recv".into(),
            payload: b"waiting".to_vec().into(),
            headers: HashMap::new(),
            ..Default::default()
        })))
        .unwrap();
        let wait_ok = seconds >= 0
            && (0..1_000_000_000).contains(&nanos)
            && (seconds < 60 || (seconds == 60 && nanos == 0));
        let group_ok = group.len() <= 255 && !group.chars().any(char::is_whitespace);
        let expected = group_ok && max_messages <= 1000 && wait_ok;
        let r = rt.block_on(svc.recv(Request::new(RecvRequest {
            address: "p.recv".into(),
            group: group.clone(),
            max_messages,
            wait: Some(prost_types::Duration { seconds, nanos }),
            max_bytes: 0,
        })));
        prop_assert_eq!(r.is_ok(), expected, "{:?}", r.as_ref().err());
        if r.is_err() {
            prop_assert_eq!(broker.retained_messages("p.recv"), 1, "nothing taken");
        } else if group.is_empty() {
            prop_assert_eq!(r.unwrap().into_inner().messages.len(), 1);
        }
    }
}
