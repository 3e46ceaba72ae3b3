//! One address: its sequence counter, its retention window, its consumer-group cursors and the
//! bookkeeping of its fan-out subscribers.
//!
//! The window is a sequence-indexed ring (`VecDeque`): entry `i` holds sequence `first + i`.
//! Consumers are cursors into it (the next sequence they will get), so replay from a sequence or
//! acknowledgements can be added without changing how messages are stored.
//!
//! A message leaves the window when
//! - every consumer group of the address has taken it and every fan-out subscriber has been
//!   handed it (it is *consumed*; nothing is lost), or
//! - a retention bound evicts it: the address's count or byte bound when a new message arrives,
//!   or the broker-wide byte bound (oldest first, across addresses). Consumers whose cursor was
//!   behind it learn the exact number lost on their next read (`dropped` / `Dropped{count}`).
//!
//! Invariants a change must keep:
//! - all state is behind one short `parking_lot` mutex per address; it is never held across an
//!   `.await`, and waiters are woken (`Notify`) after it is released;
//! - `retained_bytes` and the broker [`Budget`] move together: every removal from the window
//!   calls [`Budget::release`].

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::{
    budget::Budget,
    error::BrokerError,
    metrics::Metrics,
    validate::Headers,
    wire::{self, WireFrame},
};

/// A message as the broker stores it. Shared (`Arc`) by every consumer that is handed it; the
/// payload is a reference-counted [`Bytes`], never copied per subscriber.
#[derive(Debug)]
pub struct Message {
    /// The address it was sent to.
    pub address: Arc<str>,
    /// Its per-address sequence, from 1.
    pub sequence: u64,
    /// The payload bytes.
    pub payload: Bytes,
    /// The headers it was sent with.
    pub headers: Headers,
    /// When the broker accepted it.
    pub sent_at: SystemTime,
    /// Bytes charged against the retention bounds (payload + headers + overhead).
    pub(crate) size: usize,
}

struct Entry {
    message: Arc<Message>,
    /// Fan-out subscribers that have not yet been handed this message.
    pending_subscribers: u32,
    /// The message encoded for the wire, shared by the fan-out subscribers still owed it and
    /// dropped when the last one has it, so retained messages do not carry a second copy.
    frame: Option<WireFrame>,
}

/// A consumer group's position (Kafka's committed offset, NATS JetStream's consumer floor).
#[derive(Debug, Clone, Copy)]
struct Cursor {
    /// Next sequence the group hands out.
    next: u64,
    /// Messages evicted before the group took them, not yet reported.
    dropped: u64,
    /// Whether anyone has read from the group. Named groups are created by a read; the default
    /// group exists from the start and counts once a Recv or group stream used it.
    used: bool,
}

/// The result of taking from a group or reading as a subscriber.
#[derive(Debug, Default)]
pub struct Batch {
    /// Messages, in sequence order.
    pub messages: Vec<Arc<Message>>,
    /// Messages lost to retention before this batch (reported once).
    pub dropped: u64,
}

impl Batch {
    /// Nothing to report: no message and no loss.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.dropped == 0
    }
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
}

/// What the Admin RPCs report about one consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// The group; empty for the default group.
    pub group: String,
    /// Next sequence the group hands out.
    pub next_sequence: u64,
    /// Retained messages the group has not taken yet (messages behind the last sequence).
    pub lag: u64,
    /// Messages the group lost to retention that its next read will report.
    pub dropped: u64,
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Shared handle of one address, held by the registry and by every subscriber and waiting Recv.
pub(crate) struct AddressShared {
    pub(crate) name: Arc<str>,
    pub(crate) state: Mutex<State>,
    /// Woken after every append: waiting Recv calls, group streams and caught-up subscribers.
    pub(crate) notify: Notify,
    pub(crate) budget: Arc<Budget>,
    pub(crate) metrics: Arc<Metrics>,
    /// Which of the budget's age queues this address's messages go to.
    pub(crate) age_queue: usize,
    /// Mirror of the first retained sequence (or the next sequence when empty), readable without
    /// the lock by the budget's stale-entry checks.
    first_seq: AtomicU64,
    /// Set (under the lock) when the registry reclaims or deletes the address.
    closed: AtomicBool,
    /// Set (under the lock) when an operator deletes the address: its subscribers end.
    deleted: AtomicBool,
}

