//! Zero-copy fan-out on the wire: the `Subscribe` route served without tonic's per-stream
//! encoder.
//!
//! tonic encodes every streamed message into each stream's own buffer, so a message fanned out to
//! N subscribers is encoded N times and its payload copied N times. Here each stored message is
//! encoded once, lazily, into a gRPC frame ([`WireFrame`](crate::message::WireFrame)) cached on the message; every
//! subscriber's HTTP/2 stream is handed clones of the same `Bytes`. Payloads above
//! [`INLINE_PAYLOAD_BYTES`](crate::message::INLINE_PAYLOAD_BYTES) are not even copied into the frame: they travel as their own chunk,
//! the very `Bytes` the publisher sent, and h2 writes them without copying.
//!
//! The encoding is ordinary protobuf with the `payload` field last (decoders accept fields in
//! any order), so any gRPC client reads it as a `SubscribeResponse`.
//!
//! [`SubscribeRoute`] wraps the generated `BrokerServer`: it serves
//! `/switchboard.v1.Broker/Subscribe` itself and passes every other call through.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{future::BoxFuture, Stream};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use prost::Message as _;
use tonic::{body::Body, server::NamedService, Status};

use super::{
    auth::{authorize, Action, Authority, Principal},
    connection::{StreamLimiter, StreamPermit},
    service::rejected,
};
use crate::{
    broker::{Broker, Event, PatternSubscription, Subscription},
    error::BrokerError,
    message::encode_message,
    metrics::{Method, Metrics},
    pb,
    shutdown::ShutdownToken,
    validate::{self, Address, Group, Pattern},
};

/// Small frames ready at once are coalesced into one HTTP/2 DATA frame up to this size.
const COALESCE_BYTES: usize = 32 * 1024;
/// The coalescing buffer's first size: ~25 small messages before it grows.
const COALESCE_START_BYTES: usize = 4 * 1024;
/// Largest Subscribe request body accepted (an address and a group fit many times over).
const MAX_REQUEST_BYTES: usize = 64 * 1024;
const SUBSCRIBE_PATH: &str = "/switchboard.v1.Broker/Subscribe";

fn encode_response(r: &pb::SubscribeResponse) -> Bytes {
    let len = r.encoded_len();
    let mut buf = BytesMut::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    r.encode_raw(&mut buf);
    buf.freeze()
}

/// The response body of one Subscribe call: frames of its subscription's events, then the
/// trailers (`grpc-status` 0, or the status that ended it). Dropping it (the client went away)
/// drops the subscription, which unregisters the subscriber.
struct SubscribeBody {
    _permit: Option<StreamPermit>,
    metrics: Arc<Metrics>,
    /// Whether the stream's end was counted (else the client went away: `CANCELLED`).
    closed: bool,
    events: Pin<Box<dyn Stream<Item = Result<Event, BrokerError>> + Send>>,
    queued: VecDeque<Bytes>,
    trailers: Option<Status>,
    done: bool,
}

/// What a Subscribe stream reads from: one address, or every address matching a pattern.
enum Source {
    Address(Subscription),
    Pattern(PatternSubscription),
}

impl Source {
    async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        match self {
            Self::Address(s) => s.next().await,
            Self::Pattern(s) => s.next().await,
        }
    }
}

impl SubscribeBody {
    fn new(source: Source, permit: Option<StreamPermit>, metrics: Arc<Metrics>) -> Self {
        let events =
            futures_util::stream::unfold(
                source,
                |mut s| async move { s.next().await.map(|e| (e, s)) },
            );
        Self {
            _permit: permit,
            metrics,
            closed: false,
            events: Box::pin(events),
            queued: VecDeque::new(),
            trailers: None,
            done: false,
        }
    }

    fn trailers_frame(status: &Status) -> Frame<Bytes> {
        let mut map = http::HeaderMap::new();
        if status.add_header(&mut map).is_err() {
            map.insert("grpc-status", http::HeaderValue::from_static("13"));
        }
        Frame::trailers(map)
    }
}

