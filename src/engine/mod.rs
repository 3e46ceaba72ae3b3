//! The engine boundary: where an address's log (its messages, in sequence order, within
//! retention) and its consumer groups' state live. Everything above it (the [`Broker`] handle,
//! subscriptions, the gRPC services, Admin) talks only to [`Engine`] and [`Log`].
//!
//! The split follows NATS JetStream's `StreamStore` / `ConsumerStore` and Centrifuge's `Broker`
//! interface, kept to what our RPCs need:
//! - **log**: append (assigns the sequence and `sent_at`), read from a sequence or a time, evict
//!   by count, bytes, age and the broker-wide byte bound;
//! - **groups**: create at a start position, delete, take the next messages (cursor + the exact
//!   count lost to retention);
//! - **wake-ups**: a [`tokio::sync::Notify`] per address, woken after every append and on
//!   deletions, for waiting Recv calls, group streams and caught-up subscribers.
//!
//! Dispatch is an enum with inherent methods, not a trait object: the Send path pays one
//! `match` on a single variant, no boxed future. The in-memory engine is the first
//! implementation; a disk engine and a Redis Streams engine add variants and pass the same
//! conformance tests (`conformance.rs`).
//!
//! Invariants every engine keeps: sequences per address are dense and increasing from 1;
//! reading never removes a message (retention does); a reader behind the window is told the
//! exact number it lost; nothing in `engine/` imports the gRPC layer.
//!
//! [`Broker`]: crate::broker::Broker

#[cfg(test)]
mod conformance;
pub mod disk;
pub mod memory;
pub mod redis;

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
    time::SystemTime,
};

use bytes::Bytes;
use tokio::sync::{oneshot, Notify};

use crate::{
    config::Limits,
    error::BrokerError,
    message::{Message, WireFrame},
    metrics::Metrics,
    validate::{Address, Headers, Pattern},
};
use memory::{AddressLog, MemoryEngine};

/// Resolves when what an operation wrote is on stable storage: the disk engine's flusher has
/// written and fsynced it (group commit), or the Redis engine's script has run (then it also
/// carries the sequence Redis assigned). In the memory engine it is done at once. A caller
/// answers its client only after [`Durable::wait`] returns `Ok`.
#[derive(Debug, Default)]
#[must_use = "answer the client only once the write is durable"]
pub struct Durable(Option<Wait>);

#[derive(Debug)]
enum Wait {
    /// The disk engine's flush.
    Flush(oneshot::Receiver<Result<(), String>>),
    /// A Redis append, answered with what it assigned.
    Append(oneshot::Receiver<Result<Vec<Appended>, BrokerError>>),
}

impl Durable {
    /// Nothing to wait for.
    pub fn done() -> Self {
        Self(None)
    }

    pub(crate) fn pending(rx: oneshot::Receiver<Result<(), String>>) -> Self {
        Self(Some(Wait::Flush(rx)))
    }

    /// Resolves with the sequences a remote engine (Redis) assigned.
    pub(crate) fn appending(rx: oneshot::Receiver<Result<Vec<Appended>, BrokerError>>) -> Self {
        Self(Some(Wait::Append(rx)))
    }

    /// Whether there is nothing to wait for.
    pub fn is_done(&self) -> bool {
        self.0.is_none()
    }

