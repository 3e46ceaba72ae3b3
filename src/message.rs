//! The stored message and its wire frame, shared by the engines (which cache a message's frame
//! while fan-out subscribers still need it) and the gRPC face (which writes frames to streams).
//! A leaf module: it imports neither `engine` nor `grpc`, so neither depends on the other here.

use std::{sync::Arc, time::SystemTime};

use bytes::{BufMut, Bytes, BytesMut};
use prost::encoding::{
    encode_key, encode_varint, encoded_len_varint, hash_map, key_len, message, string, WireType,
};

use crate::validate::Headers;

/// Payloads up to this size (bytes) are copied into the (shared) frame; larger ones travel as
/// their own chunk, never copied.
pub const INLINE_PAYLOAD_BYTES: usize = 4096;

/// A message as the broker stores it. Shared (`Arc`) by every consumer that is handed it; the
/// payload is a reference-counted [`Bytes`], never copied per subscriber.
///
/// Laid out in declaration order (`repr(C)`) so that what readers scan per message (the
/// sequence and the size, which bounds a read in bytes) shares the first cache line with the
/// reference counts.
#[derive(Debug)]
#[repr(C)]
pub struct Message {
    /// The address it was sent to.
    pub address: Arc<str>,
    /// Its per-address sequence, from 1.
    pub sequence: u64,
    /// Bytes charged against the retention bounds (payload + headers + 128 overhead).
    pub size: usize,
    /// When the broker accepted it.
    pub sent_at: SystemTime,
    /// The payload bytes.
    pub payload: Bytes,
    /// The headers it was sent with.
    pub headers: Headers,
}

/// A message encoded as a gRPC length-prefixed `SubscribeResponse`: `head`, then `payload` when
/// it was too large to inline. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct WireFrame {
    /// The length prefix and the message up to (and including) the payload's tag and length;
    /// with an inline payload, the payload too.
    pub head: Bytes,
    /// The payload, when it was too large to inline: the publisher's own bytes.
    pub payload: Option<Bytes>,
}

/// Bytes of a length-delimited field `tag` holding `len` bytes.
fn field_len(tag: u32, len: usize) -> usize {
    key_len(tag) + encoded_len_varint(len as u64) + len
}

/// Bytes of `m` encoded as a wire `Message` (without its own tag and length).
fn message_len(m: &Message, sent_at: &prost_types::Timestamp, delivery_attempt: u32) -> usize {
    let mut len = hash_map::encoded_len(string::encoded_len, string::encoded_len, 4, &m.headers)
        + message::encoded_len(5, sent_at);
    if !m.address.is_empty() {
        len += field_len(1, m.address.len());
    }
    if m.sequence != 0 {
        len += key_len(2) + encoded_len_varint(m.sequence);
    }
    if !m.payload.is_empty() {
        len += field_len(3, m.payload.len());
    }
    if delivery_attempt != 0 {
        len += key_len(6) + encoded_len_varint(u64::from(delivery_attempt));
    }
    len
}

/// Bytes `m` adds to a `RecvResponse` (one entry of its repeated `messages` field: tag, length
/// and the message), with the largest `delivery_attempt` a message can carry, so the figure is
/// an upper bound whatever attempt it is handed out with (at most 6 bytes above the exact one).
/// What a Recv batch is bounded by (see `RecvRequest.max_bytes`).
pub fn recv_entry_len(m: &Message) -> usize {
    let sent_at = prost_types::Timestamp::from(m.sent_at);
    field_len(1, message_len(m, &sent_at, u32::MAX))
}

/// Bytes a `RecvResponse` holds besides its messages, at most: its `dropped` field (a tag and
/// a 64-bit varint).
pub const RECV_RESPONSE_OVERHEAD: usize = 11;

/// Encodes `m` as a `SubscribeResponse` frame (done once per message for all its fan-out
/// subscribers; see the memory engine's `read_fanout`).
///
/// `delivery_attempt` is field 6 of the wire `Message` (0, the default, is not written): the
/// per-delivery attempt of a group with acknowledgements; fan-out frames pass 0.
pub fn encode_message(m: &Message, delivery_attempt: u32) -> WireFrame {
    // Encoded by hand from the stored message (no intermediate `pb::Message`, no copies of the
    // address or headers); `payload` (field 3) goes last so a large one can stay a separate chunk.
    let address = m.address.as_bytes();
    let sent_at = prost_types::Timestamp::from(m.sent_at);
    let plen = m.payload.len();
    let msg_len = message_len(m, &sent_at, delivery_attempt);
    let resp_len = field_len(1, msg_len);
    let inline = plen <= INLINE_PAYLOAD_BYTES;
    let mut buf = BytesMut::with_capacity(5 + resp_len - if inline { 0 } else { plen });
    buf.put_u8(0); // not compressed
    buf.put_u32(u32::try_from(resp_len).unwrap_or(u32::MAX));
    encode_key(1, WireType::LengthDelimited, &mut buf);
    encode_varint(msg_len as u64, &mut buf);
    if !address.is_empty() {
        encode_key(1, WireType::LengthDelimited, &mut buf);
        encode_varint(address.len() as u64, &mut buf);
        buf.put_slice(address);
    }
    if m.sequence != 0 {
        encode_key(2, WireType::Varint, &mut buf);
        encode_varint(m.sequence, &mut buf);
    }
    hash_map::encode(
        string::encode,
        string::encoded_len,
        string::encode,
        string::encoded_len,
        4,
        &m.headers,
        &mut buf,
    );
    message::encode(5, &sent_at, &mut buf);
    if delivery_attempt != 0 {
        encode_key(6, WireType::Varint, &mut buf);
        encode_varint(u64::from(delivery_attempt), &mut buf);
    }
    if plen > 0 {
        encode_key(3, WireType::LengthDelimited, &mut buf);
        encode_varint(plen as u64, &mut buf);
        if inline {
            buf.put_slice(&m.payload);
        }
    }
    WireFrame {
        head: buf.freeze(),
        payload: (!inline).then(|| m.payload.clone()),
    }
}