impl http_body::Body for SubscribeBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if let Some(b) = this.queued.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if let Some(status) = this.trailers.take() {
            this.done = true;
            this.closed = true;
            this.metrics
                .observe_stream_closed(Method::Subscribe, status.code());
            return Poll::Ready(Some(Ok(Self::trailers_frame(&status))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        // One small frame ready alone goes out as is (no copy); several are copied into one
        // buffer, sized for many at once so that it seldom grows.
        let mut first: Option<Bytes> = None;
        let mut small = BytesMut::new();
        loop {
            let chunk = match this.events.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(Event::Message(m, frame)))) => {
                    let f = frame.unwrap_or_else(|| encode_message(&m, 0));
                    if let Some(payload) = &f.payload {
                        this.queued.push_back(f.head.clone());
                        this.queued.push_back(payload.clone());
                        break;
                    }
                    f.head.clone()
                }
                Poll::Ready(Some(Ok(Event::Dropped(count)))) => {
                    encode_response(&pb::SubscribeResponse {
                        event: Some(pb::subscribe_response::Event::Dropped(pb::Dropped {
                            count,
                        })),
                    })
                }
                Poll::Ready(Some(Err(e))) => {
                    this.trailers = Some(e.into());
                    break;
                }
                Poll::Ready(None) => {
                    this.trailers = Some(Status::ok(""));
                    break;
                }
                Poll::Pending if first.is_none() && small.is_empty() => return Poll::Pending,
                Poll::Pending => break,
            };
            if small.is_empty() {
                let Some(earlier) = first.take() else {
                    first = Some(chunk);
                    continue;
                };
                small.reserve(COALESCE_START_BYTES.max(earlier.len() + chunk.len()));
                small.extend_from_slice(&earlier);
            }
            small.extend_from_slice(&chunk);
            if small.len() >= COALESCE_BYTES {
                break;
            }
        }
        if let Some(alone) = first {
            return Poll::Ready(Some(Ok(Frame::data(alone))));
        }
        if !small.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(small.freeze()))));
        }
        // Nothing small was gathered: what ended the loop is queued.
        self.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.queued.is_empty() && self.trailers.is_none()
    }
}

impl Drop for SubscribeBody {
    fn drop(&mut self) {
        if !self.closed {
            self.metrics
                .observe_stream_closed(Method::Subscribe, tonic::Code::Cancelled);
        }
    }
}

/// Wraps the generated `BrokerServer` (`inner`): serves Subscribe with frames encoded once per
/// message (see the module docs) and
/// passes every other method through.
#[derive(Debug, Clone)]
pub struct SubscribeRoute<S> {
    inner: S,
    /// Largest request message (see `frame_limit`); 0: no check.
    decode_limit: usize,
    broker: Broker,
    shutdown: ShutdownToken,
    streams: StreamLimiter,
    authority: Authority,
}

impl<S> SubscribeRoute<S> {
    /// Serves Subscribe from `broker` (streams end at `shutdown`), the rest from `inner`.
    pub fn new(inner: S, broker: Broker, shutdown: ShutdownToken, streams: StreamLimiter) -> Self {
        Self {
            inner,
            decode_limit: 0,
            broker,
            shutdown,
            streams,
            authority: Authority::default(),
        }
    }

    /// Refuses request messages declared larger than `limit` bytes from their length prefix,
    /// with `RESOURCE_EXHAUSTED` (see `frame_limit`); the inner service's decode limit should
    /// be the same.
    #[must_use]
    pub fn with_decode_limit(mut self, limit: usize) -> Self {
        self.decode_limit = limit;
        self
    }

    /// Checks each Subscribe's permission to receive from its address or pattern.
    #[must_use]
    pub fn with_authority(mut self, authority: Authority) -> Self {
        self.authority = authority;
        self
    }
}

impl<S: NamedService> NamedService for SubscribeRoute<S> {
    const NAME: &'static str = S::NAME;
}