    /// Polls for durability (for hand-written streams such as SendStream's responses).
    ///
    /// # Errors
    /// [`BrokerError::Storage`] when the write failed: nothing of it is kept.
    pub fn poll_durable(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BrokerError>> {
        self.poll_appended(cx).map(|r| r.map(|_| ()))
    }

    /// [`Durable::poll_durable`], also giving what a remote engine assigned (`None`: the
    /// caller already has it from the append).
    ///
    /// # Errors
    /// As [`Durable::poll_durable`], or the remote engine's refusal.
    pub fn poll_appended(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Vec<Appended>>, BrokerError>> {
        let r = match self.0.as_mut() {
            None => return Poll::Ready(Ok(None)),
            Some(Wait::Flush(rx)) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(Ok(()))) => Ok(None),
                Poll::Ready(Ok(Err(e))) => Err(BrokerError::Storage(e)),
                Poll::Ready(Err(_)) => Err(BrokerError::Storage("the flusher stopped".into())),
            },
            Some(Wait::Append(rx)) => match Pin::new(rx).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(r)) => r.map(Some),
                Poll::Ready(Err(_)) => Err(BrokerError::Storage("redis: append abandoned".into())),
            },
        };
        self.0 = None;
        Poll::Ready(r)
    }

    /// Waits until the write is durable.
    ///
    /// # Errors
    /// [`BrokerError::Storage`] when it failed: nothing of it is kept.
    pub async fn wait(mut self) -> Result<(), BrokerError> {
        std::future::poll_fn(|cx| self.poll_durable(cx)).await
    }

    /// [`Durable::wait`], giving what a remote engine assigned.
    ///
    /// # Errors
    /// As [`Durable::poll_appended`].
    pub async fn wait_appended(mut self) -> Result<Option<Vec<Appended>>, BrokerError> {
        std::future::poll_fn(|cx| self.poll_appended(cx)).await
    }

    /// [`Durable::wait`] for callers outside an async runtime (tests, tools).
    ///
    /// # Errors
    /// As [`Durable::wait`].
    pub fn wait_blocking(self) -> Result<(), BrokerError> {
        let Some(wait) = self.0 else {
            return Ok(());
        };
        // On a thread of its own: blocking inside an async runtime's thread is not allowed.
        match wait {
            Wait::Flush(rx) => {
                let r = std::thread::scope(|s| s.spawn(|| rx.blocking_recv()).join());
                match r {
                    Ok(Ok(Ok(()))) => Ok(()),
                    Ok(Ok(Err(e))) => Err(BrokerError::Storage(e)),
                    _ => Err(BrokerError::Storage("the flusher stopped".into())),
                }
            }
            Wait::Append(rx) => {
                let r = std::thread::scope(|s| s.spawn(|| rx.blocking_recv()).join());
                match r {
                    Ok(Ok(r)) => r.map(|_| ()),
                    _ => Err(BrokerError::Storage("redis: append abandoned".into())),
                }
            }
        }
    }
}

/// A message handed to a fan-out subscriber, with its shared wire frame when one exists.
pub type Delivery = (Arc<Message>, Option<WireFrame>);

/// Where a reader (a fan-out stream or a consumer group) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// After the last message: only messages sent from now on.
    End,
    /// At this sequence (≥ 1). Older than the window: the reader is first told the exact
    /// number it cannot have (`Dropped{count}` / `dropped`). At most the last sequence + 1.
    Sequence(u64),
    /// At the first retained message whose `sent_at` is at or after this time.
    Time(SystemTime),
}

impl StartAt {
    /// How CreateGroup's ALREADY_EXISTS error shows a group's start.
    pub(crate) fn describe(self) -> String {
        match self {
            Self::End => "start at the end".into(),
            Self::Sequence(n) => format!("start_sequence {n}"),
            Self::Time(t) => format!("start_time {}", humantime::format_rfc3339_nanos(t)),
        }
    }
}

/// The retention bounds of every address (NATS JetStream's "limits" retention).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most messages one address keeps.
    pub messages: usize,
    /// Most bytes one address keeps (payload + headers + 128 per message).
    pub bytes: usize,
    /// Oldest a message may get; `None`: no age bound.
    pub age: Option<Duration>,
    /// Most named consumer groups one address keeps (`--max-groups-per-address`).
    pub groups: usize,
    /// How long a group created by a read may go unread before it is removed (`--idle-group`);
    /// `None`: never.
    pub idle_group: Option<Duration>,
}

impl From<&Limits> for Retention {
    fn from(l: &Limits) -> Self {
        Self {
            messages: l.retention_messages,
            bytes: l.retention_bytes,
            age: (!l.retention_age.is_zero()).then_some(l.retention_age),
            groups: l.max_groups_per_address,
            idle_group: (!l.idle_group.is_zero()).then_some(l.idle_group),
        }
    }
}

