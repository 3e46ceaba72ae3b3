//! The prost codec for our generated services and clients, with smaller buffers than tonic's
//! default.
//!
//! tonic allocates each call's encode and decode buffer at `BufferSettings::buffer_size` (8 KiB
//! by default) and grows it as needed. Most of our calls carry one small message (a Send of a
//! few hundred bytes, its response), so the per-call 8 KiB allocations showed up in the unary
//! profile (BENCHMARKS.md). This codec starts them at [`BUFFER_BYTES`]; larger messages grow
//! the buffer as before.
//!
//! Its decoder also refuses a `SendBatchRequest` with more than [`MAX_BATCH_MESSAGES`] entries,
//! and a `SendRequest` or batch entry with more than [`MAX_HEADERS`] headers, *before* prost
//! decodes it ([`GuardedDecoder`]): a batch entry can be 2 bytes on the wire and ~100 bytes
//! decoded, so a request at the decode limit (~4 MiB) of empty entries would otherwise cost
//! ~200 MiB of transient allocations before the count check could refuse it (headers with
//! tiny distinct keys: ~15x).

use std::{
    any::{Any, TypeId},
    marker::PhantomData,
};

use bytes::Buf;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use super::service::rejected;
use crate::{broker::MAX_BATCH_MESSAGES, error::BrokerError, pb, validate::MAX_HEADERS};

/// Initial size of a call's encode and decode buffer, in bytes.
pub const BUFFER_BYTES: usize = 1024;
/// Bytes of encoded stream messages gathered before they are handed to the transport
/// (tonic's default).
const YIELD_THRESHOLD: usize = 32 * 1024;

/// `application/grpc+proto` with prost, like `tonic_prost::ProstCodec`, with
/// [`BUFFER_BYTES`] buffers. Named by `build.rs` as the generated code's codec.
#[derive(Debug)]
pub struct SmallBufferCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SmallBufferCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for SmallBufferCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = GuardedDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        GuardedDecoder(ProstDecoder::new(settings()))
    }
}

/// prost's decoder, after a scan of the encoded request that refuses repeated fields over
/// their limits with `INVALID_ARGUMENT` before anything is decoded: a `SendBatchRequest` with
/// more than [`MAX_BATCH_MESSAGES`] `messages`, and a `SendRequest` or a batch entry with more
/// than [`MAX_HEADERS`] `headers` entries (counted on the wire, so repeated keys count each
/// time). The statuses match the broker's after decoding. Other types are decoded as they are.
#[derive(Debug)]
pub struct GuardedDecoder<U>(ProstDecoder<U>);