async fn subscribe(
    broker: Broker,
    shutdown: ShutdownToken,
    streams: StreamLimiter,
    authority: Authority,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, Status> {
    let peer = super::server::peer_addr(request.extensions());
    let caller = request.extensions().get::<Arc<Principal>>().cloned();
    let allow = |target: &str| {
        authorize(
            &authority,
            caller.as_ref(),
            Action::Receive,
            target,
            broker.metrics(),
        )
    };
    let body = Limited::new(request.into_body(), MAX_REQUEST_BYTES)
        .collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("request body: {e}")))?
        .to_bytes();
    let (flag, rest) = match body.split_first() {
        Some((flag, rest)) if rest.len() >= 4 => (*flag, rest),
        _ => {
            return Err(Status::invalid_argument(
                "request: missing gRPC message frame",
            ))
        }
    };
    if flag != 0 {
        return Err(Status::unimplemented(
            "request: compressed Subscribe requests are not supported",
        ));
    }
    let (len, msg) = rest.split_at(4);
    let len =
        usize::try_from(u32::from_be_bytes([len[0], len[1], len[2], len[3]])).unwrap_or(usize::MAX);
    if msg.len() != len {
        return Err(Status::invalid_argument(
            "request: gRPC frame length does not match the body",
        ));
    }
    let r = pb::SubscribeRequest::decode(msg)
        .map_err(|e| Status::invalid_argument(format!("request: not a SubscribeRequest: {e}")))?;
    let reject = |e: BrokerError| rejected(Method::Subscribe, &r.address, e);
    if Pattern::is_pattern(&r.address) {
        let pattern = Pattern::parse(r.address.as_str()).map_err(reject)?;
        allow(pattern.as_str()).map_err(reject)?;
        let refuse = |field: &'static str| {
            reject(BrokerError::invalid(
                field,
                "not with an address pattern: pattern streams are fan-out and start now",
            ))
        };
        if !r.group.is_empty() {
            return Err(refuse("group"));
        }
        if r.start_sequence != 0 {
            return Err(refuse("start_sequence"));
        }
        if r.start_time.is_some() {
            return Err(refuse("start_time"));
        }
        let permit = streams.acquire(peer).map_err(reject)?;
        let subscription = broker
            .subscribe_pattern(pattern, shutdown)
            .map_err(reject)?;
        let metrics = Arc::clone(broker.metrics());
        return Ok(grpc_response(SubscribeBody::new(
            Source::Pattern(subscription),
            permit,
            metrics,
        )));
    }
    let address = Address::parse(r.address.as_str()).map_err(reject)?;
    allow(address.as_str()).map_err(reject)?;
    let group = Group::parse(r.group.as_str()).map_err(reject)?;
    let start = validate::start(r.start_sequence, r.start_time.as_ref()).map_err(reject)?;
    let permit = streams.acquire(peer).map_err(reject)?;
    // Registered before the response (and so its headers) exists.
    let subscription = broker
        .subscribe(&address, &group, start, shutdown)
        .await
        .map_err(reject)?;
    let metrics = Arc::clone(broker.metrics());
    Ok(grpc_response(SubscribeBody::new(
        Source::Address(subscription),
        permit,
        metrics,
    )))
}