/// Acknowledged delivery of a group (SQS visibility timeout, Google Pub/Sub ack deadline, NATS
/// JetStream `AckExplicit`): every message handed out is leased and handed out again unless
/// acknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckPolicy {
    /// How long a lease lasts (1 s to 12 h).
    pub ack_wait: Duration,
    /// Deliveries of one message before it is dead-lettered; 0 = unlimited.
    pub max_deliveries: u32,
    /// Where dead-lettered messages are sent; `None`: they are dropped and counted.
    pub dead_letter: Option<Address>,
    /// Most messages handed out and not acknowledged, across the group (1 to 100,000).
    pub max_ack_pending: u32,
}

/// A group's settings as CreateGroup gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSettings {
    /// Where the group starts.
    pub start: StartAt,
    /// Acknowledged delivery; `None`: at most once.
    pub ack: Option<AckPolicy>,
}

impl GroupSettings {
    /// How CreateGroup's ALREADY_EXISTS error shows a group's settings.
    pub(crate) fn describe(&self) -> String {
        let mut s = self.start.describe();
        if let Some(a) = &self.ack {
            s.push_str(&format!(
                ", ack_wait {}, max_deliveries {}, max_ack_pending {}",
                humantime::format_duration(a.ack_wait),
                a.max_deliveries,
                a.max_ack_pending
            ));
            if let Some(d) = &a.dead_letter {
                s.push_str(&format!(", dead_letter_address {:?}", d.as_str()));
            }
        }
        s
    }
}

/// One message handed to a group reader.
#[derive(Debug, Clone)]
pub struct Taken {
    /// The message (shared, not copied).
    pub message: Arc<Message>,
    /// For groups with acknowledgements: 1 on the first delivery, n on the nth; else 0.
    pub attempt: u32,
}

/// A message that reached its group's `max_deliveries`, to be sent to `to` (or, without a
/// dead-letter address, only counted). The broker appends it after the address lock is
/// released.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The original message.
    pub message: Arc<Message>,
    /// The group that gave up on it.
    pub group: String,
    /// How many times it was delivered.
    pub deliveries: u32,
    /// The dead-letter address.
    pub to: Address,
}

/// The result of taking from a group.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages, in the order handed out: redeliveries (lowest sequence first), then new ones.
    pub messages: Vec<Taken>,
    /// Messages lost to retention before this batch (reported once).
    pub dropped: u64,
    /// Messages dead-lettered while taking (the caller sends them on).
    pub dead_letters: Vec<DeadLetter>,
    /// When the group's next lease expires or delayed redelivery falls due, if any: a waiting
    /// reader wakes then as well as on appends.
    pub next_due: Option<tokio::time::Instant>,
    /// Disk engine: the group's new position and leases are durable once this resolves; hand
    /// the messages out only then (at most once holds across a crash).
    pub durable: Durable,
    /// Set when the batch is empty because its first message did not fit the take's byte
    /// budget: nothing was taken (the message stays where it was, and `dropped` is kept for
    /// the next batch). Recv turns it into `RESOURCE_EXHAUSTED`.
    pub too_large: Option<Oversized>,
}

/// A message too large for a take's byte budget (`RecvRequest.max_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversized {
    /// Its sequence.
    pub sequence: u64,
    /// The bytes a `RecvResponse` holding it alone would take (upper bound).
    pub bytes: usize,
}

/// The byte budget of one take: messages go into the batch while their encoded size
/// ([`crate::message::recv_entry_len`]) fits what is left of `max_bytes`, so the `RecvResponse`
/// never exceeds it. The first message that does not fit ends the batch; if nothing was taken
/// before it, it is recorded as [`Oversized`].
#[derive(Debug)]
pub(crate) struct ByteBudget {
    left: usize,
    unbounded: bool,
    taken: bool,
    pub(crate) refused: Option<Oversized>,
}

impl ByteBudget {
    /// A budget of `max_bytes` for a whole `RecvResponse`; `usize::MAX` charges nothing (group
    /// streams send one message per frame).
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            left: max_bytes.saturating_sub(crate::message::RECV_RESPONSE_OVERHEAD),
            unbounded: max_bytes == usize::MAX,
            taken: false,
            refused: None,
        }
    }

    /// Charges `m` and returns true if it fits; otherwise returns false (and records it when
    /// it would have been the first message of the batch).
    pub(crate) fn admit(&mut self, m: &Message) -> bool {
        if self.unbounded {
            return true;
        }
        let n = crate::message::recv_entry_len(m);
        if n <= self.left {
            self.left -= n;
            self.taken = true;
            true
        } else {
            if !self.taken && self.refused.is_none() {
                self.refused = Some(Oversized {
                    sequence: m.sequence,
                    bytes: n + crate::message::RECV_RESPONSE_OVERHEAD,
                });
            }
            false
        }
    }
}

