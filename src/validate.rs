//! Pure request checks. [`Address`] and [`Group`] can only be built here, so the core never sees
//! an unchecked name.
//!
//! Every check returns a [`BrokerError`] naming the field and the limit, and none has side
//! effects: a rejected request changes no state.

use std::{collections::HashMap, fmt, time::Duration};

use crate::{
    config::Limits,
    engine::{AckPolicy, StartAt},
    error::BrokerError,
};

/// Longest address or group name, in bytes of UTF-8.
pub const MAX_NAME_BYTES: usize = 255;
/// Most headers one message may carry.
pub const MAX_HEADERS: usize = 64;
/// Most bytes of header keys plus values one message may carry (16 KiB).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most messages one Recv may return.
pub const MAX_RECV_MESSAGES: u32 = 1000;
/// Longest Recv `wait`.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// Message headers: string keys to string values.
pub type Headers = HashMap<String, String>;

/// A checked address: 1–255 bytes of UTF-8, no whitespace, control or invisible format
/// characters (Unicode category Cf: zero-width, bidirectional, byte-order marks), and none of
/// the reserved wildcard characters `*` and `>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Address(String);

/// A checked consumer-group name: 0–255 bytes, no whitespace or control characters. The empty
/// name is the address's default group.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Group(String);

impl Address {
    /// Checks `name` as the `address` field.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] (`INVALID_ARGUMENT`) naming `address` when the name is empty,
    /// longer than 255 bytes, has whitespace or control characters, or uses `*` or `>` (reserved
    /// for wildcard subscriptions).
    pub fn parse(name: impl Into<String>) -> Result<Self, BrokerError> {
        let name = name.into();
        Self::check(&name)?;
        Ok(Self(name))
    }

