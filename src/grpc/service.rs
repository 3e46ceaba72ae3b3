//! The gRPC face of the broker: `impl pb::broker_server::Broker`. A thin translation layer:
//! decode, validate, call the [`Broker`], encode. No policy lives here. Subscribe is served by
//! [`SubscribeRoute`](super::wire::SubscribeRoute) in front of this service (zero-copy frames);
//! the generated trait's `subscribe` is never reached and answers `UNIMPLEMENTED`.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures_util::Stream;
use tonic::{metadata::MetadataMap, Request, Response, Status, Streaming};

use std::sync::Arc;

use super::{
    auth::{Action, Authority, Principal},
    connection::{StreamLimiter, StreamPermit},
};
use crate::{broker::read_budget::ReadCharge, engine::Durable};
use crate::{
    broker::Broker,
    engine::{GroupSettings, Settle},
    error::BrokerError,
    message::Message,
    metrics::{code_name, Method},
    pb,
    shutdown::ShutdownToken,
    validate::{self, Address, Group},
};

/// The `switchboard.v1.Broker` service over a [`Broker`].
#[derive(Debug, Clone)]
pub struct BrokerService {
    broker: Broker,
    shutdown: ShutdownToken,
    streams: StreamLimiter,
    authority: Authority,
}

/// The authenticated principal of a call, if authentication is on.
type Caller = Option<Arc<Principal>>;

impl BrokerService {
    async fn recv_inner(
        &self,
        r: pb::RecvRequest,
        deadline: Option<Duration>,
        caller: &Caller,
    ) -> Result<Response<pb::RecvResponse>, Status> {
        let reject = |e: BrokerError| rejected(Method::Recv, &r.address, e);
        let address = Address::parse(r.address.as_str()).map_err(reject)?;
        self.allow(caller, Action::Receive, address.as_str())
            .map_err(reject)?;
        let group = Group::parse(r.group.as_str()).map_err(reject)?;
        let max = validate::max_messages(r.max_messages).map_err(reject)?;
        let max_bytes =
            validate::recv_max_bytes(r.max_bytes, self.broker.limits().grpc_message_bytes());
        let mut wait = validate::wait(r.wait.as_ref()).map_err(reject)?;
        if let Some(d) = deadline {
            // Answer (empty) a little before the client gives up, rather than let it time out.
            let margin = (d / 10).min(Duration::from_millis(100));
            wait = wait.min(d.saturating_sub(margin));
        }
        let mut shutdown = self.shutdown.clone();
        let batch = self
            .broker
            .recv(&address, &group, max, max_bytes, wait, &mut shutdown)
            .await
            .map_err(reject)?;
        Ok(Response::new(pb::RecvResponse {
            messages: batch
                .messages
                .iter()
                .map(|t| to_pb(&t.message, t.attempt))
                .collect(),
            dropped: batch.dropped,
        }))
    }

    /// Serves `broker`; open streams and long-polls end when `shutdown` fires.
    pub fn new(broker: Broker, shutdown: ShutdownToken, streams: StreamLimiter) -> Self {
        Self {
            broker,
            shutdown,
            streams,
            authority: Authority::default(),
        }
    }

    /// Checks every call's permission on its address against `authority` (see `auth`).
    #[must_use]
    pub fn with_authority(mut self, authority: Authority) -> Self {
        self.authority = authority;
        self
    }

    fn caller<T>(request: &Request<T>) -> Caller {
        request.extensions().get::<Arc<Principal>>().cloned()
    }

    /// `action` on `target` for `caller`; passes when authentication is off.
    fn allow(&self, caller: &Caller, action: Action, target: &str) -> Result<(), BrokerError> {
        super::auth::authorize(
            &self.authority,
            caller.as_ref(),
            action,
            target,
            self.broker.metrics(),
        )
    }
}

/// Logs one rejected request (method, address, code) and turns the error into its status.
/// The address is cut to 64 characters: it may be anything the client sent. `method` is a
/// [`Method`], or what the codec knows of it when it refuses a request before decoding.
pub(crate) fn rejected(
    method: impl std::fmt::Debug,
    address: &str,
    e: impl Into<Status>,
) -> Status {
    let status = e.into();
    if !super::admission::REJECTION_LOGS.allow("request rejected") {
        return status;
    }
    let shown: String = address.chars().take(64).collect();
    tracing::info!(
        method = ?method,
        address = %shown.escape_debug(),
        code = code_name(status.code()),
        reason = status.message(),
        "request rejected"
    );
    status
}

