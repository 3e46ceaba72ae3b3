//! `switchboard.v1.Admin`: introspection RPCs over the [`Broker`] (list, inspect, delete).
//! Like NATS's `/varz` and `/connz` or Redis's `PUBSUB NUMSUB`, but typed and paged.

use std::time::Instant;

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine as _};
use tonic::{Request, Response, Status};

use crate::{
    broker::Broker,
    engine::{AddressInfo, GroupInfo},
    error::BrokerError,
    metrics::Method,
    pb,
    validate::{self, Address},
};

/// Most addresses one ListAddresses page returns.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Page size when the request leaves it 0.
pub const DEFAULT_PAGE_SIZE: u32 = 100;

/// The Admin service over a [`Broker`].
#[derive(Debug, Clone)]
pub struct AdminService {
    broker: Broker,
}

impl AdminService {
    /// Serves introspection of `broker`.
    pub fn new(broker: Broker) -> Self {
        Self { broker }
    }

    fn observe<T>(&self, method: Method, start: Instant, r: &Result<T, Status>) {
        let code = r.as_ref().map_or_else(Status::code, |_| tonic::Code::Ok);
        self.broker
            .metrics()
            .observe_rpc(method, code, start.elapsed());
    }
}

fn to_pb_info(i: AddressInfo) -> pb::AddressInfo {
    pb::AddressInfo {
        address: i.address,
        retained_messages: i.retained_messages as u64,
        retained_bytes: i.retained_bytes as u64,
        first_sequence: i.first_sequence,
        last_sequence: i.last_sequence,
        subscribers: u32::try_from(i.subscribers).unwrap_or(u32::MAX),
        groups: u32::try_from(i.groups).unwrap_or(u32::MAX),
        disk_bytes: i.disk_bytes,
    }
}

fn to_pb_group(g: GroupInfo) -> pb::GroupInfo {
    let ack = g.ack.as_ref();
    pb::GroupInfo {
        group: g.group,
        lag: g.lag,
        dropped: g.dropped,
        next_sequence: g.next_sequence,
        pending: g.pending,
        redelivered: g.redelivered,
        dead_lettered: g.dead_lettered,
        ack_wait: ack.and_then(|a| prost_types::Duration::try_from(a.ack_wait).ok()),
        max_deliveries: ack.map_or(0, |a| a.max_deliveries),
        dead_letter_address: ack
            .and_then(|a| a.dead_letter.as_ref())
            .map_or_else(String::new, |d| d.as_str().to_string()),
        max_ack_pending: ack.map_or(0, |a| a.max_ack_pending),
    }
}

fn decode_token(token: &str) -> Result<String, BrokerError> {
    if token.is_empty() {
        return Ok(String::new());
    }
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| {
            BrokerError::invalid("page_token", "not a token from a previous ListAddresses")
        })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_addresses(
        &self,
        request: Request<pb::ListAddressesRequest>,
    ) -> Result<Response<pb::ListAddressesResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let req = request.into_inner();
            if req.page_size > MAX_PAGE_SIZE {
                return Err(BrokerError::invalid(
                    "page_size",
                    format!(
                        "{} is more than the limit of {MAX_PAGE_SIZE}",
                        req.page_size
                    ),
                )
                .into());
            }
            if req.prefix.len() > validate::MAX_NAME_BYTES {
                return Err(BrokerError::invalid("prefix", "longer than 255 bytes").into());
            }
            let size = if req.page_size == 0 {
                DEFAULT_PAGE_SIZE
            } else {
                req.page_size
            };
            let after = decode_token(&req.page_token)?;
            let limit = usize::try_from(size).unwrap_or(1000);
            let (infos, next) = self.broker.list(&req.prefix, &after, limit).await?;
            Ok(Response::new(pb::ListAddressesResponse {
                addresses: infos.into_iter().map(to_pb_info).collect(),
                next_page_token: next.map(|n| URL_SAFE_NO_PAD.encode(n)).unwrap_or_default(),
            }))
        }
        .await;
        self.observe(Method::ListAddresses, start, &r);
        r
    }

    async fn get_address(
        &self,
        request: Request<pb::GetAddressRequest>,
    ) -> Result<Response<pb::GetAddressResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let address = Address::parse(request.into_inner().address)?;
            let (info, groups) = self
                .broker
                .inspect(address.as_str(), true)
                .await?
                .ok_or_else(|| BrokerError::NoSuchAddress(address.to_string()))?;
            Ok(Response::new(pb::GetAddressResponse {
                address: Some(to_pb_info(info)),
                groups: groups.into_iter().map(to_pb_group).collect(),
            }))
        }
        .await;
        self.observe(Method::GetAddress, start, &r);
        r
    }

    async fn delete_address(
        &self,
        request: Request<pb::DeleteAddressRequest>,
    ) -> Result<Response<pb::DeleteAddressResponse>, Status> {
        let start = Instant::now();
        let r = async {
            let address = Address::parse(request.into_inner().address)?;
            let purged = self
                .broker
                .purge(address.as_str())
                .await?
                .ok_or_else(|| BrokerError::NoSuchAddress(address.to_string()))?;
            tracing::info!(address = %address, purged, "address deleted");
            Ok(Response::new(pb::DeleteAddressResponse {
                purged_messages: purged as u64,
            }))
        }
        .await;
        self.observe(Method::DeleteAddress, start, &r);
        r
    }
}
