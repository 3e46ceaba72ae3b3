//! The ceiling: the same `switchboard.v1.Broker` service with no registry, no retention and no
//! validation. Send is a counter plus one in-process `tokio::sync::broadcast` channel; Subscribe
//! streams read that channel. It shows what tonic, HTTP/2 and loopback allow on this machine, so
//! the broker's figures can be read as ratios.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures_util::{Stream, StreamExt};
use switchboard::pb::{self, broker_server::BrokerServer};
use tokio::sync::broadcast;
use tokio_stream::wrappers::{
    errors::BroadcastStreamRecvError, BroadcastStream, TcpListenerStream,
};
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
struct Ceiling {
    sequence: Arc<AtomicU64>,
    tx: broadcast::Sender<Arc<pb::Message>>,
}

impl Ceiling {
    fn publish(&self, r: pb::SendRequest) -> u64 {
        let sequence = self.sequence.fetch_add(1, Ordering::Relaxed) + 1;
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(pb::Message {
                delivery_attempt: 0,
                address: r.address,
                sequence,
                payload: r.payload,
                headers: r.headers,
                sent_at: Some(prost_types::Timestamp::from(std::time::SystemTime::now())),
            }));
        }
        sequence
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl pb::broker_server::Broker for Ceiling {
    async fn create_group(
        &self,
        _request: Request<pb::CreateGroupRequest>,
    ) -> Result<Response<pb::CreateGroupResponse>, Status> {
        Err(Status::unimplemented("the ceiling has no groups"))
    }

    async fn delete_group(
        &self,
        _request: Request<pb::DeleteGroupRequest>,
    ) -> Result<Response<pb::DeleteGroupResponse>, Status> {
        Err(Status::unimplemented("the ceiling has no groups"))
    }

    async fn send_batch(
        &self,
        request: Request<pb::SendBatchRequest>,
    ) -> Result<Response<pb::SendBatchResponse>, Status> {
        let r = request.into_inner();
        let results = r
            .messages
            .into_iter()
            .map(|m| pb::SendResponse {
                sequence: self.publish(pb::SendRequest {
                    address: r.address.clone(),
                    payload: m.payload,
                    headers: m.headers,
                    message_id: m.message_id,
                }),
                ..Default::default()
            })
            .collect();
        Ok(Response::new(pb::SendBatchResponse { results }))
    }

    async fn ack(
        &self,
        _request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        Err(Status::unimplemented("the ceiling has no groups"))
    }

    async fn nack(
        &self,
        _request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        Err(Status::unimplemented("the ceiling has no groups"))
    }

    async fn extend_lease(
        &self,
        _request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        Err(Status::unimplemented("the ceiling has no groups"))
    }

    async fn send(
        &self,
        request: Request<pb::SendRequest>,
    ) -> Result<Response<pb::SendResponse>, Status> {
        let sequence = self.publish(request.into_inner());
        Ok(Response::new(pb::SendResponse {
            sequence,
            error: None,
            ..Default::default()
        }))
    }

    type SendStreamStream = BoxStream<pb::SendResponse>;

    async fn send_stream(
        &self,
        request: Request<Streaming<pb::SendRequest>>,
    ) -> Result<Response<Self::SendStreamStream>, Status> {
        let this = self.clone();
        let out = request.into_inner().map(move |r| {
            r.map(|r| pb::SendResponse {
                sequence: this.publish(r),
                error: None,
                ..Default::default()
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn recv(
        &self,
        _request: Request<pb::RecvRequest>,
    ) -> Result<Response<pb::RecvResponse>, Status> {
        Ok(Response::new(pb::RecvResponse::default()))
    }

    type SubscribeStream = BoxStream<pb::SubscribeResponse>;

    async fn subscribe(
        &self,
        _request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let out = BroadcastStream::new(self.tx.subscribe()).map(|r| {
            let event = match r {
                Ok(m) => pb::subscribe_response::Event::Message(pb::Message::clone(&m)),
                Err(BroadcastStreamRecvError::Lagged(count)) => {
                    pb::subscribe_response::Event::Dropped(pb::Dropped { count })
                }
            };
            Ok(pb::SubscribeResponse { event: Some(event) })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// Serves the ceiling on 127.0.0.1 (free port) and prints `listening ADDR` on stdout.
pub(crate) async fn serve() -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (tx, _) = broadcast::channel(65_536);
    let service = BrokerServer::new(Ceiling {
        sequence: Arc::new(AtomicU64::new(0)),
        tx,
    })
    .max_decoding_message_size(80 * 1024 * 1024);
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr}")?;
        out.flush()?;
    }
    let incoming = TcpListenerStream::new(listener).map(|c| {
        c.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    tonic::transport::Server::builder()
        .add_service(service)
        .serve_with_incoming(incoming)
        .await?;
    Ok(())
}