impl Batch {
    /// Nothing to report: no message and no loss.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.dropped == 0
    }

    /// Refuses a batch that holds nothing because its first message is larger than the take's
    /// byte budget (a loss to report still goes out first, as an otherwise empty batch).
    ///
    /// # Errors
    /// [`BrokerError::BatchTooLarge`] (`RESOURCE_EXHAUSTED`) naming the message's sequence and
    /// size.
    pub fn refuse_if_too_large(&self) -> Result<(), BrokerError> {
        match self.too_large {
            Some(o) if self.is_empty() => Err(BrokerError::BatchTooLarge {
                sequence: o.sequence,
                bytes: o.bytes,
            }),
            _ => Ok(()),
        }
    }
}

/// What Ack, Nack and ExtendLease report: the sequences that were not pending, and messages
/// dead-lettered by a Nack.
#[derive(Debug, Default)]
pub struct Settled {
    /// Sequences that were not awaiting an acknowledgement.
    pub not_pending: Vec<u64>,
    /// Messages that reached `max_deliveries` (Nack only).
    pub dead_letters: Vec<DeadLetter>,
    /// Disk engine: the Acks are durable once this resolves; answer OK only then.
    pub durable: Durable,
}

/// The acknowledgement operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Done with them: never delivered again.
    Ack,
    /// Give them back: deliverable again after the delay (counts as an attempt).
    Nack(Duration),
    /// Still working: their leases run `ack_wait` from now.
    Extend,
}

/// What the Admin RPCs report about one address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressInfo {
    /// The address.
    pub address: String,
    /// Messages in its retention window.
    pub retained_messages: usize,
    /// Bytes charged for them (payload + headers + 128 per message).
    pub retained_bytes: usize,
    /// Sequence of the oldest retained message; 0 when none is retained.
    pub first_sequence: u64,
    /// Sequence of the last message sent; 0 before the first.
    pub last_sequence: u64,
    /// Open Subscribe streams (fan-out and group members).
    pub subscribers: usize,
    /// Consumer groups, the default group included.
    pub groups: usize,
    /// Bytes of the address's segment and journal files (0 in the memory engine).
    pub disk_bytes: u64,
}

/// What the Admin RPCs report about one consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group; empty for the default group.
    pub group: String,
    /// Next sequence the group hands out.
    pub next_sequence: u64,
    /// Retained messages the group has not taken yet.
    pub lag: u64,
    /// Messages the group lost to retention that its next read will report.
    pub dropped: u64,
    /// Messages handed out and not acknowledged (groups with acknowledgements).
    pub pending: u64,
    /// Deliveries after the first.
    pub redelivered: u64,
    /// Messages that reached `max_deliveries`.
    pub dead_lettered: u64,
    /// The acknowledgement settings, if any.
    pub ack: Option<AckPolicy>,
}

/// A checked message ready to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The payload.
    pub payload: Bytes,
    /// The headers.
    pub headers: Headers,
    /// Bytes charged to retention (payload + headers + 128).
    pub size: usize,
    /// Deduplication id, if any.
    pub message_id: Option<String>,
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The message's sequence (the first Send's, for a duplicate).
    pub sequence: u64,
    /// True when `message_id` matched an earlier Send within the dedup window: nothing stored.
    pub duplicate: bool,
}

/// What one maintenance pass did.
#[derive(Debug, Default)]
pub struct Maintenance {
    /// Messages evicted by the age bound.
    pub aged: usize,
    /// Idle addresses removed.
    pub reclaimed: usize,
    /// Messages whose last lease expired on their last allowed delivery, to be sent on.
    pub dead_letters: Vec<DeadLetter>,
}

/// A registered fan-out reader: where it is and from which sequence appends counted it.
#[derive(Debug, Clone, Copy)]
pub struct FanoutCursor {
    /// The next sequence it is owed.
    pub next: u64,
    /// Appends from this sequence on were made while it was registered.
    pub registered: u64,
}