impl<U> Decoder for GuardedDecoder<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // `chunk()` is the whole message: tonic decodes from one contiguous buffer.
        if buf.chunk().len() == buf.remaining() {
            let ty = TypeId::of::<U>();
            let (method, checked) = if ty == TypeId::of::<pb::SendBatchRequest>() {
                (Decoding("SendBatch"), check_batch(buf.chunk()).map(Some))
            } else if ty == TypeId::of::<pb::SendRequest>() {
                // `SendRequest.headers` is field 3. One type serves two methods.
                (
                    Decoding("Send or SendStream"),
                    check_headers(buf.chunk(), 3).map(|()| None),
                )
            } else {
                (Decoding(""), Ok(None))
            };
            match checked {
                Err(e) => {
                    // Logged like the service's refusals (`request rejected`), with the
                    // address (field 1 of both requests) as sent.
                    let address = entries(buf.chunk(), 1).next().unwrap_or_default();
                    return Err(rejected(method, &String::from_utf8_lossy(address), e));
                }
                // A batch's entry count is known from the scan: its vector is allocated once
                // instead of growing entry by entry.
                Ok(Some(count)) => {
                    let mut batch = pb::SendBatchRequest {
                        address: String::new(),
                        messages: Vec::with_capacity(count),
                    };
                    prost::Message::merge(&mut batch, &mut *buf)
                        .map_err(|e| Status::internal(e.to_string()))?;
                    // `U` is `SendBatchRequest` (matched by `TypeId` above), so this succeeds;
                    // the buffer is consumed either way, so there is no falling back.
                    let mut decoded = Some(batch);
                    return (&mut decoded as &mut dyn Any)
                        .downcast_mut::<Option<U>>()
                        .and_then(Option::take)
                        .map(Some)
                        .ok_or_else(|| {
                            Status::internal("SendBatch request decoded as another type")
                        });
                }
                Ok(None) => {}
            }
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// The method a refusal is logged under: the codec knows the request's type, not its path.
struct Decoding(&'static str);

impl std::fmt::Debug for Decoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// `SendBatchRequest.messages` (field 2): at most [`MAX_BATCH_MESSAGES`], each with at most
/// [`MAX_HEADERS`] `headers` (`BatchMessage` field 2). Returns how many entries there are.
fn check_batch(request: &[u8]) -> Result<usize, BrokerError> {
    let mut count = 0;
    for (index, entry) in entries(request, 2).enumerate() {
        count = index + 1;
        if index == MAX_BATCH_MESSAGES {
            return Err(BrokerError::invalid(
                "messages",
                format!(
                    "more than {MAX_BATCH_MESSAGES} given; a batch holds 1 to {MAX_BATCH_MESSAGES} messages"
                ),
            ));
        }
        check_headers(entry, 2).map_err(|e| BrokerError::InBatch {
            index,
            error: Box::new(e),
        })?;
    }
    Ok(count)
}

/// At most [`MAX_HEADERS`] entries of the map in `field` of the encoded message.
fn check_headers(message: &[u8], field: u64) -> Result<(), BrokerError> {
    if entries(message, field).nth(MAX_HEADERS).is_some() {
        return Err(BrokerError::invalid(
            "headers",
            format!("more than {MAX_HEADERS} entries; the limit is {MAX_HEADERS}"),
        ));
    }
    Ok(())
}

/// The contents of each length-delimited occurrence of top-level `field` in the encoded
/// message `bytes`, in order. A malformed encoding ends the iteration early; prost then
/// reports it when it decodes.
fn entries(mut bytes: &[u8], field: u64) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        while !bytes.is_empty() {
            let key = prost::encoding::decode_varint(&mut bytes).ok()?;
            let (skip, delimited) = match key & 7 {
                0 => {
                    prost::encoding::decode_varint(&mut bytes).ok()?;
                    (0, false)
                }
                1 => (8, false),
                2 => {
                    let len = prost::encoding::decode_varint(&mut bytes).ok()?;
                    (usize::try_from(len).ok()?, true)
                }
                5 => (4, false),
                _ => return None, // groups (deprecated) or an invalid wire type: prost's to report
            };
            let (value, rest) = bytes.split_at_checked(skip)?;
            bytes = rest;
            if delimited && key >> 3 == field {
                return Some(value);
            }
        }
        None
    })
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    fn batch(n: usize, headers: usize) -> Vec<u8> {
        pb::SendBatchRequest {
            address: "a.b".into(),
            messages: (0..n)
                .map(|i| pb::BatchMessage {
                    payload: vec![1; i % 3].into(),
                    message_id: if i % 2 == 0 {
                        String::new()
                    } else {
                        format!("id{i}")
                    },
                    headers: (0..headers)
                        .map(|h| (format!("k{h}"), "v".into()))
                        .collect(),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    #[test]
    fn finds_each_entry_of_a_field_and_stops_at_a_malformed_one() {
        assert_eq!(entries(&batch(0, 1), 2).count(), 0);
        assert_eq!(entries(&batch(7, 1), 2).count(), 7);
        assert_eq!(entries(&batch(7, 1), 1).collect::<Vec<_>>(), [b"a.b"]);
        let first = entries(&batch(3, 5), 2)
            .next()
            .map(|e| entries(e, 2).count());
        assert_eq!(first, Some(5), "an entry's headers");
        // Cut in the middle of the last entry: that entry is not yielded.
        let mut cut = batch(7, 1);
        cut.truncate(cut.len() - 2);
        assert_eq!(entries(&cut, 2).count(), 6);
        assert_eq!(
            entries(&[0xff; 3], 2).count(),
            0,
            "a bad varint ends the scan"
        );
    }

    #[test]
    fn refuses_batches_and_headers_over_their_limits() {
        assert_eq!(
            check_batch(&batch(MAX_BATCH_MESSAGES, MAX_HEADERS)).unwrap(),
            MAX_BATCH_MESSAGES,
            "the entry count sizes the decoded vector"
        );
        assert_eq!(check_batch(&batch(7, 0)).unwrap(), 7);
        let e = check_batch(&batch(MAX_BATCH_MESSAGES + 1, 0)).unwrap_err();
        assert!(e.to_string().starts_with("messages: more than 1000"), "{e}");
        let e = check_batch(&batch(2, MAX_HEADERS + 1)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("messages[0]: headers: more than 64"),
            "{e}"
        );
        let send = |n: usize| {
            pb::SendRequest {
                address: "a.b".into(),
                headers: (0..n).map(|h| (format!("k{h}"), "v".into())).collect(),
                ..Default::default()
            }
            .encode_to_vec()
        };
        assert!(check_headers(&send(MAX_HEADERS), 3).is_ok());
        let e = check_headers(&send(MAX_HEADERS + 1), 3).unwrap_err();
        assert!(e.to_string().starts_with("headers: more than 64"), "{e}");
    }
}
