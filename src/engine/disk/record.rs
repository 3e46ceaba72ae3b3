//! The on-disk record: one message in a segment, or one group event in an address's journal.
//!
//! Every record is framed as `[len: u32 LE][crc: u32 LE][body: len bytes]`, where `crc` is the
//! CRC-32 (IEEE, `crc32fast`) of the body. A reader that finds a short frame,
//! a length past the end of the file or a CRC mismatch knows the record was torn or corrupted;
//! recovery (`recovery.rs`) decides which with [`torn_tail`]: only a record whose declared
//! length runs past the end of the file (or a tail of zeros) is a write cut short.
//!
//! Message body (kind 1), all integers little-endian:
//! `kind u8, sequence u64, sent_at u64 (ns since the Unix epoch), message_id (u16 len + bytes),
//! header count u16, per header (u16 len + key, u32 len + value), payload (u32 len + bytes)`.
//!
//! Journal bodies (kinds 10–14) record what a consumer group did; see [`GroupEvent`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::{
    engine::{AckPolicy, GroupSettings, StartAt},
    message::Message,
    validate::{Address, Headers},
};

/// Bytes of the frame header (`len` and `crc`).
pub const FRAME_BYTES: usize = 8;

/// The largest body a reader accepts (bytes): the 64 MiB payload ceiling plus headers, id and
/// headroom. A longer `len` can only be corruption.
pub const MAX_BODY_BYTES: usize = 80 * 1024 * 1024;

const KIND_MESSAGE: u8 = 1;
const KIND_CREATE: u8 = 10;
const KIND_DELETE: u8 = 11;
const KIND_POSITION: u8 = 12;
const KIND_LEASE: u8 = 13;
const KIND_DONE: u8 = 14;

/// Appends one framed record whose body `body` writes.
pub fn frame(out: &mut Vec<u8>, body: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0; FRAME_BYTES]);
    body(out);
    let len = u32::try_from(out.len() - at - FRAME_BYTES).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(&out[at + FRAME_BYTES..]);
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    out[at + 4..at + 8].copy_from_slice(&crc.to_le_bytes());
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&b[..usize::from(n)]);
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(b);
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Appends `m` (with its dedup `message_id`) as a framed message record.
pub fn encode_message(out: &mut Vec<u8>, m: &Message, message_id: Option<&str>) {
    frame(out, |b| {
        b.reserve(64 + m.payload.len());
        b.push(KIND_MESSAGE);
        b.extend_from_slice(&m.sequence.to_le_bytes());
        b.extend_from_slice(&nanos(m.sent_at).to_le_bytes());
        put_str16(b, message_id.unwrap_or(""));
        b.extend_from_slice(&u16::try_from(m.headers.len()).unwrap_or(0).to_le_bytes());
        for (k, v) in &m.headers {
            put_str16(b, k);
            put_bytes32(b, v.as_bytes());
        }
        put_bytes32(b, &m.payload);
    });
}

/// Why a frame could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Fewer bytes remain than the frame header or its body claim: a write cut short.
    Short,
    /// The body does not match its CRC, or its length is impossible.
    Checksum,
    /// The CRC matched but the body does not parse.
    Malformed,
}

impl Bad {
    /// How recovery describes it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Short => "record cut short",
            Self::Checksum => "CRC mismatch",
            Self::Malformed => "malformed record",
        }
    }
}

/// The body of the frame at `pos` and the position after it.
///
/// # Errors
/// [`Bad::Short`] or [`Bad::Checksum`].
pub fn read_frame(buf: &[u8], pos: usize) -> Result<(&[u8], usize), Bad> {
    let Some(head) = buf.get(pos..pos + FRAME_BYTES) else {
        return Err(Bad::Short);
    };
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    if len == 0 || len > MAX_BODY_BYTES {
        return Err(Bad::Checksum);
    }
    let start = pos + FRAME_BYTES;
    let Some(body) = buf.get(start..start + len) else {
        return Err(Bad::Short);
    };
    if crc32fast::hash(body) != crc {
        return Err(Bad::Checksum);
    }
    Ok((body, start + len))
}

/// Whether the bad record `bad` at the start of `rest` (everything from it to the end of the
/// file) is a write cut short by a crash rather than corruption: its frame runs past the end of
/// the file ([`Bad::Short`]), or nothing but zero bytes is left (a file extended and never
/// written, as some filesystems leave after a power cut). A whole record that fails its CRC or
/// does not parse is corruption, even at the very end of the file: it was written in full, so
/// it may have been acknowledged. The caller also checks that no valid record follows.
pub fn torn_tail(rest: &[u8], bad: Bad) -> bool {
    bad == Bad::Short || rest.iter().all(|&b| b == 0)
}