/// The queue of one pattern subscription (see [`memory::patterns`]); unregister it with
/// [`Engine::unsubscribe_pattern`].
#[derive(Debug)]
pub struct PatternFeed {
    sub: Arc<memory::patterns::PatternSub>,
}

impl PatternFeed {
    /// Woken when a message is queued.
    pub fn notify(&self) -> &Notify {
        &self.sub.notify
    }

    /// Moves up to `max` queued messages into `out`; returns how many were dropped (queue
    /// overflow) before them.
    pub fn pop(&self, max: usize, out: &mut VecDeque<Arc<Message>>) -> u64 {
        self.sub.pop(max, out)
    }
}

/// The storage engine. See the module docs.
#[derive(Debug)]
pub enum Engine {
    /// Everything in memory; lost on restart.
    Memory(MemoryEngine),
    /// The same index over segment files and group journals in `--data-dir` (see [`disk`]):
    /// everything acknowledged survives a crash.
    Disk(MemoryEngine),
    /// Streams in Redis, shared by any number of nodes (see [`redis`]). Its operations are
    /// asynchronous and go through the [`Broker`](crate::broker::Broker)'s own paths; the
    /// synchronous methods here refuse them with [`BrokerError::Unsupported`].
    Redis(Arc<redis::RedisEngine>),
}

/// A handle to one address of an engine, held by subscriptions and waiting Recv calls while
/// they are open (an address with open handles is never reclaimed).
#[derive(Debug, Clone)]
pub enum Log {
    /// An address of the in-memory engine.
    Memory(Arc<AddressLog>),
}

impl Engine {
    /// The in-memory engine with `limits` (assumed validated, see [`Limits::validate`]).
    pub fn memory(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        Self::Memory(MemoryEngine::new(limits, metrics))
    }

    /// The disk engine on `config.dir`: locks the directory, recovers every address in it
    /// (truncating torn tails) and starts the flusher.
    ///
    /// # Errors
    /// Another broker holds the directory, it cannot be read or written, or a log is corrupt in
    /// the middle (without `--repair`): a message naming the address, sequence and file.
    pub fn disk(
        limits: &Limits,
        metrics: Arc<Metrics>,
        config: &disk::DiskConfig,
    ) -> Result<Self, String> {
        MemoryEngine::open_disk(limits, metrics, config).map(Self::Disk)
    }

    /// Bytes in the disk engine's files (0 for the memory engine).
    pub fn disk_bytes(&self) -> u64 {
        match self {
            Self::Redis(_) => 0,
            Self::Memory(_) => 0,
            Self::Disk(m) => m.disk_bytes(),
        }
    }

    /// Stops the disk engine's flusher after what is queued (fsyncing it in interval mode).
    /// Call it once the server has stopped answering.
    pub fn close(&self) {
        match self {
            Self::Redis(_) => {}
            Self::Memory(_) => {}
            Self::Disk(m) => m.close(),
        }
    }

    /// From now on every append is refused with [`BrokerError::ShuttingDown`].
    pub fn begin_shutdown(&self) {
        match self {
            Self::Redis(r) => r.begin_shutdown(),
            Self::Memory(m) | Self::Disk(m) => m.begin_shutdown(),
        }
    }