fn grpc_response(body: SubscribeBody) -> http::Response<Body> {
    let mut response = http::Response::new(Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}

impl<S> tower_service::Service<http::Request<Body>> for SubscribeRoute<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if request.uri().path() == SUBSCRIBE_PATH {
            let (broker, shutdown) = (self.broker.clone(), self.shutdown.clone());
            let streams = self.streams.clone();
            let authority = self.authority.clone();
            Box::pin(async move {
                let start = std::time::Instant::now();
                let metrics = std::sync::Arc::clone(broker.metrics());
                let r = subscribe(broker, shutdown, streams, authority, request).await;
                let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
                metrics.observe_rpc(Method::Subscribe, code, start.elapsed());
                Ok(r.unwrap_or_else(Status::into_http))
            })
        } else {
            let request = if self.decode_limit > 0 {
                let (limit, max) = (self.decode_limit, self.broker.limits().max_message_bytes);
                request.map(|b| Body::new(super::frame_limit::FrameLimit::new(b, limit, max)))
            } else {
                request
            };
            let fut = self.inner.call(request);
            Box::pin(fut)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::SystemTime};

    use super::*;
    use crate::{
        grpc::service::to_pb,
        message::{Message, WireFrame, INLINE_PAYLOAD_BYTES},
    };

    fn message(payload_len: usize) -> Message {
        let mut headers = crate::validate::Headers::new();
        headers.insert("k".into(), "v".into());
        Message {
            address: Arc::from("wire.test"),
            sequence: 42,
            payload: Bytes::from(vec![7u8; payload_len]),
            headers,
            sent_at: SystemTime::now(),
            size: 0,
        }
    }

    fn decode(f: &WireFrame) -> pb::SubscribeResponse {
        let mut all = f.head.to_vec();
        if let Some(p) = &f.payload {
            all.extend_from_slice(p);
        }
        assert_eq!(all[0], 0);
        let len = u32::from_be_bytes(all[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, all.len() - 5, "length prefix covers the whole message");
        pb::SubscribeResponse::decode(&all[5..]).unwrap()
    }

    #[test]
    fn frames_decode_as_the_same_subscribe_response() {
        for len in [
            0,
            1,
            128,
            INLINE_PAYLOAD_BYTES,
            INLINE_PAYLOAD_BYTES + 1,
            1 << 20,
        ] {
            for attempt in [0, 1, 300] {
                let m = message(len);
                let f = encode_message(&m, attempt);
                assert_eq!(f.payload.is_some(), len > INLINE_PAYLOAD_BYTES, "len {len}");
                let expected = pb::SubscribeResponse {
                    event: Some(pb::subscribe_response::Event::Message(to_pb(&m, attempt))),
                };
                assert_eq!(decode(&f), expected, "len {len} attempt {attempt}");
            }
        }
    }

    /// Every field of the wire `Message` set, written as an exhaustive literal: a field added
    /// to the proto fails to compile here until it is set, and then fails the comparison until
    /// the hand-written encoder writes it too.
    #[test]
    fn every_message_field_is_encoded() {
        let m = message(5000);
        let expected = pb::Message {
            address: "wire.test".into(),
            sequence: 42,
            payload: m.payload.clone(),
            headers: m.headers.clone(),
            sent_at: Some(prost_types::Timestamp::from(m.sent_at)),
            delivery_attempt: 7,
        };
        let f = encode_message(&m, 7);
        let got = decode(&f);
        assert_eq!(
            got,
            pb::SubscribeResponse {
                event: Some(pb::subscribe_response::Event::Message(expected.clone())),
            }
        );
        // And the same bytes length as prost's own encoding of it (fields in another order).
        let prost_len = pb::SubscribeResponse {
            event: Some(pb::subscribe_response::Event::Message(expected)),
        }
        .encoded_len();
        let ours = f.head.len() + f.payload.as_ref().map_or(0, Bytes::len) - 5;
        assert_eq!(ours, prost_len);
    }

    #[test]
    fn large_payloads_are_shared_not_copied() {
        let m = message(1 << 20);
        let f = encode_message(&m, 0);
        let p = f.payload.as_ref().unwrap();
        assert_eq!(
            p.as_ptr(),
            m.payload.as_ptr(),
            "the frame holds the publisher's bytes"
        );
        // Clones (one per subscriber) share the encoded head too.
        assert_eq!(f.clone().head.as_ptr(), f.head.as_ptr());
    }

    use futures_util::StreamExt as _;
    use http_body::Body as _;

    /// A body over `events` (then pending, as a live subscription waits for more).
    fn body(events: Vec<Event>, then_end: bool) -> SubscribeBody {
        let items = futures_util::stream::iter(events.into_iter().map(Ok));
        let events: Pin<Box<dyn Stream<Item = Result<Event, BrokerError>> + Send>> = if then_end {
            Box::pin(items)
        } else {
            Box::pin(items.chain(futures_util::stream::pending()))
        };
        SubscribeBody {
            _permit: None,
            metrics: Arc::new(Metrics::new()),
            closed: false,
            events,
            queued: VecDeque::new(),
            trailers: None,
            done: false,
        }
    }

    fn next_data(b: &mut SubscribeBody) -> Option<Bytes> {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match Pin::new(b).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => f.into_data().ok(),
            _ => None,
        }
    }

    fn event(len: usize) -> (Event, WireFrame) {
        let m = Arc::new(message(len));
        let f = encode_message(&m, 0);
        (Event::Message(m, Some(f.clone())), f)
    }

    #[test]
    fn a_small_frame_ready_alone_goes_out_without_a_copy() {
        let (e, f) = event(128);
        let mut b = body(vec![e], false);
        let data = next_data(&mut b).unwrap();
        assert_eq!(data.as_ptr(), f.head.as_ptr(), "the shared frame itself");
        assert_eq!(data, f.head);
        assert!(next_data(&mut b).is_none(), "then it waits");
    }

    #[test]
    fn small_frames_ready_together_are_coalesced_in_order() {
        let (events, frames): (Vec<_>, Vec<_>) = (0..40).map(|_| event(100)).unzip();
        let large = event(INLINE_PAYLOAD_BYTES + 1);
        let mut all = events;
        all.push(large.0);
        let mut b = body(all, true);
        let expected: Vec<u8> = frames.iter().flat_map(|f| f.head.to_vec()).collect();
        let data = next_data(&mut b).unwrap();
        assert_eq!(
            data.len(),
            expected.len(),
            "all 40 small frames in one DATA frame"
        );
        assert_eq!(data.as_ref(), expected.as_slice());
        assert_eq!(
            next_data(&mut b).unwrap(),
            large.1.head,
            "then the large one's head"
        );
        assert_eq!(next_data(&mut b).unwrap(), large.1.payload.unwrap());
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match Pin::new(&mut b).poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(f))) => assert!(f.is_trailers(), "then the trailers"),
            _ => panic!("expected trailers"),
        }
    }
}