/// Whether a verified frame holding a message with a sequence in `range` starts anywhere after
/// `pos`: a bad record followed by good ones is corruption in the middle, not a torn tail.
pub fn good_message_after(buf: &[u8], pos: usize, range: std::ops::Range<u64>) -> bool {
    let mut p = pos + 1;
    while p + FRAME_BYTES + 9 <= buf.len() {
        let kind = buf[p + FRAME_BYTES];
        if kind == KIND_MESSAGE {
            let s = &buf[p + FRAME_BYTES + 1..p + FRAME_BYTES + 9];
            let seq = u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
            if range.contains(&seq) && read_frame(buf, p).is_ok() {
                return true;
            }
        }
        p += 1;
    }
    false
}

/// Whether any verified journal frame starts after `pos` (see [`good_message_after`]).
pub fn good_event_after(buf: &[u8], pos: usize) -> bool {
    let mut p = pos + 1;
    while p + FRAME_BYTES < buf.len() {
        if (KIND_CREATE..=KIND_DONE).contains(&buf[p + FRAME_BYTES]) && read_frame(buf, p).is_ok() {
            return true;
        }
        p += 1;
    }
    false
}

/// A cursor over a body.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Bad> {
        let s = self.b.get(self.at..self.at + n).ok_or(Bad::Malformed)?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, Bad> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Bad> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, Bad> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Result<u64, Bad> {
        let s = self.take(8)?;
        Ok(u64::from_le_bytes([
            s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7],
        ]))
    }
    fn str16(&mut self) -> Result<&'a str, Bad> {
        let n = usize::from(self.u16()?);
        std::str::from_utf8(self.take(n)?).map_err(|_| Bad::Malformed)
    }
    fn bytes32(&mut self) -> Result<&'a [u8], Bad> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// The sequence of a message record's body, without parsing the rest; `None` for another kind
/// of record.
pub fn message_sequence(body: &[u8]) -> Option<u64> {
    match body {
        [KIND_MESSAGE, s @ ..] => s
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes),
        _ => None,
    }
}

/// A message read back from a segment.
#[derive(Debug)]
pub struct StoredMessage {
    /// Its sequence.
    pub sequence: u64,
    /// When it was accepted.
    pub sent_at: SystemTime,
    /// Its dedup id, if it was sent with one.
    pub message_id: Option<String>,
    /// Its headers.
    pub headers: Headers,
    /// Its payload (copied out of the read buffer); empty from [`decode_message_index`].
    pub payload: Bytes,
    /// Bytes charged to retention: payload + headers + 128.
    pub size: usize,
}

/// Parses a message body.
///
/// # Errors
/// [`Bad::Malformed`] when it is not a well-formed message record.
pub fn decode_message(body: &[u8]) -> Result<StoredMessage, Bad> {
    decode(body, true)
}

/// [`decode_message`] without copying the payload (start-up builds an index-only entry; the
/// payload is read back from the segment when needed).
///
/// # Errors
/// As [`decode_message`].
pub fn decode_message_index(body: &[u8]) -> Result<StoredMessage, Bad> {
    decode(body, false)
}

fn decode(body: &[u8], with_payload: bool) -> Result<StoredMessage, Bad> {
    let mut r = Reader { b: body, at: 0 };
    if r.u8()? != KIND_MESSAGE {
        return Err(Bad::Malformed);
    }
    let sequence = r.u64()?;
    let sent_at = UNIX_EPOCH + Duration::from_nanos(r.u64()?);
    let id = r.str16()?;
    let n = r.u16()?;
    let mut headers = Headers::new();
    let mut header_bytes = 0;
    for _ in 0..n {
        let k = r.str16()?;
        let v = std::str::from_utf8(r.bytes32()?).map_err(|_| Bad::Malformed)?;
        header_bytes += k.len() + v.len();
        if with_payload {
            headers.insert(k.to_string(), v.to_string());
        }
    }
    let raw = r.bytes32()?;
    let payload = if with_payload {
        Bytes::copy_from_slice(raw)
    } else {
        Bytes::new()
    };
    Ok(StoredMessage {
        sequence,
        sent_at,
        message_id: (!id.is_empty()).then(|| id.to_string()),
        headers,
        payload,
        size: raw.len() + header_bytes + crate::config::MESSAGE_OVERHEAD_BYTES,
    })
}

