//! The prost codec for our generated services and clients, with smaller buffers than tonic's
//! default.
//!
//! tonic allocates each call's encode and decode buffer at `BufferSettings::buffer_size` (8 KiB
//! by default) and grows it as needed. Most of our calls carry one small message (a Send of a
//! few hundred bytes, its response), so the per-call 8 KiB allocations showed up in the unary
//! profile (BENCHMARKS.md). This codec starts them at [`BUFFER_BYTES`]; larger messages grow
//! the buffer as before.
//!
//! Its decoder also refuses a `SendBatchRequest` with more than [`MAX_BATCH_MESSAGES`] entries
//! *before* prost decodes it ([`GuardedDecoder`]): an entry can be 2 bytes on the wire and
//! ~100 bytes decoded, so a request at the decode limit (~4 MiB) of empty entries would
//! otherwise cost ~200 MiB of transient allocations before the count check could refuse it.

use std::{any::TypeId, marker::PhantomData};

use bytes::Buf;
use tonic::{
    codec::{BufferSettings, Codec, DecodeBuf, Decoder},
    Status,
};
use tonic_prost::{ProstDecoder, ProstEncoder};

use crate::{broker::MAX_BATCH_MESSAGES, error::BrokerError, pb};

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

/// prost's decoder, after a scan of a `SendBatchRequest`'s top-level fields that refuses more
/// than [`MAX_BATCH_MESSAGES`] `messages` entries with `INVALID_ARGUMENT` (the same status the
/// broker gives after decoding). Other message types are decoded as they are.
#[derive(Debug)]
pub struct GuardedDecoder<U>(ProstDecoder<U>);

impl<U> Decoder for GuardedDecoder<U>
where
    U: prost::Message + Default + Send + 'static,
{
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        if TypeId::of::<U>() == TypeId::of::<pb::SendBatchRequest>()
            && buf.chunk().len() == buf.remaining()
        {
            // `SendBatchRequest.messages` is field 2.
            let entries = count_entries(buf.chunk(), 2, MAX_BATCH_MESSAGES + 1);
            if entries > MAX_BATCH_MESSAGES {
                return Err(BrokerError::invalid(
                    "messages",
                    format!(
                        "more than {MAX_BATCH_MESSAGES} given; a batch holds 1 to {MAX_BATCH_MESSAGES} messages"
                    ),
                )
                .into());
            }
        }
        self.0.decode(buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// Counts the length-delimited occurrences of top-level `field` in the encoded message
/// `bytes`, stopping at `stop`. A malformed encoding ends the scan early; prost then reports
/// it when it decodes.
fn count_entries(mut bytes: &[u8], field: u64, stop: usize) -> usize {
    let mut count = 0;
    while !bytes.is_empty() && count < stop {
        let Ok(key) = prost::encoding::decode_varint(&mut bytes) else {
            break;
        };
        let skip = match key & 7 {
            0 => match prost::encoding::decode_varint(&mut bytes) {
                Ok(_) => 0,
                Err(_) => break,
            },
            1 => 8,
            2 => match prost::encoding::decode_varint(&mut bytes) {
                Ok(len) => {
                    if key >> 3 == field {
                        count += 1;
                    }
                    match usize::try_from(len) {
                        Ok(len) => len,
                        Err(_) => break,
                    }
                }
                Err(_) => break,
            },
            5 => 4,
            _ => break, // groups (deprecated) or an invalid wire type: leave it to prost
        };
        if skip > bytes.len() {
            break;
        }
        bytes = &bytes[skip..];
    }
    count
}

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    #[test]
    fn counts_batch_entries_and_stops_at_the_bound() {
        let request = |n: usize| {
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
                        headers: [("k".to_string(), "v".to_string())].into(),
                    })
                    .collect(),
            }
            .encode_to_vec()
        };
        assert_eq!(count_entries(&request(0), 2, 10), 0);
        assert_eq!(count_entries(&request(7), 2, 10), 7);
        assert_eq!(count_entries(&request(50), 2, 10), 10, "stops at the bound");
        assert_eq!(count_entries(&request(7), 1, 10), 1, "the address field");
        // Truncated in the middle of an entry: the scan stops without overrunning.
        let mut cut = request(7);
        cut.truncate(cut.len() - 2);
        assert!(count_entries(&cut, 2, 10) <= 7);
        assert_eq!(
            count_entries(&[0xff; 3], 2, 10),
            0,
            "a bad varint ends the scan"
        );
    }
}