/// The address's mutable state; see the module docs.
pub(crate) struct State {
    next_seq: u64,
    window: VecDeque<Entry>,
    retained_bytes: usize,
    groups: HashMap<Box<str>, Cursor>,
    /// Fan-out subscribers registered now.
    fanout: u32,
    /// Fan-out subscribers plus group streams.
    subscribers: usize,
    /// Recv calls waiting for a message.
    waiters: usize,
    closed: bool,
    last_active: Instant,
}

impl std::fmt::Debug for AddressShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Address")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AddressShared {
    pub(crate) fn new(
        name: Arc<str>,
        budget: Arc<Budget>,
        age_queue: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        metrics.groups.inc();
        let mut groups = HashMap::new();
        // The default group exists from creation, so messages sent before anyone asks wait.
        groups.insert(
            Box::from(""),
            Cursor {
                next: 1,
                dropped: 0,
                used: false,
            },
        );
        Self {
            name,
            state: Mutex::new(State {
                next_seq: 1,
                window: VecDeque::new(),
                retained_bytes: 0,
                groups,
                fanout: 0,
                subscribers: 0,
                waiters: 0,
                closed: false,
                last_active: Instant::now(),
            }),
            notify: Notify::new(),
            budget,
            metrics,
            age_queue,
            first_seq: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
        }
    }

    /// Whether `sequence` is still in the window (lock-free, may be momentarily stale).
    pub(crate) fn retains(&self, sequence: u64) -> bool {
        !self.closed.load(Ordering::Acquire) && sequence >= self.first_seq.load(Ordering::Acquire)
    }

    fn sync_first(&self, st: &State) {
        let first = st
            .window
            .front()
            .map_or(st.next_seq, |e| e.message.sequence);
        self.first_seq.store(first, Ordering::Release);
    }

    /// Removes the oldest entry and returns the bytes it held to the budget.
    fn pop_front(&self, st: &mut State) -> bool {
        let Some(e) = st.window.pop_front() else {
            return false;
        };
        st.retained_bytes -= e.message.size;
        self.budget.release(self.age_queue, e.message.size);
        true
    }

    /// Drops the consumed prefix: entries every group has taken and every subscriber was handed.
    fn trim(&self, st: &mut State) {
        let floor = st
            .groups
            .values()
            .map(|c| c.next)
            .min()
            .unwrap_or(st.next_seq);
        let mut trimmed = false;
        while st
            .window
            .front()
            .is_some_and(|e| e.pending_subscribers == 0 && e.message.sequence < floor)
        {
            trimmed |= self.pop_front(st);
        }
        if trimmed {
            self.sync_first(st);
        }
    }

    /// Appends a message, first evicting the oldest entries the address's bounds require.
    /// Returns the stored message. The caller wakes waiters after unlocking.
    pub(crate) fn append(
        &self,
        st: &mut State,
        payload: Bytes,
        headers: Headers,
        size: usize,
        retention_messages: usize,
        retention_bytes: usize,
    ) -> Arc<Message> {
        while !st.window.is_empty()
            && (st.window.len() >= retention_messages || st.retained_bytes + size > retention_bytes)
        {
            self.pop_front(st);
            self.metrics.evicted.inc();
        }
        self.metrics.sent.inc();
        let message = Arc::new(Message {
            address: Arc::clone(&self.name),
            sequence: st.next_seq,
            payload,
            headers,
            sent_at: SystemTime::now(),
            size,
        });
        st.next_seq += 1;
        st.retained_bytes += size;
        st.window.push_back(Entry {
            message: Arc::clone(&message),
            pending_subscribers: st.fanout,
            frame: None,
        });
        st.last_active = Instant::now();
        self.budget.charge(self.age_queue, size);
        self.sync_first(st);
        message
    }

    /// Evicts (not consumes) every entry up to and including `sequence`: the broker-wide byte
    /// bound's "discard old". Returns how many left.
    pub(crate) fn evict_through(&self, sequence: u64) -> usize {
        let mut st = self.state.lock();
        let mut n = 0;
        while st
            .window
            .front()
            .is_some_and(|e| e.message.sequence <= sequence)
        {
            self.pop_front(&mut st);
            n += 1;
        }
        if n > 0 {
            self.sync_first(&st);
            self.metrics.evicted.inc_by(n as u64);
        }
        n
    }

    /// Takes up to `max` messages for `group` (creating a named group at the current end of the
    /// address on first use), with the count the group lost since its last take.
    pub(crate) fn take(&self, st: &mut State, group: &str, max: usize) -> Batch {
        let first = st
            .window
            .front()
            .map_or(st.next_seq, |e| e.message.sequence);
        let next_seq = st.next_seq;
        if !st.groups.contains_key(group) {
            self.metrics.groups.inc();
            st.groups.insert(
                Box::from(group),
                Cursor {
                    next: next_seq,
                    dropped: 0,
                    used: true,
                },
            );
        }
        let Some(cursor) = st.groups.get_mut(group) else {
            return Batch::default();
        };
        cursor.used = true;
        if cursor.next < first {
            cursor.dropped += first - cursor.next;
            cursor.next = first;
        }
        let start = usize::try_from(cursor.next - first).unwrap_or(usize::MAX);
        let messages: Vec<_> = st
            .window
            .iter()
            .skip(start)
            .take(max)
            .map(|e| Arc::clone(&e.message))
            .collect();
        let taken = messages.len() as u64;
        let batch = Batch {
            messages,
            dropped: std::mem::take(&mut cursor.dropped),
        };
        cursor.next += taken;
        self.metrics.delivered.inc_by(taken);
        if batch.dropped > 0 {
            self.metrics.dropped.inc_by(batch.dropped);
        }
        st.last_active = Instant::now();
        if taken > 0 {
            self.trim(st);
        }
        batch
    }

    /// Registers a fan-out subscriber; returns its cursor (the next sequence).
    pub(crate) fn subscribe_fanout(&self, st: &mut State) -> u64 {
        st.fanout += 1;
        st.subscribers += 1;
        self.metrics.subscribers.inc();
        st.last_active = Instant::now();
        st.next_seq
    }

    /// Registers a group stream (creating the group on first use).
    pub(crate) fn subscribe_group(&self, st: &mut State, group: &str) {
        let next = st.next_seq;
        if !st.groups.contains_key(group) {
            self.metrics.groups.inc();
            st.groups.insert(
                Box::from(group),
                Cursor {
                    next,
                    dropped: 0,
                    used: true,
                },
            );
        }
        st.subscribers += 1;
        self.metrics.subscribers.inc();
        st.last_active = Instant::now();
    }

    /// Hands a fan-out subscriber at `cursor` up to `max` messages, each with its wire frame,
    /// into `out`; returns how many it lost to retention since its last read.
    pub(crate) fn read_fanout(
        &self,
        st: &mut State,
        cursor: &mut u64,
        max: usize,
        out: &mut VecDeque<(Arc<Message>, Option<WireFrame>)>,
    ) -> u64 {
        let first = st
            .window
            .front()
            .map_or(st.next_seq, |e| e.message.sequence);
        let mut dropped = 0;
        if *cursor < first {
            dropped = first - *cursor;
            *cursor = first;
        }
        let start = usize::try_from(*cursor - first).unwrap_or(usize::MAX);
        let before = out.len();
        for e in st.window.iter_mut().skip(start).take(max) {
            // Encoded once, by the first subscriber to read it; kept only while others still
            // need it.
            // Shared messages are encoded once, by the first subscriber to read them, and kept
            // while others still need them. A message only this subscriber is owed is encoded
            // later, outside the lock, by the subscriber itself.
            let frame = match &e.frame {
                Some(f) => Some(f.clone()),
                None if e.pending_subscribers > 1 => {
                    let f = wire::encode_message(&e.message);
                    e.frame = Some(f.clone());
                    Some(f)
                }
                None => None,
            };
            e.pending_subscribers = e.pending_subscribers.saturating_sub(1);
            if e.pending_subscribers == 0 {
                e.frame = None;
            }
            out.push_back((Arc::clone(&e.message), frame));
        }
        let handed = (out.len() - before) as u64;
        *cursor += handed;
        self.metrics.delivered.inc_by(handed);
        if dropped > 0 {
            self.metrics.dropped.inc_by(dropped);
        }
        if out.len() > before && start == 0 {
            self.trim(st);
        }
        dropped
    }

    /// Unregisters a fan-out subscriber at `cursor`: what it was still owed no longer waits for it.
    pub(crate) fn unsubscribe_fanout(&self, cursor: u64) {
        let mut st = self.state.lock();
        let first = st
            .window
            .front()
            .map_or(st.next_seq, |e| e.message.sequence);
        let start = usize::try_from(cursor.saturating_sub(first)).unwrap_or(usize::MAX);
        for e in st.window.iter_mut().skip(start) {
            e.pending_subscribers = e.pending_subscribers.saturating_sub(1);
            if e.pending_subscribers == 0 {
                e.frame = None;
            }
        }
        st.fanout = st.fanout.saturating_sub(1);
        st.subscribers = st.subscribers.saturating_sub(1);
        self.metrics.subscribers.dec();
        st.last_active = Instant::now();
        self.trim(&mut st);
    }

    /// Unregisters a group stream.
    pub(crate) fn unsubscribe_group(&self) {
        let mut st = self.state.lock();
        st.subscribers = st.subscribers.saturating_sub(1);
        self.metrics.subscribers.dec();
        st.last_active = Instant::now();
    }

    /// Marks a Recv call as waiting (it keeps the address from being reclaimed).
    pub(crate) fn add_waiter(st: &mut State) {
        st.waiters += 1;
    }

    /// Ends a Recv call's wait.
    pub(crate) fn remove_waiter(&self) {
        let mut st = self.state.lock();
        st.waiters = st.waiters.saturating_sub(1);
        st.last_active = Instant::now();
    }

    /// Closes the address if it has been idle for `idle`: nothing retained, no subscriber, no
    /// waiting Recv. Called by the registry while it holds the map entry, so no new handle can be
    /// taken; handles already out see `closed` and look the address up again.
    pub(crate) fn close_if_idle(&self, idle: std::time::Duration) -> bool {
        let mut st = self.state.lock();
        // A group that is read from and lost messages keeps the address until its next read
        // has reported them: reclaiming would make that loss silent.
        let owes_report = st
            .groups
            .values()
            .any(|c| c.used && (c.dropped > 0 || c.next < st.next_seq));
        let idle_now = st.window.is_empty()
            && st.subscribers == 0
            && st.waiters == 0
            && !owes_report
            && st.last_active.elapsed() >= idle;
        if idle_now {
            st.closed = true;
            self.closed.store(true, Ordering::Release);
            self.metrics.groups.dec_by(gauge(st.groups.len()));
        }
        idle_now
    }

    /// Deletes the address (the registry has already removed it from the map): purges its
    /// messages and marks it so its subscribers end with `NOT_FOUND` and waiting Recv calls
    /// return. Returns how many messages were purged.
    pub(crate) fn delete(&self) -> usize {
        let mut st = self.state.lock();
        if st.closed {
            return 0;
        }
        let mut purged = 0;
        while self.pop_front(&mut st) {
            purged += 1;
        }
        st.closed = true;
        self.closed.store(true, Ordering::Release);
        self.deleted.store(true, Ordering::Release);
        self.metrics.groups.dec_by(gauge(st.groups.len()));
        self.sync_first(&st);
        drop(st);
        self.notify.notify_waiters();
        purged
    }

    /// [`BrokerError::AddressDeleted`] once an operator deleted the address.
    pub(crate) fn check_deleted(&self) -> Result<(), BrokerError> {
        if self.deleted.load(Ordering::Acquire) {
            Err(BrokerError::AddressDeleted)
        } else {
            Ok(())
        }
    }

    /// A snapshot for the Admin RPCs; with `groups`, one entry per group, sorted by name.
    pub(crate) fn info(&self, with_groups: bool) -> (AddressInfo, Vec<GroupInfo>) {
        let st = self.state.lock();
        let first = st
            .window
            .front()
            .map_or(st.next_seq, |e| e.message.sequence);
        let info = AddressInfo {
            address: self.name.to_string(),
            retained_messages: st.window.len(),
            retained_bytes: st.retained_bytes,
            first_sequence: st.window.front().map_or(0, |e| e.message.sequence),
            last_sequence: st.next_seq - 1,
            subscribers: st.subscribers,
            groups: st.groups.len(),
        };
        let mut groups = Vec::new();
        if with_groups {
            groups = st
                .groups
                .iter()
                .map(|(name, c)| GroupInfo {
                    group: name.to_string(),
                    next_sequence: c.next.max(first),
                    lag: st.next_seq - c.next.max(first),
                    dropped: c.dropped + first.saturating_sub(c.next),
                })
                .collect();
            groups.sort_by(|a, b| a.group.cmp(&b.group));
        }
        (info, groups)
    }
}

impl State {
    /// Whether the registry has reclaimed this address (look it up again).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Fan-out subscribers plus group streams.
    pub(crate) fn subscribers(&self) -> usize {
        self.subscribers
    }

    /// Recv calls waiting for a message.
    pub(crate) fn waiters(&self) -> usize {
        self.waiters
    }

    /// Messages in the window.
    pub(crate) fn retained_messages(&self) -> usize {
        self.window.len()
    }

    /// Bytes the window holds, as charged against the bounds.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }
}