/// What a consumer group did, as its address's journal records it. Replayed in order at start,
/// these rebuild every named group: its settings, its position and, for a group with
/// acknowledgements, which messages were handed out and not yet acknowledged (and how often).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// CreateGroup made the group with these settings, handing out `next` first.
    Create {
        /// The group.
        group: String,
        /// Its settings.
        settings: GroupSettings,
        /// The sequence it hands out next.
        next: u64,
    },
    /// DeleteGroup removed it.
    Delete {
        /// The group.
        group: String,
    },
    /// It will hand out `next` next (creates a group made by its first read).
    Position {
        /// The group.
        group: String,
        /// The sequence it hands out next.
        next: u64,
    },
    /// `sequence` was handed out for the `attempt`th time and awaits an acknowledgement.
    Lease {
        /// The group.
        group: String,
        /// The message.
        sequence: u64,
        /// Deliveries so far.
        attempt: u32,
    },
    /// These messages are finished with (acknowledged or dead-lettered): never delivered again.
    Done {
        /// The group.
        group: String,
        /// The messages.
        sequences: Vec<u64>,
    },
}

fn put_start(b: &mut Vec<u8>, s: StartAt) {
    let (tag, v) = match s {
        StartAt::End => (0u8, 0),
        StartAt::Sequence(n) => (1, n),
        StartAt::Time(t) => (2, nanos(t)),
    };
    b.push(tag);
    b.extend_from_slice(&v.to_le_bytes());
}

impl GroupEvent {
    /// Appends the event as a framed journal record.
    pub fn encode(&self, out: &mut Vec<u8>) {
        frame(out, |b| match self {
            Self::Create {
                group,
                settings,
                next,
            } => {
                b.push(KIND_CREATE);
                put_str16(b, group);
                b.extend_from_slice(&next.to_le_bytes());
                put_start(b, settings.start);
                match &settings.ack {
                    None => b.push(0),
                    Some(a) => {
                        b.push(1);
                        let ms = u64::try_from(a.ack_wait.as_millis()).unwrap_or(u64::MAX);
                        b.extend_from_slice(&ms.to_le_bytes());
                        b.extend_from_slice(&a.max_deliveries.to_le_bytes());
                        b.extend_from_slice(&a.max_ack_pending.to_le_bytes());
                        put_str16(b, a.dead_letter.as_ref().map_or("", |d| d.as_str()));
                    }
                }
            }
            Self::Delete { group } => {
                b.push(KIND_DELETE);
                put_str16(b, group);
            }
            Self::Position { group, next } => {
                b.push(KIND_POSITION);
                put_str16(b, group);
                b.extend_from_slice(&next.to_le_bytes());
            }
            Self::Lease {
                group,
                sequence,
                attempt,
            } => {
                b.push(KIND_LEASE);
                put_str16(b, group);
                b.extend_from_slice(&sequence.to_le_bytes());
                b.extend_from_slice(&attempt.to_le_bytes());
            }
            Self::Done { group, sequences } => {
                b.push(KIND_DONE);
                put_str16(b, group);
                b.extend_from_slice(&u32::try_from(sequences.len()).unwrap_or(0).to_le_bytes());
                for s in sequences {
                    b.extend_from_slice(&s.to_le_bytes());
                }
            }
        });
    }

