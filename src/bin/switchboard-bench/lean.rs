//! A lean unary client for the benchmark: gRPC Send calls written straight onto one HTTP/2
//! connection with the `h2` crate (one pre-encoded request body shared by every call, no tower
//! stack, no per-call codec), as load generators such as `h2load` and `ghz` do. On this
//! two-core machine the tonic client costs more CPU per call than the broker does, so the
//! broker's own capacity shows only when the client is cheaper (BENCHMARKS.md, W9).

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;
use switchboard::pb::SendRequest;
use tokio::net::TcpStream;

use crate::Res;

/// The gRPC body of one Send: the 5-byte length prefix and the encoded request.
fn send_body(address: &str, payload: &Bytes) -> Bytes {
    let req = SendRequest {
        address: address.to_string(),
        payload: payload.clone(),
        ..Default::default()
    };
    let len = req.encoded_len();
    let mut b = BytesMut::with_capacity(5 + len);
    b.put_u8(0);
    b.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    req.encode(&mut b).unwrap_or_default();
    b.freeze()
}

/// Sends `n` messages to `address` with unary Send calls, `inflight` at a time, over one
/// HTTP/2 connection; fails on any status but OK.
pub(crate) async fn publish_unary(
    addr: SocketAddr,
    address: &str,
    n: u64,
    inflight: u64,
    payload: &Bytes,
) -> Res<()> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .handshake::<_, Bytes>(tcp)
        .await?;
    let driver = tokio::spawn(connection);
    let body = send_body(address, payload);
    let uri = format!("http://{addr}/switchboard.v1.Broker/Send");
    let mut tasks = Vec::new();
    for k in 0..inflight {
        let share = n / inflight + u64::from(k < n % inflight);
        let (mut client, body, uri) = (client.clone(), body.clone(), uri.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                let request = http::Request::post(uri.as_str())
                    .header("content-type", "application/grpc")
                    .header("te", "trailers")
                    .body(())?;
                client = client.ready().await?;
                let (response, mut stream) = client.send_request(request, false)?;
                stream.send_data(body.clone(), true)?;
                let mut response = response.await?.into_body();
                while let Some(chunk) = response.data().await {
                    let chunk = chunk?;
                    let _ = response.flow_control().release_capacity(chunk.len());
                }
                let status = response
                    .trailers()
                    .await?
                    .and_then(|t| t.get("grpc-status").cloned());
                if status.as_ref().map(http::HeaderValue::as_bytes) != Some(b"0") {
                    return Err(format!("Send answered grpc-status {status:?}").into());
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    driver.abort();
    Ok(())
}
