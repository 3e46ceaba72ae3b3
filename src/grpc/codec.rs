//! The prost codec for our generated services and clients, with smaller buffers than tonic's
//! default.
//!
//! tonic allocates each call's encode and decode buffer at `BufferSettings::buffer_size` (8 KiB
//! by default) and grows it as needed. Most of our calls carry one small message (a Send of a
//! few hundred bytes, its response), so the per-call 8 KiB allocations showed up in the unary
//! profile (BENCHMARKS.md). This codec starts them at [`BUFFER_BYTES`]; larger messages grow
//! the buffer as before.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

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
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
