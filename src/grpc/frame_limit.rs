//! [`FrameLimit`]: refuses an oversized gRPC request message from its 5-byte length prefix,
//! before its bytes are read or decoded.
//!
//! tonic would buffer a whole message up to its decode limit and only then refuse it with a bare
//! `OUT_OF_RANGE`; raising that limit to let our own validation speak would let every request
//! make the broker buffer (and prost allocate for) up to 64 MiB. Instead the decode limit stays
//! at `--max-message-bytes` plus headroom, and this wrapper answers a message declared larger
//! with the broker's `RESOURCE_EXHAUSTED` naming the size and the limit, whatever the size, as
//! soon as the prefix arrives. On a SendStream it ends the stream (the message cannot be
//! skipped without reading it); smaller refusals stay per message.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::Frame;
use tonic::{body::Body, Status};

/// A request body whose gRPC messages may not exceed `limit` bytes each.
#[derive(Debug)]
pub(crate) struct FrameLimit {
    inner: Body,
    limit: usize,
    max_message_bytes: usize,
    /// Bytes of the current message still to pass before the next prefix.
    skip: u64,
    header: [u8; 5],
    have: usize,
}

impl FrameLimit {
    pub(crate) fn new(inner: Body, limit: usize, max_message_bytes: usize) -> Self {
        Self {
            inner,
            limit,
            max_message_bytes,
            skip: 0,
            header: [0; 5],
            have: 0,
        }
    }

    /// Follows the message boundaries through `chunk`; the first oversized prefix is an error.
    fn scan(&mut self, mut chunk: &[u8]) -> Result<(), Status> {
        while !chunk.is_empty() {
            if self.skip > 0 {
                let n = usize::try_from(self.skip)
                    .unwrap_or(usize::MAX)
                    .min(chunk.len());
                self.skip -= n as u64;
                chunk = chunk.get(n..).unwrap_or_default();
                continue;
            }
            let n = (5 - self.have).min(chunk.len());
            if let (Some(dst), Some(src)) = (
                self.header.get_mut(self.have..self.have + n),
                chunk.get(..n),
            ) {
                dst.copy_from_slice(src);
            }
            self.have += n;
            chunk = chunk.get(n..).unwrap_or_default();
            if self.have == 5 {
                self.have = 0;
                let [_, a, b, c, d] = self.header;
                let len = u32::from_be_bytes([a, b, c, d]);
                if usize::try_from(len).unwrap_or(usize::MAX) > self.limit {
                    return Err(Status::resource_exhausted(format!(
                        "payload: a message of {len} bytes exceeds the limit of {} bytes (--max-message-bytes {} plus room for headers and framing)",
                        self.limit, self.max_message_bytes
                    )));
                }
                self.skip = u64::from(len);
            }
        }
        Ok(())
    }
}

impl http_body::Body for FrameLimit {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(status) = this.scan(data) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: u32) -> Vec<u8> {
        let mut v = vec![0u8];
        v.extend_from_slice(&len.to_be_bytes());
        v.extend(std::iter::repeat_n(7u8, len as usize));
        v
    }

    #[test]
    fn follows_boundaries_across_chunks_and_refuses_the_first_oversized_prefix() {
        let mut f = FrameLimit::new(Body::empty(), 10, 8);
        let mut stream = frame(3);
        stream.extend(frame(10));
        stream.extend(frame(0));
        for chunk in stream.chunks(2) {
            f.scan(chunk).unwrap();
        }
        let mut big = frame(11);
        big.truncate(5);
        let e = f
            .scan(&big[..3])
            .and_then(|()| f.scan(&big[3..]))
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().starts_with("payload: a message of 11 bytes"),
            "{}",
            e.message()
        );
    }
}