    /// Appends one message (`size`: bytes charged to retention), hands it to matching
    /// pattern subscribers, and wakes the address's waiters. With `message_id`, a Send with
    /// the same id within the dedup window (its message still retained) stores nothing and
    /// returns the first one's sequence as a duplicate.
    ///
    /// In the disk engine the message becomes visible, and the returned [`Durable`] resolves,
    /// once it is on stable storage.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the address does not exist and `--max-addresses` is reached;
    /// `UNAVAILABLE` once shutdown has begun.
    pub fn append(
        &self,
        address: &Address,
        payload: Bytes,
        headers: Headers,
        size: usize,
        message_id: Option<&str>,
    ) -> Result<(Appended, Durable), BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous append")),
            Self::Memory(m) | Self::Disk(m) => {
                m.append(address, payload, headers, size, message_id)
            }
        }
    }

    /// Appends `messages` to one address under one lock, with consecutive sequences (skipping
    /// duplicates, answered with their first sequence), then wakes the address's readers once.
    ///
    /// # Errors
    /// As [`Engine::append`]; nothing is stored then.
    pub fn append_batch(
        &self,
        address: &Address,
        messages: Vec<NewMessage>,
    ) -> Result<(Vec<Appended>, Durable), BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous append")),
            Self::Memory(m) | Self::Disk(m) => m.append_batch(address, messages),
        }
    }

    /// Subscribes to every address matching `pattern` (NATS subject syntax): messages sent from
    /// now on are queued for the returned feed, in order per address.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` past [`memory::MAX_PATTERN_SUBSCRIPTIONS`].
    pub fn subscribe_pattern(&self, pattern: Pattern) -> Result<PatternFeed, BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported(
                "wildcard subscriptions with --engine redis",
            )),
            Self::Memory(m) | Self::Disk(m) => Ok(PatternFeed {
                sub: m.subscribe_pattern(pattern)?,
            }),
        }
    }

    /// Pattern subscriptions open now.
    pub fn pattern_count(&self) -> usize {
        match self {
            Self::Redis(_) => 0,
            Self::Memory(m) | Self::Disk(m) => m.pattern_count(),
        }
    }

    /// Ends a pattern subscription.
    pub fn unsubscribe_pattern(&self, feed: &PatternFeed) {
        match self {
            Self::Redis(_) => {}
            Self::Memory(m) | Self::Disk(m) => m.unsubscribe_pattern(&feed.sub),
        }
    }

    /// Takes up to `max` messages, at most `max_bytes` encoded (see `ByteBudget`), for
    /// `group` (created at the end on first use), leased to
    /// Recv callers (holder 0) if the group has acknowledgements. With `register_waiter`, an
    /// empty result also registers a waiting Recv (undone by [`Log::remove_waiter`]). Returns
    /// the address, the group's id and the batch.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the address does not exist and `--max-addresses` is reached.
    pub fn take(
        &self,
        address: &Address,
        group: &str,
        max: usize,
        max_bytes: usize,
        register_waiter: bool,
    ) -> Result<(Log, u64, Batch), BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous take")),
            Self::Memory(m) | Self::Disk(m) => {
                let (log, r) = m.with_address(address, |a, st| {
                    let r = a.take(st, group, None, max, max_bytes, 0);
                    if register_waiter && r.as_ref().is_ok_and(|(_, b)| b.is_empty()) {
                        AddressLog::add_waiter(st);
                    }
                    r
                })?;
                let (id, batch) = r?;
                Ok((Log::Memory(log), id, batch))
            }
        }
    }

    /// Registers a fan-out reader at `start`, if the address has fewer than `max_subscribers`.
    ///
    /// # Errors
    /// `OUT_OF_RANGE` for a start past the last sequence + 1; `RESOURCE_EXHAUSTED` for the
    /// subscriber or address limit. Nothing is registered then.
    pub fn subscribe_fanout(
        &self,
        address: &Address,
        start: StartAt,
        max_subscribers: usize,
        full: impl FnOnce() -> BrokerError,
    ) -> Result<(Log, FanoutCursor), BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous subscribe")),
            Self::Memory(m) | Self::Disk(m) => {
                let (log, r) = m.with_address(address, |a, st| {
                    if st.subscribers() >= max_subscribers {
                        return Err(full());
                    }
                    a.subscribe_fanout(st, start)
                })?;
                let (next, registered) = r?;
                Ok((Log::Memory(log), FanoutCursor { next, registered }))
            }
        }
    }

    /// Registers a member stream of `group` (created at the end on first use), if the address
    /// has fewer than `max_subscribers`. Returns the group's id.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` for the subscriber or address limit.
    pub fn subscribe_group(
        &self,
        address: &Address,
        group: &str,
        max_subscribers: usize,
        full: impl FnOnce() -> BrokerError,
    ) -> Result<(Log, u64), BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous subscribe")),
            Self::Memory(m) | Self::Disk(m) => {
                let (log, r) = m.with_address(address, |a, st| {
                    if st.subscribers() >= max_subscribers {
                        return Err(full());
                    }
                    a.subscribe_group(st, group)
                })?;
                Ok((Log::Memory(log), r?))
            }
        }
    }

    /// Creates a named group with `settings` (creating the address if needed). Returns
    /// whether it was created and the sequence it hands out next.
    ///
    /// # Errors
    /// `ALREADY_EXISTS` when it exists with other settings; `OUT_OF_RANGE` for a start past the
    /// last sequence + 1; `RESOURCE_EXHAUSTED` for the address limit.
    pub fn create_group(
        &self,
        address: &Address,
        group: &str,
        settings: GroupSettings,
    ) -> Result<(bool, u64, Durable), BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous CreateGroup")),
            Self::Memory(m) | Self::Disk(m) => m.create_group(address, group, settings),
        }
    }

    /// Ack, Nack or ExtendLease of `sequences` of `group`; wakes the group's readers.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` when the group is the default group, unknown, or has no
    /// `ack_wait`.
    pub fn settle(
        &self,
        address: &str,
        group: &str,
        sequences: &[u64],
        op: Settle,
    ) -> Result<Settled, BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous settle")),
            Self::Memory(m) | Self::Disk(m) => m.settle(address, group, sequences, op),
        }
    }

    /// Disk engine: records that `sequences` of `group` on `address` are finished with, once
    /// their dead letters are durable (a crash before then delivers them again, so a dead
    /// letter is never lost). Nothing in the memory engine.
    pub fn journal_done(&self, address: &str, group: &str, sequences: Vec<u64>) {
        match self {
            Self::Redis(_) => {}
            Self::Memory(_) => {}
            Self::Disk(m) => m.journal_done(address, group, sequences),
        }
    }

    /// Deletes a named group; its waiting Recv calls and streams end with `NOT_FOUND`.
    ///
    /// # Errors
    /// `NOT_FOUND` when the address or the group does not exist.
    pub fn delete_group(&self, address: &str, group: &str) -> Result<Durable, BrokerError> {
        match self {
            Self::Redis(_) => Err(BrokerError::Unsupported("a synchronous DeleteGroup")),
            Self::Memory(m) | Self::Disk(m) => m.delete_group(address, group),
        }
    }

    /// Deletes an address; returns how many messages were purged, `None` if unknown.
    pub fn delete_address(&self, address: &str) -> Option<usize> {
        match self {
            Self::Redis(_) => None,
            Self::Memory(m) | Self::Disk(m) => m.delete_address(address),
        }
    }

    /// One address's figures and, with `with_groups`, its groups'; `None` if unknown.
    pub fn address_info(
        &self,
        address: &str,
        with_groups: bool,
    ) -> Option<(AddressInfo, Vec<GroupInfo>)> {
        match self {
            Self::Redis(_) => None,
            Self::Memory(m) | Self::Disk(m) => m.address_info(address, with_groups),
        }
    }

    /// Addresses starting with `prefix` and sorting after `after`, in name order, at most
    /// `limit`; and the name to continue after when more remain.
    pub fn list_addresses(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> (Vec<AddressInfo>, Option<String>) {
        match self {
            Self::Redis(_) => (Vec::new(), None),
            Self::Memory(m) | Self::Disk(m) => m.list_addresses(prefix, after, limit),
        }
    }

    /// (subscribers, waiting Recv calls, retained messages, retained bytes) of `address`; zeros
    /// for an unknown address.
    pub fn counts(&self, address: &str) -> [usize; 4] {
        match self {
            Self::Redis(r) => [r.subscribers(address), r.waiters(address), 0, 0],
            Self::Memory(m) | Self::Disk(m) => [
                m.snapshot(address, |s| s.subscribers()),
                m.snapshot(address, |s| s.waiters()),
                m.snapshot(address, |s| s.retained_messages()),
                m.snapshot(address, |s| s.retained_bytes()),
            ],
        }
    }

    /// Whether the engine holds `address` now.
    pub fn contains(&self, address: &str) -> bool {
        match self {
            Self::Redis(_) => false,
            Self::Memory(m) | Self::Disk(m) => m.contains(address),
        }
    }

    /// Addresses held now.
    pub fn address_count(&self) -> usize {
        match self {
            Self::Redis(r) => r.followed(),
            Self::Memory(m) | Self::Disk(m) => m.address_count(),
        }
    }

    /// Messages retained across all addresses now.
    pub fn total_retained_messages(&self) -> usize {
        match self {
            Self::Redis(_) => 0,
            Self::Memory(m) | Self::Disk(m) => m.total_retained_messages(),
        }
    }

    /// Bytes retained across all addresses now.
    pub fn total_retained_bytes(&self) -> usize {
        match self {
            Self::Redis(_) => 0,
            Self::Memory(m) | Self::Disk(m) => m.total_retained_bytes(),
        }
    }

    /// One maintenance pass: age eviction, lease expiry, idle reclaim.
    pub fn maintain(&self) -> Maintenance {
        match self {
            Self::Redis(_) => Maintenance::default(),
            Self::Memory(m) | Self::Disk(m) => m.maintain(),
        }
    }

    /// Drops spare capacity (stale bookkeeping, oversized maps) while the broker is idle, so
    /// the allocator can give the memory back.
    pub fn shrink(&self) {
        match self {
            Self::Redis(_) => {}
            Self::Memory(m) | Self::Disk(m) => m.shrink(),
        }
    }

    /// How often [`Engine::maintain`] should run: half the idle period, between 10 ms and 1 s.
    pub fn maintenance_period(&self) -> Duration {
        match self {
            Self::Redis(_) => Duration::from_secs(1),
            Self::Memory(m) | Self::Disk(m) => {
                (m.idle_address() / 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
            }
        }
    }
}

impl Log {
    /// Woken after every append to the address, and when a group or the address is deleted.
    pub fn notify(&self) -> &Notify {
        match self {
            Self::Memory(a) => &a.notify,
        }
    }

    /// `NOT_FOUND` ("address deleted") once an operator deleted the address.
    ///
    /// # Errors
    /// [`BrokerError::AddressDeleted`].
    pub fn check_deleted(&self) -> Result<(), BrokerError> {
        match self {
            Self::Memory(a) => a.check_deleted(),
        }
    }

    /// Takes up to `max` messages (at most `max_bytes` encoded, see `ByteBudget`) for the
    /// group whose id is `id`, leased to `holder` (a group
    /// stream's id, 0 for a Recv caller) if the group has acknowledgements.
    ///
    /// # Errors
    /// [`BrokerError::GroupDeleted`] when the group was deleted since.
    pub fn take(
        &self,
        group: &str,
        id: u64,
        max: usize,
        max_bytes: usize,
        holder: u64,
    ) -> Result<Batch, BrokerError> {
        match self {
            Self::Memory(a) => a
                .take(&mut a.state.lock(), group, Some(id), max, max_bytes, holder)
                .map(|(_, b)| b),
        }
    }

    /// Makes the messages of `group` leased to `holder` deliverable again at once (its stream
    /// ended) and wakes the group's readers.
    pub fn release(&self, group: &str, id: u64, holder: u64) {
        match self {
            Self::Memory(a) => {
                a.release(group, id, holder);
            }
        }
    }

    /// Hands the fan-out reader at `cursor` up to `max` messages into `out`, and no more once
    /// they come to `max_bytes` (as charged to retention; at least one); returns how many it
    /// lost to retention since its last read.
    pub fn read_fanout(
        &self,
        cursor: &mut FanoutCursor,
        (max, max_bytes): (usize, usize),
        out: &mut VecDeque<Delivery>,
    ) -> u64 {
        match self {
            Self::Memory(a) => a.read_fanout(
                &mut a.state.lock(),
                &mut cursor.next,
                cursor.registered,
                (max, max_bytes),
                out,
            ),
        }
    }

    /// Unregisters a fan-out reader.
    pub fn unsubscribe_fanout(&self, cursor: FanoutCursor) {
        match self {
            Self::Memory(a) => a.unsubscribe_fanout(cursor.next, cursor.registered),
        }
    }

    /// Unregisters a group member stream.
    pub fn unsubscribe_group(&self) {
        match self {
            Self::Memory(a) => a.unsubscribe_group(),
        }
    }

    /// Ends a waiting Recv registered by [`Engine::take`].
    pub fn remove_waiter(&self) {
        match self {
            Self::Memory(a) => a.remove_waiter(),
        }
    }
}