/// Converts a stored message to its wire form, with its delivery attempt (0 outside groups
/// with acknowledgements). The payload is shared, not copied.
pub fn to_pb(m: &Message, delivery_attempt: u32) -> pb::Message {
    pb::Message {
        address: m.address.to_string(),
        sequence: m.sequence,
        payload: m.payload.clone(),
        headers: m.headers.clone(),
        sent_at: Some(prost_types::Timestamp::from(m.sent_at)),
        delivery_attempt,
    }
}

/// The client's deadline from the `grpc-timeout` header, if it sent one.
fn client_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

impl BrokerService {
    /// Ack, Nack and ExtendLease: validate, settle, list what was not pending.
    async fn settle(
        &self,
        method: Method,
        address: &str,
        group: &str,
        sequences: &[u64],
        caller: &Caller,
        op: impl FnOnce() -> Result<Settle, BrokerError>,
    ) -> Result<Vec<u64>, Status> {
        let start = Instant::now();
        let reject = |e: BrokerError| rejected(method, address, e);
        let result = async {
            let address = Address::parse(address).map_err(reject)?;
            self.allow(caller, Action::Receive, address.as_str())
                .map_err(reject)?;
            let group = Group::parse(group).map_err(reject)?;
            let op = op().map_err(reject)?;
            self.broker
                .settle(&address, &group, sequences, op)
                .await
                .map_err(reject)
        }
        .await;
        self.observe(method, start, &result);
        result
    }

    /// Checks and stages one Send; the response may go out once the [`Durable`] resolves.
    fn send_one(
        &self,
        method: Method,
        r: pb::SendRequest,
        caller: &Caller,
    ) -> Result<(pb::SendResponse, Durable), Status> {
        if let Err(e) =
            Address::check(&r.address).and_then(|()| self.allow(caller, Action::Send, &r.address))
        {
            return Err(rejected(method, &r.address, e));
        }
        let address = Address::checked(r.address);
        self.broker
            .publish_staged(&address, r.payload, r.headers, &r.message_id)
            .map(|(a, durable)| {
                let response = pb::SendResponse {
                    sequence: a.sequence,
                    error: None,
                    duplicate: a.duplicate,
                };
                (response, durable)
            })
            .map_err(|e| rejected(method, address.as_str(), e))
    }

    fn observe<T>(&self, method: Method, start: Instant, r: &Result<T, Status>) {
        let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.broker
            .metrics()
            .observe_rpc(method, code, start.elapsed());
    }
}

/// The stream behind `SendStream`: one response per request, in order; ends with `UNAVAILABLE`
/// when the server shuts down, or with the transport's status if the request stream fails.
///
/// In the disk engine each response waits for its message's fsync; up to
/// [`SEND_STREAM_IN_FLIGHT`] requests are read ahead meanwhile, so one stream's messages share
/// fsyncs (group commit) instead of paying one each. Their bytes are charged to the broker's
/// read budget (`--max-read-buffer-bytes`) until answered: while it is spent, the stream reads
/// no further (backpressure through HTTP/2 flow control).
pub struct SendResponses {
    service: BrokerService,
    caller: Caller,
    inbound: Streaming<pb::SendRequest>,
    cancelled: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Responses in request order, each waiting for its write to be durable, with the bytes
    /// its request holds (payload, address, message id, header keys and values).
    in_flight: VecDeque<(pb::SendResponse, Durable, usize)>,
    /// The read budget held for the requests in flight (reserved in steps of at least
    /// [`SEND_STREAM_CHARGE_STEP`], so most requests touch no shared state); given back when
    /// nothing is in flight.
    charge: ReadCharge,
    /// Bytes of the requests in flight.
    in_flight_bytes: usize,
    /// Waiting for the read budget for the newest request in flight; no more are read
    /// meanwhile.
    waiting: Option<Pin<Box<dyn Future<Output = ReadCharge> + Send>>>,
    /// The client finished sending; end once `in_flight` is answered.
    inbound_done: bool,
    done: bool,
    _permit: Option<StreamPermit>,
}

