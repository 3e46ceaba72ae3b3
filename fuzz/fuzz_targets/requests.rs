//! Fuzzes the request validation path: arbitrary bytes decoded as Send, Recv and Subscribe
//! requests, validated, and (when valid) applied to an in-memory broker. Must never panic, and
//! a rejected Send must store nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use switchboard::{
    config::Limits,
    pb::{RecvRequest, SendRequest, SubscribeRequest},
    validate::{self, Address, Group},
    Broker,
};

fuzz_target!(|data: &[u8]| {
    let broker = Broker::new(Limits {
        max_message_bytes: 4096,
        retention_messages: 16,
        retention_bytes: 64 * 1024,
        max_retained_bytes: 128 * 1024,
        ..Limits::default()
    });
    if let Ok(r) = SendRequest::decode(data) {
        let before = broker.total_retained_bytes();
        let result = Address::parse(r.address).and_then(|a| broker.send(&a, r.payload, r.headers));
        if result.is_err() {
            assert_eq!(
                broker.total_retained_bytes(),
                before,
                "a rejected Send stored something"
            );
            assert_eq!(broker.address_count(), 0);
        }
    }
    if let Ok(r) = RecvRequest::decode(data) {
        let _ = Address::parse(r.address);
        let _ = Group::parse(r.group);
        let _ = validate::max_messages(r.max_messages);
        let _ = validate::wait(r.wait.as_ref());
    }
    if let Ok(r) = SubscribeRequest::decode(data) {
        let _ = Address::parse(r.address).and_then(|a| Ok((a, Group::parse(r.group)?)));
    }
});
