//! The broker-wide retention bound keeps a flooded broker's memory bounded; the oldest messages
//! go first and every group behind is told exactly how many it lost; other clients are served
//! meanwhile. Runs the real binary so its RSS can be read.

mod common;

use std::time::Instant;

use common::{sigterm, step, BrokerProcess};
use switchboard::pb::{broker_client::BrokerClient, RecvRequest, SendRequest};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const MIB: u64 = 1024 * 1024;
const BOUND: u64 = 64 * MIB;
/// The documented allowance above the bound (README, "Limits and guarantees").
const OVERHEAD: u64 = 64 * MIB;

fn vm(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_of_large_messages_stays_under_the_bound() {
    // 400 MiB through a 64 MiB bound in CI; the longer version floods 10,000 addresses:
    // SWITCHBOARD_FLOOD_ADDRESSES=10000 cargo test --release --test memory -- --nocapture
    let addresses: usize = std::env::var("SWITCHBOARD_FLOOD_ADDRESSES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let bound = BOUND.to_string();
    let per_address = (8 * MIB).to_string();
    let BrokerProcess {
        child: mut broker,
        addr,
        mut logs,
    } = BrokerProcess::start(&[
        "--max-retained-bytes",
        &bound,
        "--retention-bytes",
        &per_address,
        // The long version takes longer than the default idle time: keep the groups.
        "--idle-address-ms",
        "600000",
    ])
    .await;
    let pid = broker.id().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let url = format!("http://{addr}");
    let mut c = BrokerClient::connect(url.clone()).await.unwrap();
    let name = |i: usize| format!("mem.{i:05}");
    // A named group on every address, created before the flood.
    for i in 0..addresses {
        c.recv(RecvRequest {
            address: name(i),
            group: "audit".into(),
            max_messages: 1,
            wait: None,
            max_bytes: 0,
        })
        .await
        .unwrap();
    }
    let payload = bytes::Bytes::from(vec![0x5a; usize::try_from(MIB).unwrap()]);
    let flood = {
        let c = c.clone();
        tokio::spawn(async move {
            let requests = tokio_stream::iter((0..addresses).map(move |i| SendRequest {
                address: name(i),
                payload: payload.clone(),
                headers: Default::default(),
                message_id: String::new(),
            }));
            let mut c = c;
            let mut responses = c.send_stream(requests).await.unwrap().into_inner();
            let mut acked = 0;
            while let Some(r) = responses.message().await.unwrap() {
                assert!(r.error.is_none(), "{:?}", r.error);
                acked += 1;
            }
            acked
        })
    };
    // Other clients are answered while the flood goes on.
    let mut health = HealthClient::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let mut other = BrokerClient::connect(url).await.unwrap();
    let mut probes = 0;
    while !flood.is_finished() && probes < 50 {
        let t = Instant::now();
        let h = step(
            "health during flood",
            health.check(HealthCheckRequest {
                service: String::new(),
            }),
        )
        .await
        .unwrap();
        assert_eq!(h.into_inner().status, 1, "SERVING");
        step(
            "send during flood",
            other.send(SendRequest {
                address: "mem.other".into(),
                payload: b"small".to_vec().into(),
                headers: Default::default(),
                message_id: String::new(),
            }),
        )
        .await
        .unwrap();
        probes += 1;
        eprintln!(
            "probe {probes}: health + send answered in {:?}",
            t.elapsed()
        );
    }
    assert_eq!(step("flood", flood).await.unwrap(), addresses);

    let peak = vm(pid, "VmHWM:");
    eprintln!(
        "peak RSS {} MiB for a {} MiB bound",
        peak / MIB,
        BOUND / MIB
    );
    assert!(
        peak < BOUND + OVERHEAD,
        "peak RSS {peak} over bound + overhead"
    );

    // Every group is told exactly what it lost: one message per address, received or dropped.
    let mut dropped_total = 0;
    let mut received_total = 0;
    for i in 0..addresses {
        let r = c
            .recv(RecvRequest {
                address: name(i),
                group: "audit".into(),
                max_messages: 10,
                wait: None,
                max_bytes: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.dropped + r.messages.len() as u64, 1, "address {i}");
        dropped_total += r.dropped;
        received_total += r.messages.len();
        if i > 0 && r.dropped == 1 {
            // Oldest first: once an address still has its message, no later one lost it.
            assert!(
                dropped_total == i as u64 + 1,
                "eviction out of order at {i}"
            );
        }
    }
    assert!(dropped_total > 0, "the bound evicted");
    assert!(
        received_total as u64 * MIB <= BOUND,
        "retained within the bound"
    );
    sigterm(&broker);
    assert!(step("exit", broker.wait()).await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_1_gib_backlog_stays_within_the_retention_bound() {
    use futures_util::StreamExt as _;
    use switchboard::pb::{subscribe_response::Event, SubscribeRequest};
    // 1,024 messages of 1 MiB retained (1 GiB of history), then one subscriber replays them all
    // from sequence 1. The replay reads the window in bounded batches paced by its stream, so
    // the broker neither copies nor buffers the backlog: RSS stays within the bound + 64 MiB.
    const MESSAGES: u64 = 1024;
    let bound = MESSAGES * (MIB + 128) + MIB;
    let bound_arg = bound.to_string();
    let max_message = MIB.to_string();
    let BrokerProcess {
        child: mut broker,
        addr,
        mut logs,
    } = BrokerProcess::start(&[
        "--max-message-bytes",
        &max_message,
        "--retention-bytes",
        &bound_arg,
        "--max-retained-bytes",
        &bound_arg,
    ])
    .await;
    let pid = broker.id().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let url = format!("http://{addr}");
    let mut c = BrokerClient::connect(url.clone())
        .await
        .unwrap()
        .max_decoding_message_size(2 * usize::try_from(MIB).unwrap());
    let payload = |i: u64| {
        let mut p = vec![0u8; usize::try_from(MIB).unwrap()];
        p[..8].copy_from_slice(&i.to_be_bytes());
        bytes::Bytes::from(p)
    };
    let requests = tokio_stream::iter((1..=MESSAGES).map(move |i| SendRequest {
        address: "mem.backlog".into(),
        payload: payload(i),
        headers: Default::default(),
        message_id: String::new(),
    }));
    let mut acks = c.send_stream(requests).await.unwrap().into_inner();
    let mut acked = 0;
    while let Some(r) = step("ack", acks.message()).await.unwrap() {
        assert!(r.error.is_none(), "{:?}", r.error);
        acked += 1;
    }
    assert_eq!(acked, MESSAGES);
    let after_send = vm(pid, "VmRSS:");
    let mut stream = c
        .subscribe(SubscribeRequest {
            address: "mem.backlog".into(),
            start_sequence: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut next = 1;
    let mut peak_during = 0;
    while next <= MESSAGES {
        let event = step("replay", stream.next())
            .await
            .expect("stream open")
            .expect("stream ok")
            .event;
        let Some(Event::Message(m)) = event else {
            panic!("expected message {next}, got {event:?}");
        };
        assert_eq!(m.sequence, next);
        assert_eq!(m.payload[..8], next.to_be_bytes());
        if next % 64 == 0 {
            peak_during = peak_during.max(vm(pid, "VmRSS:"));
        }
        next += 1;
    }
    let peak = vm(pid, "VmHWM:");
    eprintln!(
        "1 GiB replay: RSS after send {} MiB, max during replay {} MiB, peak {} MiB, bound {} MiB",
        after_send / MIB,
        peak_during / MIB,
        peak / MIB,
        bound / MIB
    );
    assert!(
        peak < bound + OVERHEAD,
        "peak RSS {} MiB over the bound + 64 MiB",
        peak / MIB
    );
    sigterm(&broker);
    assert!(step("exit", broker.wait()).await.unwrap().success());
}

/// Sends a pre-encoded request body as it is (a test codec: the request type is raw bytes).
#[derive(Default)]
struct RawRequest;

struct RawEncoder;

impl tonic::codec::Encoder for RawEncoder {
    type Item = bytes::Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: bytes::Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut as _;
        dst.put(item);
        Ok(())
    }
}

impl tonic::codec::Codec for RawRequest {
    type Encode = bytes::Bytes;
    type Decode = switchboard::pb::SendBatchResponse;
    type Encoder = RawEncoder;
    type Decoder = tonic_prost::ProstDecoder<switchboard::pb::SendBatchResponse>;

    fn encoder(&mut self) -> Self::Encoder {
        RawEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_two_million_empty_entries_is_refused_before_it_is_decoded() {
    // 2,000,000 empty `messages` entries are 4 MB on the wire (2 bytes each, under the decode
    // limit) but ~200 MiB once decoded. The broker must refuse them from a scan of the encoded
    // request (more than 1,000 entries) without decoding: two such calls at once leave the
    // peak RSS within 64 MiB of where it was, and other clients are served.
    let BrokerProcess {
        child: mut broker,
        addr,
        mut logs,
    } = BrokerProcess::start(&[]).await;
    let pid = broker.id().unwrap();
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let url = format!("http://{addr}");
    let mut c = BrokerClient::connect(url.clone()).await.unwrap();
    c.send(SendRequest {
        address: "mem.batch".into(),
        payload: b"warm".to_vec().into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = vm(pid, "VmHWM:");
    let mut body = Vec::with_capacity(4_000_010);
    body.extend_from_slice(b"\x0a\x09mem.batch"); // field 1, address
    for _ in 0..2_000_000 {
        body.extend_from_slice(b"\x12\x00"); // field 2, an empty BatchMessage
    }
    let body = bytes::Bytes::from(body);
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let calls = (0..2).map(|_| {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        let body = body.clone();
        async move {
            grpc.ready().await.unwrap();
            grpc.unary(
                tonic::Request::new(body),
                http::uri::PathAndQuery::from_static("/switchboard.v1.Broker/SendBatch"),
                RawRequest,
            )
            .await
        }
    });
    for result in step(
        "two oversized batches",
        futures_util::future::join_all(calls),
    )
    .await
    {
        let e = result.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("messages:") && e.message().contains("1000"),
            "{}",
            e.message()
        );
    }
    let peak = vm(pid, "VmHWM:");
    eprintln!(
        "peak RSS {} MiB before, {} MiB after two batches of 2,000,000 empty entries",
        before / MIB,
        peak / MIB
    );
    assert!(
        peak < before + OVERHEAD,
        "peak RSS grew by {} MiB",
        (peak - before) / MIB
    );
    let sent = c
        .send(SendRequest {
            address: "mem.batch".into(),
            payload: b"after".to_vec().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.sequence, 2, "the broker serves others afterwards");
    sigterm(&broker);
    assert!(step("exit", broker.wait()).await.unwrap().success());
}