/// Most SendStream requests read ahead of their (durable) responses on one stream.
pub const SEND_STREAM_IN_FLIGHT: usize = 1024;

/// The smallest step in which a SendStream reserves read budget for its requests in flight,
/// bytes.
pub const SEND_STREAM_CHARGE_STEP: usize = 256 * 1024;

fn error_response(e: &Status) -> pb::SendResponse {
    pb::SendResponse {
        sequence: 0,
        duplicate: false,
        error: Some(pb::SendError {
            code: e.code() as i32,
            message: e.message().to_string(),
        }),
    }
}

impl std::fmt::Debug for SendResponses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendResponses").finish_non_exhaustive()
    }
}

impl SendResponses {
    fn respond(&self, r: pb::SendRequest) -> (pb::SendResponse, Durable) {
        match self.service.send_one(Method::SendStream, r, &self.caller) {
            Ok(staged) => staged,
            Err(e) => (error_response(&e), Durable::done()),
        }
    }

    /// The oldest in-flight response, once its write is durable.
    fn poll_front(&mut self, cx: &mut Context<'_>) -> Poll<Option<pb::SendResponse>> {
        let Some((_, durable, _)) = self.in_flight.front_mut() else {
            return Poll::Ready(None);
        };
        let r = std::task::ready!(durable.poll_appended(cx));
        let Some((mut response, _, bytes)) = self.in_flight.pop_front() else {
            return Poll::Ready(None);
        };
        self.in_flight_bytes = self.in_flight_bytes.saturating_sub(bytes);
        if self.in_flight.is_empty() && self.waiting.is_none() {
            self.charge = ReadCharge::default();
        } else if self.charge.bytes() > self.in_flight_bytes + SEND_STREAM_CHARGE_STEP {
            // Give back what answered requests held, beyond one step: others (and this
            // stream's own wait for the newest request) may need it.
            self.charge.shrink_to(self.in_flight_bytes);
        }
        Poll::Ready(Some(match r {
            Ok(None) => response,
            // The Redis engine: the sequence came with Redis's reply.
            Ok(Some(remote)) => match remote.first() {
                Some(a) => {
                    response.sequence = a.sequence;
                    response.duplicate = a.duplicate;
                    response
                }
                None => error_response(&rejected(
                    Method::SendStream,
                    "",
                    BrokerError::Storage("redis: no sequence in the reply".into()),
                )),
            },
            Err(e) => error_response(&rejected(Method::SendStream, "", e)),
        }))
    }
}

impl SendResponses {
    fn end(&mut self, code: tonic::Code) {
        self.done = true;
        self.service
            .broker
            .metrics()
            .observe_stream_closed(Method::SendStream, code);
    }
}

impl Drop for SendResponses {
    fn drop(&mut self) {
        if !self.done {
            self.service
                .broker
                .metrics()
                .observe_stream_closed(Method::SendStream, tonic::Code::Cancelled);
        }
    }
}