    /// Parses a journal body.
    ///
    /// # Errors
    /// [`Bad::Malformed`] when it is not a well-formed journal record.
    pub fn decode(body: &[u8]) -> Result<Self, Bad> {
        let mut r = Reader { b: body, at: 0 };
        let kind = r.u8()?;
        let group = r.str16()?.to_string();
        Ok(match kind {
            KIND_CREATE => {
                let next = r.u64()?;
                let tag = r.u8()?;
                let v = r.u64()?;
                let start = match tag {
                    0 => StartAt::End,
                    1 => StartAt::Sequence(v),
                    2 => StartAt::Time(UNIX_EPOCH + Duration::from_nanos(v)),
                    _ => return Err(Bad::Malformed),
                };
                let ack = match r.u8()? {
                    0 => None,
                    _ => {
                        let ack_wait = Duration::from_millis(r.u64()?);
                        let max_deliveries = r.u32()?;
                        let max_ack_pending = r.u32()?;
                        let dl = r.str16()?;
                        let dead_letter = if dl.is_empty() {
                            None
                        } else {
                            Some(Address::parse(dl).map_err(|_| Bad::Malformed)?)
                        };
                        Some(AckPolicy {
                            ack_wait,
                            max_deliveries,
                            dead_letter,
                            max_ack_pending,
                        })
                    }
                };
                Self::Create {
                    group,
                    settings: GroupSettings { start, ack },
                    next,
                }
            }
            KIND_DELETE => Self::Delete { group },
            KIND_POSITION => Self::Position {
                group,
                next: r.u64()?,
            },
            KIND_LEASE => Self::Lease {
                group,
                sequence: r.u64()?,
                attempt: r.u32()?,
            },
            KIND_DONE => {
                let n = r.u32()? as usize;
                let mut sequences = Vec::with_capacity(n.min(body.len() / 8));
                for _ in 0..n {
                    sequences.push(r.u64()?);
                }
                Self::Done { group, sequences }
            }
            _ => return Err(Bad::Malformed),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn message(seq: u64, payload: &'static [u8]) -> Message {
        let mut headers = Headers::new();
        headers.insert("k".into(), "v".into());
        Message {
            address: Arc::from("a"),
            sequence: seq,
            payload: Bytes::from_static(payload),
            headers,
            sent_at: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            size: 0,
        }
    }

    #[test]
    fn message_round_trips_and_damage_is_detected() {
        let mut buf = Vec::new();
        encode_message(&mut buf, &message(7, b"hello"), Some("id-1"));
        let end = buf.len();
        encode_message(&mut buf, &message(8, b"world"), None);
        let (body, next) = read_frame(&buf, 0).unwrap();
        assert_eq!(next, end);
        let m = decode_message(body).unwrap();
        assert_eq!(m.sequence, 7);
        assert_eq!(&m.payload[..], b"hello");
        assert_eq!(m.message_id.as_deref(), Some("id-1"));
        assert_eq!(m.headers.get("k").map(String::as_str), Some("v"));
        assert_eq!(m.sent_at, message(7, b"").sent_at);
        // Cut short, and one flipped byte.
        assert_eq!(read_frame(&buf[..end - 1], 0), Err(Bad::Short));
        let mut flipped = buf.clone();
        flipped[end - 2] ^= 1;
        assert_eq!(read_frame(&flipped, 0), Err(Bad::Checksum));
        assert!(
            good_message_after(&flipped, 0, 8..9),
            "record 8 follows the bad one"
        );
        assert!(!good_message_after(&flipped, end, 8..9));
    }

    #[test]
    fn only_a_frame_past_the_end_of_the_file_or_zeros_is_a_torn_tail() {
        let mut buf = Vec::new();
        encode_message(&mut buf, &message(7, b"hello"), None);
        let whole = buf.len();
        // Cut anywhere inside: the declared length runs past the end.
        for cut in 1..whole {
            let bad = read_frame(&buf[..cut], 0).unwrap_err();
            assert_eq!(bad, Bad::Short, "cut at {cut}");
            assert!(torn_tail(&buf[..cut], bad), "cut at {cut}");
        }
        // Whole, one bit flipped in the payload or the CRC: corruption.
        for at in [whole - 1, 5] {
            let mut flipped = buf.clone();
            flipped[at] ^= 0x40;
            let bad = read_frame(&flipped, 0).unwrap_err();
            assert_eq!(bad, Bad::Checksum);
            assert!(!torn_tail(&flipped, bad), "flip at {at}");
        }
        // Zeros (len 0): no record was written there.
        let zeros = [0u8; 64];
        let bad = read_frame(&zeros, 0).unwrap_err();
        assert!(torn_tail(&zeros, bad));
        // A CRC-valid body that does not parse is corruption.
        assert!(!torn_tail(&buf, Bad::Malformed));
    }

    #[test]
    fn group_events_round_trip() {
        let events = [
            GroupEvent::Create {
                group: "g".into(),
                settings: GroupSettings {
                    start: StartAt::Sequence(3),
                    ack: Some(AckPolicy {
                        ack_wait: Duration::from_secs(30),
                        max_deliveries: 5,
                        dead_letter: Some(Address::parse("dlq").unwrap()),
                        max_ack_pending: 100,
                    }),
                },
                next: 3,
            },
            GroupEvent::Position {
                group: "g".into(),
                next: 9,
            },
            GroupEvent::Lease {
                group: "g".into(),
                sequence: 4,
                attempt: 2,
            },
            GroupEvent::Done {
                group: "g".into(),
                sequences: vec![4, 5],
            },
            GroupEvent::Delete { group: "g".into() },
        ];
        let mut buf = Vec::new();
        for e in &events {
            e.encode(&mut buf);
        }
        let mut pos = 0;
        for e in &events {
            let (body, next) = read_frame(&buf, pos).unwrap();
            assert_eq!(&GroupEvent::decode(body).unwrap(), e);
            pos = next;
        }
        assert_eq!(pos, buf.len());
    }
}