    /// The checks of [`Address::parse`] without taking the name.
    ///
    /// # Errors
    /// As [`Address::parse`].
    pub fn check(name: &str) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::invalid(
                "address",
                "must not be empty (1-255 bytes)",
            ));
        }
        // The common case, printable ASCII without wildcards, in one pass over the bytes.
        if name.len() <= MAX_NAME_BYTES
            && name
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'>')
        {
            return Ok(());
        }
        check_name("address", name)?;
        if let Some(c) = name.chars().find(|c| matches!(c, '*' | '>')) {
            return Err(BrokerError::invalid(
                "address",
                format!("{c:?} is reserved for wildcard subscriptions and may not be used"),
            ));
        }
        Ok(())
    }

    /// Wraps a name that passed [`Address::check`].
    pub(crate) fn checked(name: String) -> Self {
        Self(name)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Group {
    /// Checks `name` as the `group` field; empty is the default group.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] naming `group` when the name is longer than 255 bytes or has
    /// whitespace or control characters.
    pub fn parse(name: impl Into<String>) -> Result<Self, BrokerError> {
        let name = name.into();
        check_name("group", &name)?;
        Ok(Self(name))
    }

    /// The name; empty for the default group.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this is the address's default group (`""`).
    pub fn is_default(&self) -> bool {
        self.0.is_empty()
    }
}

fn check_name(field: &'static str, name: &str) -> Result<(), BrokerError> {
    if name.len() > MAX_NAME_BYTES {
        return Err(BrokerError::invalid(
            field,
            format!(
                "{} bytes is longer than the limit of {MAX_NAME_BYTES} bytes",
                name.len()
            ),
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_whitespace() || c.is_control()) {
        return Err(BrokerError::invalid(
            field,
            format!("must not contain whitespace or control characters (found {c:?})"),
        ));
    }
    // Invisible format characters (zero-width spaces and joiners, bidirectional overrides and
    // isolates, the byte order mark, soft hyphens: Unicode general category Cf) would let two
    // names look alike, or one look like another, in the console and the logs.
    if let Some(c) = name.chars().find(|&c| {
        unicode_properties::UnicodeGeneralCategory::general_category(c)
            == unicode_properties::GeneralCategory::Format
    }) {
        return Err(BrokerError::invalid(
            field,
            format!(
                "must not contain invisible format characters (found U+{:04X}: zero-width, bidirectional or byte-order marks)",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}

/// A checked subscription pattern in NATS subject syntax: 1–255 bytes, no whitespace or
/// control characters, tokens separated by `.` and none empty; `*` (exactly one token) and `>`
/// (one or more tokens, last only) stand alone as whole tokens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern(String);

impl Pattern {
    /// Whether `name` uses the wildcard characters (so Subscribe treats it as a pattern).
    pub fn is_pattern(name: &str) -> bool {
        name.contains(['*', '>'])
    }

    /// Checks `name` as a Subscribe `address` pattern.
    ///
    /// # Errors
    /// [`BrokerError::Invalid`] naming `address`: empty, too long, whitespace or control
    /// characters, an empty token, `*` or `>` inside a token, or `>` before the last token.
    pub fn parse(name: impl Into<String>) -> Result<Self, BrokerError> {
        let name = name.into();
        if name.is_empty() {
            return Err(BrokerError::invalid(
                "address",
                "must not be empty (1-255 bytes)",
            ));
        }
        check_name("address", &name)?;
        let tokens: Vec<&str> = name.split('.').collect();
        for (i, t) in tokens.iter().enumerate() {
            if t.is_empty() {
                return Err(BrokerError::invalid(
                    "address",
                    "a pattern's tokens (between dots) must not be empty",
                ));
            }
            if t.contains(['*', '>']) && *t != "*" && *t != ">" {
                return Err(BrokerError::invalid(
                    "address",
                    format!("{t:?}: `*` and `>` must be whole tokens (e.g. orders.*.created, metrics.>)"),
                ));
            }
            if *t == ">" && i + 1 != tokens.len() {
                return Err(BrokerError::invalid(
                    "address",
                    "`>` may only be the last token of a pattern",
                ));
            }
        }
        Ok(Self(name))
    }

    /// The pattern.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Checks a payload's size against `--max-message-bytes`.
///
/// # Errors
/// [`BrokerError::TooLarge`] (`RESOURCE_EXHAUSTED`) naming `payload` and the limit.
pub fn payload(len: usize, limits: &Limits) -> Result<(), BrokerError> {
    if len > limits.max_message_bytes {
        return Err(BrokerError::TooLarge {
            field: "payload",
            actual: len,
            limit: limits.max_message_bytes,
            limit_name: "--max-message-bytes",
        });
    }
    Ok(())
}

/// Checks headers: at most [`MAX_HEADERS`] entries, non-empty keys, and at most
/// [`MAX_HEADER_BYTES`] of keys plus values. Returns their size in bytes.
///
/// # Errors
/// [`BrokerError::Invalid`] naming `headers` for too many entries or an empty key;
/// [`BrokerError::TooLarge`] naming `headers` when they are larger than 16 KiB.
pub fn headers(headers: &Headers) -> Result<usize, BrokerError> {
    if headers.len() > MAX_HEADERS {
        return Err(BrokerError::invalid(
            "headers",
            format!(
                "{} entries is more than the limit of {MAX_HEADERS}",
                headers.len()
            ),
        ));
    }
    if headers.keys().any(String::is_empty) {
        return Err(BrokerError::invalid("headers", "keys must not be empty"));
    }
    let bytes = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_HEADER_BYTES {
        return Err(BrokerError::TooLarge {
            field: "headers",
            actual: bytes,
            limit: MAX_HEADER_BYTES,
            limit_name: "16 KiB of keys plus values",
        });
    }
    Ok(bytes)
}

/// A Recv's `max_bytes` when the request leaves it 0: 4 MiB, the receive limit gRPC clients
/// have by default, so that a default client can always decode the batch.
pub const DEFAULT_RECV_MAX_BYTES: usize = 4 * 1024 * 1024;

/// The byte budget of a Recv batch: `max_bytes` (0 means [`DEFAULT_RECV_MAX_BYTES`]), at most
/// `ceiling` (the broker's largest response, [`crate::config::Limits::grpc_message_bytes`]).
pub fn recv_max_bytes(max_bytes: u32, ceiling: usize) -> usize {
    let asked = match max_bytes {
        0 => DEFAULT_RECV_MAX_BYTES,
        n => usize::try_from(n).unwrap_or(usize::MAX),
    };
    asked.min(ceiling)
}

/// Checks `max_messages`: 0 means 1, at most [`MAX_RECV_MESSAGES`]. Returns the effective count.
///
/// # Errors
/// [`BrokerError::Invalid`] naming `max_messages` when it is above 1000.
pub fn max_messages(n: u32) -> Result<usize, BrokerError> {
    if n > MAX_RECV_MESSAGES {
        return Err(BrokerError::invalid(
            "max_messages",
            format!("{n} is more than the limit of {MAX_RECV_MESSAGES}"),
        ));
    }
    Ok(usize::try_from(n.max(1)).unwrap_or(1))
}

/// Checks Recv's `wait`: unset is zero; negative, malformed or above [`MAX_WAIT`] is refused.
///
/// # Errors
/// [`BrokerError::Invalid`] naming `wait` with the allowed range.
pub fn wait(wait: Option<&prost_types::Duration>) -> Result<Duration, BrokerError> {
    let Some(w) = wait else {
        return Ok(Duration::ZERO);
    };
    let range = "must be between 0 and 60s";
    if w.seconds < 0 || w.nanos < 0 {
        return Err(BrokerError::invalid(
            "wait",
            format!("{}s{}ns is negative; {range}", w.seconds, w.nanos),
        ));
    }
    if w.nanos >= 1_000_000_000 {
        return Err(BrokerError::invalid(
            "wait",
            format!("nanos {} is out of range 0..999999999", w.nanos),
        ));
    }
    let secs = u64::try_from(w.seconds).unwrap_or(u64::MAX);
    let nanos = u32::try_from(w.nanos).unwrap_or(0);
    let d = Duration::new(secs, nanos);
    if d > MAX_WAIT {
        return Err(BrokerError::invalid(
            "wait",
            format!("{d:?} is longer than the limit of 60s"),
        ));
    }
    Ok(d)
}

/// Checks a start position (`start_sequence`, `start_time` of Subscribe and CreateGroup):
/// neither set is [`StartAt::End`]; both set, or a malformed or pre-1970 `start_time`, is
/// refused.
///
/// # Errors
/// [`BrokerError::Invalid`] naming `start_sequence` / `start_time`.
pub fn start(
    start_sequence: u64,
    start_time: Option<&prost_types::Timestamp>,
) -> Result<StartAt, BrokerError> {
    match (start_sequence, start_time) {
        (0, None) => Ok(StartAt::End),
        (n, None) => Ok(StartAt::Sequence(n)),
        (0, Some(t)) => {
            if !(0..1_000_000_000).contains(&t.nanos) {
                return Err(BrokerError::invalid(
                    "start_time",
                    format!("nanos {} is out of range 0..999999999", t.nanos),
                ));
            }
            let secs = u64::try_from(t.seconds).map_err(|_| {
                BrokerError::invalid(
                    "start_time",
                    format!("{}s is before 1970-01-01T00:00:00Z", t.seconds),
                )
            })?;
            if secs > MAX_TIMESTAMP_SECONDS {
                return Err(BrokerError::invalid(
                    "start_time",
                    format!(
                        "{}s is after 9999-12-31T23:59:59Z, the last time a protobuf Timestamp holds",
                        t.seconds
                    ),
                ));
            }
            let nanos = u32::try_from(t.nanos).unwrap_or(0);
            std::time::UNIX_EPOCH
                .checked_add(Duration::new(secs, nanos))
                .map(StartAt::Time)
                .ok_or_else(|| {
                    BrokerError::invalid("start_time", format!("{}s is out of range", t.seconds))
                })
        }
        (_, Some(_)) => Err(BrokerError::invalid(
            "start_sequence",
            "set start_sequence or start_time, not both",
        )),
    }
}

/// Seconds since the Unix epoch of 9999-12-31T23:59:59Z, the last second a
/// `google.protobuf.Timestamp` may hold (its documented range; RFC 3339 has four-digit years).
pub const MAX_TIMESTAMP_SECONDS: u64 = 253_402_300_799;

/// Shortest `ack_wait`.
pub const MIN_ACK_WAIT: Duration = Duration::from_secs(1);
/// Longest `ack_wait`, and longest Nack `delay`.
pub const MAX_ACK_WAIT: Duration = Duration::from_secs(12 * 3600);
/// `max_ack_pending` when the request leaves it 0.
pub const DEFAULT_MAX_ACK_PENDING: u32 = 1000;
/// Largest `max_ack_pending`.
pub const MAX_ACK_PENDING: u32 = 100_000;

fn duration(field: &'static str, d: &prost_types::Duration) -> Result<Duration, BrokerError> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err(BrokerError::invalid(
            field,
            format!(
                "{}s{}ns is not a valid non-negative duration",
                d.seconds, d.nanos
            ),
        ));
    }
    let secs = u64::try_from(d.seconds).unwrap_or(u64::MAX);
    Ok(Duration::new(secs, u32::try_from(d.nanos).unwrap_or(0)))
}

/// Checks CreateGroup's delivery settings: `ack_wait` (unset or 0: no acknowledgements; else
/// 1 s to 12 h), `max_deliveries` (needs `ack_wait`), `dead_letter_address` (an address; needs
/// `max_deliveries`), `max_ack_pending` (0 means 1,000; at most 100,000; needs `ack_wait`).
///
/// # Errors
/// [`BrokerError::Invalid`] naming the field and its range.
pub fn ack_policy(
    ack_wait: Option<&prost_types::Duration>,
    max_deliveries: u32,
    dead_letter_address: &str,
    max_ack_pending: u32,
) -> Result<Option<AckPolicy>, BrokerError> {
    let wait = ack_wait
        .map(|d| duration("ack_wait", d))
        .transpose()?
        .unwrap_or(Duration::ZERO);
    if wait.is_zero() {
        for (set, field) in [
            (max_deliveries != 0, "max_deliveries"),
            (!dead_letter_address.is_empty(), "dead_letter_address"),
            (max_ack_pending != 0, "max_ack_pending"),
        ] {
            if set {
                return Err(BrokerError::invalid(
                    field,
                    "needs ack_wait (acknowledged delivery); set ack_wait to 1s-12h",
                ));
            }
        }
        return Ok(None);
    }
    if !(MIN_ACK_WAIT..=MAX_ACK_WAIT).contains(&wait) {
        return Err(BrokerError::invalid(
            "ack_wait",
            format!("{wait:?} is out of range: 1s to 12h (0 for no acknowledgements)"),
        ));
    }
    let dead_letter = if dead_letter_address.is_empty() {
        None
    } else {
        if max_deliveries == 0 {
            return Err(BrokerError::invalid(
                "dead_letter_address",
                "needs max_deliveries > 0 (when to dead-letter)",
            ));
        }
        let a = Address::check(dead_letter_address).map_err(|e| match e {
            BrokerError::Invalid { reason, .. } => {
                BrokerError::invalid("dead_letter_address", reason)
            }
            other => other,
        });
        a?;
        Some(Address::checked(dead_letter_address.to_string()))
    };
    if max_ack_pending > MAX_ACK_PENDING {
        return Err(BrokerError::invalid(
            "max_ack_pending",
            format!("{max_ack_pending} is above the limit of {MAX_ACK_PENDING} (0 means {DEFAULT_MAX_ACK_PENDING})"),
        ));
    }
    Ok(Some(AckPolicy {
        ack_wait: wait,
        max_deliveries,
        dead_letter,
        max_ack_pending: if max_ack_pending == 0 {
            DEFAULT_MAX_ACK_PENDING
        } else {
            max_ack_pending
        },
    }))
}

/// Checks Nack's `delay`: unset is zero; at most 12 h.
///
/// # Errors
/// [`BrokerError::Invalid`] naming `delay`.
pub fn nack_delay(delay: Option<&prost_types::Duration>) -> Result<Duration, BrokerError> {
    let d = delay
        .map(|d| duration("delay", d))
        .transpose()?
        .unwrap_or(Duration::ZERO);
    if d > MAX_ACK_WAIT {
        return Err(BrokerError::invalid(
            "delay",
            format!("{d:?} is longer than the limit of 12h"),
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn start_rules() {
        use prost_types::Timestamp;
        assert_eq!(start(0, None), Ok(StartAt::End));
        assert_eq!(start(7, None), Ok(StartAt::Sequence(7)));
        let t = Timestamp {
            seconds: 10,
            nanos: 5,
        };
        assert_eq!(
            start(0, Some(&t)),
            Ok(StartAt::Time(std::time::UNIX_EPOCH + Duration::new(10, 5)))
        );
        let both = start(1, Some(&t)).unwrap_err();
        assert!(both.to_string().starts_with("start_sequence:"), "{both}");
        for bad in [
            Timestamp {
                seconds: -1,
                nanos: 0,
            },
            Timestamp {
                seconds: 1,
                nanos: -1,
            },
            Timestamp {
                seconds: 1,
                nanos: 1_000_000_000,
            },
        ] {
            let e = start(0, Some(&bad)).unwrap_err();
            assert!(e.to_string().starts_with("start_time:"), "{e}");
        }
    }

    #[test]
    fn address_rules() {
        assert!(Address::parse("orders.eu-1").is_ok());
        assert!(Address::parse("ü").is_ok());
        assert!(Address::parse("a".repeat(255)).is_ok());
        for bad in ["", "a b", "a\tb", "a\u{7}", "a.*", "a.>", &"a".repeat(256)] {
            let e = Address::parse(bad).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument);
            assert!(e.to_string().starts_with("address: "), "{e}");
        }
    }

    #[test]
    fn group_rules() {
        assert!(Group::parse("").unwrap().is_default());
        assert!(Group::parse("workers").is_ok());
        assert!(Group::parse("w k")
            .unwrap_err()
            .to_string()
            .starts_with("group: "));
        assert!(Group::parse("g".repeat(256)).is_err());
    }

    #[test]
    fn wait_rules() {
        let d = |seconds, nanos| prost_types::Duration { seconds, nanos };
        assert_eq!(wait(None).unwrap(), Duration::ZERO);
        assert_eq!(wait(Some(&d(60, 0))).unwrap(), MAX_WAIT);
        assert_eq!(wait(Some(&d(1, 500))).unwrap(), Duration::new(1, 500));
        for bad in [d(-1, 0), d(0, -1), d(60, 1), d(0, 1_000_000_000)] {
            assert!(wait(Some(&bad))
                .unwrap_err()
                .to_string()
                .starts_with("wait: "));
        }
    }

    #[test]
    fn max_messages_rules() {
        assert_eq!(max_messages(0).unwrap(), 1);
        assert_eq!(max_messages(1000).unwrap(), 1000);
        assert!(max_messages(1001).is_err());
    }

    #[test]
    fn header_rules() {
        let mut h = Headers::new();
        h.insert("k".into(), "v".repeat(10));
        assert_eq!(headers(&h).unwrap(), 11);
        h.insert(String::new(), "x".into());
        assert!(headers(&h).is_err());
        let many: Headers = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(
            headers(&many).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let mut big = Headers::new();
        big.insert("k".into(), "v".repeat(MAX_HEADER_BYTES));
        assert_eq!(
            headers(&big).unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
    }

    proptest! {
        #[test]
        fn address_accepts_exactly_the_rule(name in "\\PC{0,300}|[ a-z*>\t]{0,8}|[\\x00-\\x7f]{0,8}|[a-z\u{AD}\u{200B}-\u{200F}\u{202A}-\u{202E}\u{2066}-\u{2069}\u{FEFF}\u{E0001}]{0,8}") {
            let format = |c: char| matches!(c, '\u{AD}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}' | '\u{E0001}');
            let ok = !name.is_empty()
                && name.len() <= MAX_NAME_BYTES
                && !name.chars().any(|c| c.is_whitespace() || c.is_control() || format(c) || c == '*' || c == '>');
            prop_assert_eq!(Address::parse(name).is_ok(), ok);
        }

        #[test]
        fn wait_never_panics(seconds in any::<i64>(), nanos in any::<i32>()) {
            let r = wait(Some(&prost_types::Duration { seconds, nanos }));
            if let Ok(d) = r { prop_assert!(d <= MAX_WAIT); }
        }
    }
}