impl Stream for SendResponses {
    type Item = Result<pb::SendResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if self.service.shutdown.is_cancelled() {
            self.end(tonic::Code::Unavailable);
            return Poll::Ready(Some(Err(BrokerError::ShuttingDown.into())));
        }
        loop {
            if let Poll::Ready(Some(response)) = self.poll_front(cx) {
                return Poll::Ready(Some(Ok(response)));
            }
            if self.inbound_done {
                if self.in_flight.is_empty() {
                    self.end(tonic::Code::Ok);
                    return Poll::Ready(None);
                }
                return Poll::Pending;
            }
            if let Some(waiting) = self.waiting.as_mut() {
                // Backpressure: read no more until the read budget has the newest request's
                // bytes.
                let more = std::task::ready!(waiting.as_mut().poll(cx));
                self.waiting = None;
                self.charge.merge(more);
                continue;
            }
            if self.in_flight.len() >= SEND_STREAM_IN_FLIGHT {
                // Backpressure: read no more until the oldest write is durable.
                return Poll::Pending;
            }
            match Pin::new(&mut self.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(r))) => {
                    // What the request holds, read before it is consumed; cheap, as the
                    // memory engine's path never uses it.
                    let bytes = r.payload.len()
                        + r.address.len()
                        + r.message_id.len()
                        + r.headers
                            .iter()
                            .map(|(k, v)| k.len() + v.len())
                            .sum::<usize>();
                    let (response, durable) = self.respond(r);
                    if durable.is_done() && self.in_flight.is_empty() {
                        // The memory engine's path: answered at once.
                        return Poll::Ready(Some(Ok(response)));
                    }
                    self.in_flight.push_back((response, durable, bytes));
                    self.in_flight_bytes += bytes;
                    let held = self.charge.bytes();
                    if self.in_flight_bytes > held {
                        let want = (self.in_flight_bytes - held).max(SEND_STREAM_CHARGE_STEP);
                        let budget = self.service.broker.read_budget().clone();
                        match budget.try_reserve(want) {
                            Some(more) => self.charge.merge(more),
                            None => {
                                // Exactly what is missing, not a whole step, once waiting.
                                let want = self.in_flight_bytes - held;
                                self.waiting =
                                    Some(Box::pin(async move { budget.reserve(want).await }));
                            }
                        }
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    self.end(status.code());
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(None) => self.inbound_done = true,
                Poll::Pending => {
                    // Waiting for the client: also wake when shutdown begins.
                    if self.in_flight.is_empty() && self.cancelled.as_mut().poll(cx).is_ready() {
                        self.end(tonic::Code::Unavailable);
                        return Poll::Ready(Some(Err(BrokerError::ShuttingDown.into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

#[tonic::async_trait]
impl pb::broker_server::Broker for BrokerService {
    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let start = Instant::now();
        let caller = Self::caller(&request);
        let r = match self.send_one(Method::Send, request.into_inner(), &caller) {
            Ok((mut response, durable)) => match durable.wait_appended().await {
                Ok(None) => Ok(Response::new(response)),
                // The Redis engine: the sequence came with Redis's reply.
                Ok(Some(remote)) => match remote.first() {
                    Some(a) => {
                        response.sequence = a.sequence;
                        response.duplicate = a.duplicate;
                        Ok(Response::new(response))
                    }
                    None => Err(rejected(
                        Method::Send,
                        "",
                        BrokerError::Storage("redis: no sequence in the reply".into()),
                    )),
                },
                Err(e) => Err(rejected(Method::Send, "", e)),
            },
            Err(e) => Err(e),
        };
        self.observe(Method::Send, start, &r);
        r
    }

    type SendStreamStream = SendResponses;

    async fn send_stream(
        &self,
        request: Request<Streaming<pb::SendRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let permit = match self
            .streams
            .acquire(super::server::peer_addr(request.extensions()))
        {
            Ok(p) => p,
            Err(e) => {
                let status = rejected(Method::SendStream, "", e);
                self.observe::<()>(Method::SendStream, Instant::now(), &Err(status.clone()));
                return Err(status);
            }
        };
        self.observe::<()>(Method::SendStream, Instant::now(), &Ok(()));
        Ok(Response::new(SendResponses {
            _permit: permit,
            caller: Self::caller(&request),
            service: self.clone(),
            inbound: request.into_inner(),
            cancelled: Box::pin({
                let mut token = self.shutdown.clone();
                async move { token.cancelled().await }
            }),
            in_flight: VecDeque::new(),
            charge: ReadCharge::default(),
            in_flight_bytes: 0,
            waiting: None,
            inbound_done: false,
            done: false,
        }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn recv(
        &self,
        request: Request<pb::RecvRequest>,
    ) -> Result<Response<pb::RecvResponse>, Status> {
        let start = Instant::now();
        let deadline = client_timeout(request.metadata());
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let result = self.recv_inner(r, deadline, &caller).await;
        self.observe(Method::Recv, start, &result);
        result
    }

    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

    async fn subscribe(
        &self,
        _request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        // Unreachable when served through `grpc::server`: `SubscribeRoute` answers Subscribe.
        Err(Status::unimplemented(
            "Subscribe is served by the zero-copy route (grpc::wire::SubscribeRoute)",
        ))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn create_group(
        &self,
        request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        let start = Instant::now();
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let reject = |e: BrokerError| rejected(Method::CreateGroup, &r.address, e);
        let result = async {
            let address = Address::parse(r.address.as_str()).map_err(reject)?;
            self.allow(&caller, Action::Receive, address.as_str())
                .map_err(reject)?;
            let group = Group::parse(r.group.as_str()).map_err(reject)?;
            let start = validate::start(r.start_sequence, r.start_time.as_ref()).map_err(reject)?;
            let ack = validate::ack_policy(
                r.ack_wait.as_ref(),
                r.max_deliveries,
                &r.dead_letter_address,
                r.max_ack_pending,
            )
            .map_err(reject)?;
            // The group's dead letters are sends to that address on the caller's behalf.
            if let Some(to) = ack.as_ref().and_then(|a| a.dead_letter.as_ref()) {
                self.allow(&caller, Action::Send, to.as_str())
                    .map_err(reject)?;
            }
            let (created, next_sequence) = self
                .broker
                .create_group(&address, &group, GroupSettings { start, ack })
                .await
                .map_err(reject)?;
            Ok(Response::new(pb::CreateGroupResponse {
                created,
                next_sequence,
            }))
        }
        .await;
        self.observe(Method::CreateGroup, start, &result);
        result
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn send_batch(
        &self,
        request: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        let start = Instant::now();
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let result = async {
            let reject = |e: BrokerError| rejected(Method::SendBatch, &r.address, e);
            let address = Address::parse(r.address.as_str()).map_err(reject)?;
            self.allow(&caller, Action::Send, address.as_str())
                .map_err(reject)?;
            let messages = r
                .messages
                .into_iter()
                .map(|m| (m.payload, m.headers, m.message_id))
                .collect();
            let appended = self
                .broker
                .send_batch(&address, messages)
                .await
                .map_err(reject)?;
            Ok(Response::new(pb::SendBatchResponse {
                results: appended
                    .into_iter()
                    .map(|a| pb::SendResponse {
                        sequence: a.sequence,
                        error: None,
                        duplicate: a.duplicate,
                    })
                    .collect(),
            }))
        }
        .await;
        self.observe(Method::SendBatch, start, &result);
        result
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let not_pending = self
            .settle(
                Method::Ack,
                &r.address,
                &r.group,
                &r.sequences,
                &caller,
                || Ok(Settle::Ack),
            )
            .await?;
        Ok(Response::new(pb::AckResponse { not_pending }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let not_pending = self
            .settle(
                Method::Nack,
                &r.address,
                &r.group,
                &r.sequences,
                &caller,
                || validate::nack_delay(r.delay.as_ref()).map(Settle::Nack),
            )
            .await?;
        Ok(Response::new(pb::NackResponse { not_pending }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let not_pending = self
            .settle(
                Method::ExtendLease,
                &r.address,
                &r.group,
                &r.sequences,
                &caller,
                || Ok(Settle::Extend),
            )
            .await?;
        Ok(Response::new(pb::ExtendLeaseResponse { not_pending }))
    }

    #[tracing::instrument(level = "debug", skip_all, fields(address = %request.get_ref().address))]
    async fn delete_group(
        &self,
        request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        let start = Instant::now();
        let caller = Self::caller(&request);
        let r = request.into_inner();
        let reject = |e: BrokerError| rejected(Method::DeleteGroup, &r.address, e);
        let result = async {
            let address = Address::parse(r.address.as_str()).map_err(reject)?;
            self.allow(&caller, Action::Receive, address.as_str())
                .map_err(reject)?;
            let group = Group::parse(r.group.as_str()).map_err(reject)?;
            self.broker
                .delete_group(&address, &group)
                .await
                .map_err(reject)?;
            Ok(Response::new(pb::DeleteGroupResponse {}))
        }
        .await;
        self.observe(Method::DeleteGroup, start, &result);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        let t = |v: &str| {
            let mut m = MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            client_timeout(&m)
        };
        assert_eq!(t("5S"), Some(Duration::from_secs(5)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("2M"), Some(Duration::from_secs(120)));
        assert_eq!(t("7u"), Some(Duration::from_micros(7)));
        assert_eq!(t("x"), None);
        assert_eq!(t(""), None);
    }
}
