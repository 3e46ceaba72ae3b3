//! One address in memory: its sequence counter, its retention window (the history), its
//! consumer-group cursors and the bookkeeping of its fan-out subscribers.
//!
//! The window is a sequence-indexed ring (`VecDeque`): entry `i` holds sequence `first + i`.
//! Consumers are cursors into it (the next sequence they will get); reading never removes a
//! message. A message leaves the window only when a retention bound evicts it (NATS JetStream's
//! "limits" retention, Kafka's log retention):
//! - the address's count or byte bound, when a new message arrives;
//! - the age bound, checked at the front of the window on every append and read, and by the
//!   engine's periodic sweep (no timer per message, no global lock);
//! - the broker-wide byte bound (oldest first, across addresses; see `budget`).
//!
//! Consumers whose cursor was behind an evicted message learn the exact number lost on their
//! next read (`dropped` / `Dropped{count}`).
//!
//! In the disk engine (`disk`) the same index sits over the address's files: an append is
//! first *staged* (sequence assigned, in `staged`, invisible) and handed to the flusher; the
//! flusher makes it visible with [`AddressLog::publish_through`] once it is durable, or drops it
//! with [`AddressLog::rollback_staged`] if the write failed. Group changes are journaled
//! ([`GroupEvent`]) and their [`Durable`] returned with the call's result. The oldest part of
//! the window, once out of the message cache, leaves `window` for the sparse [`ColdIndex`]
//! (runs of consecutive records, read back from the segments): `window` then holds sequences
//! `hot_first()..next_seq` and the index `first()..hot_first()`.
//!
//! Invariants a change must keep:
//! - all state is behind one short `parking_lot` mutex per address; it is never held across an
//!   `.await`, and waiters are woken (`Notify`) after it is released;
//! - `retained_bytes` and the broker [`Budget`] move together: every removal from the window
//!   calls [`Budget::release`];
//! - an entry's `pending_subscribers` counts the fan-out subscribers registered when it was
//!   appended that have not been handed it yet; it only decides how long the shared wire frame
//!   is cached, never whether the message is retained.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::SystemTime,
};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

use super::{
    budget::Budget,
    cold::{ColdIndex, ColdMessage},
    dedup::Dedup,
    lease::{Leases, Outcome},
    patterns::{PatternIndex, PatternMatches},
};
use crate::{
    engine::{
        disk::{
            record::{self, GroupEvent},
            AddressFiles, DiskLog, Job, Work,
        },
        AddressInfo, Batch, ByteBudget, DeadLetter, Delivery, Durable, GroupInfo, GroupSettings,
        Retention, Settle, Settled, StartAt, Taken,
    },
    error::BrokerError,
    message::{encode_message, Message, WireFrame},
    metrics::Metrics,
    validate::Headers,
};

/// Where a message's record is, in the disk engine: its segment (by first sequence) and the
/// byte offset of its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The segment's first sequence (its file name).
    pub segment: u64,
    /// Byte offset of the record's frame in the segment.
    pub offset: u64,
}

/// When an append happened: the monotonic time (age bound, the budget's oldest-first order)
/// and the wall-clock time given to readers as `sent_at`. Reading both clocks costs ~50 ns each
/// on a virtual machine, so a batch reads them once and its messages share them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stamp {
    now: Instant,
    sent_at: SystemTime,
}

impl Stamp {
    /// Reads both clocks.
    pub(crate) fn now() -> Self {
        Self {
            now: Instant::now(),
            sent_at: SystemTime::now(),
        }
    }
}

struct Entry {
    /// The message; with `hollow`, a stand-in without payload and headers (sequence, time and
    /// size are right), the rest being in the segment at `loc`.
    message: Arc<Message>,
    /// Disk engine: where the record is.
    loc: Option<Loc>,
    /// Disk engine: the payload and headers left the cache (`--cache-bytes`); readers load
    /// them from `loc`.
    hollow: bool,
    /// When it was appended (monotonic), for the age bound.
    appended: Instant,
    /// Fan-out subscribers registered at append time that have not yet been handed it.
    pending_subscribers: u32,
    /// The message encoded for the wire, shared by the fan-out subscribers still owed it and
    /// dropped when the last one has it, so retained messages do not carry a second copy.
    frame: Option<WireFrame>,
}

/// The retained messages, for reading while other parts of the state are borrowed.
struct View<'a> {
    hot: &'a VecDeque<Entry>,
    cold: &'a ColdIndex,
    /// The first in-memory sequence.
    hot_first: u64,
    /// The first retained sequence.
    first: u64,
}

impl<'a> View<'a> {
    fn new(hot: &'a VecDeque<Entry>, cold: &'a ColdIndex, next_seq: u64) -> Self {
        let hot_first = next_seq - hot.len() as u64;
        Self {
            hot,
            cold,
            hot_first,
            first: cold.first().unwrap_or(hot_first),
        }
    }
}

/// What the broker-wide budget learns of an address (see `budget`).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Oldest {
    /// It holds no message (or is closed).
    Empty,
    /// Its oldest message was appended then.
    At(Instant),
    /// This many messages were evicted; the next oldest was appended then, if any.
    Evicted(u64, Option<Instant>),
}

/// A consumer group's position (Kafka's committed offset, NATS JetStream's consumer floor).
#[derive(Debug)]
struct Cursor {
    /// Which incarnation of the group this is: a group deleted and created again gets a new
    /// id, so calls and streams opened on the old one end with `GroupDeleted`.
    id: u64,
    /// Next sequence the group hands out.
    next: u64,
    /// Messages evicted before the group took them, not yet reported.
    dropped: u64,
    /// Whether anyone has read from the group. Named groups are created by a read or by
    /// CreateGroup; the default group exists from the start and counts once somebody used it.
    used: bool,
    /// The settings CreateGroup gave; `None` for a group created by its first read.
    created: Option<GroupSettings>,
    /// Leases, for a group with acknowledgements.
    leases: Option<Box<Leases>>,
    /// When it was last read (or created): a group created by a read and unread for
    /// `--idle-group` is removed (see [`AddressLog::sweep`]).
    last_read: Instant,
}

impl Cursor {
    /// The settings the group runs with (a group created by its first read started at the end).
    fn settings(&self) -> GroupSettings {
        self.created.clone().unwrap_or(GroupSettings {
            start: StartAt::End,
            ack: None,
        })
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Shared handle of one address, held by the engine's map and by every subscriber and
/// waiting Recv.
pub struct AddressLog {
    pub(crate) name: Arc<str>,
    pub(crate) state: Mutex<State>,
    /// Woken after every append: waiting Recv calls, group streams and caught-up subscribers.
    pub(crate) notify: Notify,
    pub(crate) budget: Arc<Budget>,
    pub(crate) metrics: Arc<Metrics>,
    retention: Retention,
    /// The publish deduplication window; `None`: off.
    dedup_window: Option<std::time::Duration>,
    /// Whether the budget's heap holds this address (see `budget`).
    in_budget: AtomicBool,
    /// Set (under the lock) when the engine reclaims or deletes the address.
    closed: AtomicBool,
    /// Set (under the lock) when an operator deletes the address: its subscribers end.
    deleted: AtomicBool,
    /// The address's files, in the disk engine.
    disk: Option<DiskLog>,
}

/// The address's mutable state; see the module docs.
pub(crate) struct State {
    /// The sequence after the last visible message.
    next_seq: u64,
    /// The sequence the next append gets: `next_seq` plus the staged messages.
    next_assign: u64,
    /// Disk engine: appended, being written, not yet visible (sequences `next_seq..next_assign`).
    /// With the time each was accepted (the age bound counts from it).
    staged: VecDeque<(Arc<Message>, Instant)>,
    /// Disk engine: moves on when a failed write drops the staged messages, so jobs queued
    /// behind them fail too.
    epoch: u64,
    /// The in-memory part of the window: sequences `hot_first()..next_seq`.
    window: VecDeque<Entry>,
    /// Disk engine: the older part, out of memory (sequences `first()..hot_first()`).
    cold: ColdIndex,
    retained_bytes: usize,
    groups: HashMap<Box<str>, Cursor>,
    next_group_id: u64,
    /// Remembered `message_id`s (see `dedup`).
    dedup: Dedup,
    /// The pattern subscribers this address's messages go to (see `patterns`).
    patterns: PatternMatches,
    /// Fan-out subscribers registered now.
    fanout: u32,
    /// Fan-out subscribers plus group streams.
    subscribers: usize,
    /// Recv calls waiting for a message.
    waiters: usize,
    closed: bool,
    last_active: Instant,
}

impl std::fmt::Debug for AddressLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddressLog")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl AddressLog {
    pub(crate) fn new(
        name: Arc<str>,
        budget: Arc<Budget>,
        metrics: Arc<Metrics>,
        retention: Retention,
        dedup_window: Option<std::time::Duration>,
        patterns: Arc<PatternIndex>,
    ) -> Self {
        metrics.groups.inc();
        let mut groups = HashMap::new();
        // The default group exists from creation, so messages sent before anyone asks wait.
        groups.insert(
            Box::from(""),
            Cursor {
                id: 0,
                next: 1,
                dropped: 0,
                used: false,
                created: None,
                leases: None,
                last_read: Instant::now(),
            },
        );
        Self {
            name,
            state: Mutex::new(State {
                next_seq: 1,
                next_assign: 1,
                staged: VecDeque::new(),
                epoch: 0,
                window: VecDeque::new(),
                cold: ColdIndex::default(),
                retained_bytes: 0,
                groups,
                next_group_id: 1,
                dedup: Dedup::default(),
                patterns: PatternMatches::new(patterns),
                fanout: 0,
                subscribers: 0,
                waiters: 0,
                closed: false,
                last_active: Instant::now(),
            }),
            notify: Notify::new(),
            budget,
            metrics,
            retention,
            dedup_window,
            in_budget: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            deleted: AtomicBool::new(false),
            disk: None,
        }
    }

    /// Attaches the address's files (disk engine start-up, after [`Self::restore`]).
    pub(crate) fn with_disk(mut self, disk: DiskLog) -> Self {
        self.disk = Some(disk);
        self
    }

    /// The address's files, in the disk engine.
    pub(crate) fn disk_files(&self) -> Option<&AddressFiles> {
        self.disk.as_ref().map(|d| &d.files)
    }

    /// Bytes of the address's files (0 in the memory engine).
    pub(crate) fn disk_bytes(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.files.bytes())
    }

    /// The staging epoch (see [`State::epoch`]).
    pub(crate) fn staging_epoch(&self) -> u64 {
        self.state.lock().epoch
    }

    /// Queues `work` for the flusher (call under the address lock, so the address's jobs queue
    /// in order); returns its [`Durable`], or [`Durable::done`] in the memory engine.
    pub(crate) fn submit(self: &Arc<Self>, st: &State, work: Work, wait: bool) -> Durable {
        let Some(d) = &self.disk else {
            return Durable::done();
        };
        let (tx, rx) = if wait {
            let (tx, rx) = tokio::sync::oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        d.store.flusher.submit(Job {
            log: Arc::clone(self),
            epoch: st.epoch,
            work,
            done: tx,
        });
        rx.map_or_else(Durable::done, Durable::pending)
    }

    /// Journals `events` (disk engine); returns their [`Durable`].
    fn journal(self: &Arc<Self>, st: &State, events: &[GroupEvent], wait: bool) -> Durable {
        if self.disk.is_none() || events.is_empty() {
            return Durable::done();
        }
        let mut bytes = Vec::with_capacity(32 * events.len());
        for e in events {
            e.encode(&mut bytes);
        }
        self.submit(st, Work::Journal(bytes), wait)
    }

    /// Disk engine: journals that `sequences` of `group` are finished with (their dead letters
    /// are durable now). Not waited for: until it is on disk a crash redelivers them.
    pub(crate) fn journal_done(self: &Arc<Self>, group: &str, sequences: Vec<u64>) {
        let st = self.state.lock();
        if st.closed {
            return;
        }
        let event = GroupEvent::Done {
            group: group.to_string(),
            sequences,
        };
        let _ = self.journal(&st, &[event], false);
    }

    /// Disk engine: makes the staged messages up to `last` visible (they are durable now),
    /// wakes readers and records them with the broker-wide budget.
    /// `locs` gives each one's record, in order.
    pub(crate) fn publish_through(self: &Arc<Self>, last: u64, locs: &[Loc]) {
        let mut st = self.state.lock();
        let mut published = Vec::new();
        let mut locs = locs.iter().copied();
        while st.staged.front().is_some_and(|(m, _)| m.sequence <= last) {
            if let Some((m, accepted)) = st.staged.pop_front() {
                published.push((m.sequence, m.size));
                self.commit(&mut st, m, accepted, locs.next());
            }
        }
        let first = st.first();
        drop(st);
        if let Some(d) = &self.disk {
            d.files.drop_below(first);
        }
        if !published.is_empty() {
            self.notify.notify_waiters();
            self.budget.record(self);
            if let Some(d) = &self.disk {
                for (seq, size) in published {
                    d.store.cache.admit(self, seq, size);
                }
            }
        }
    }

    /// Disk engine: drops `sequence`'s payload and headers from memory (the cache's oldest);
    /// readers load them from its segment from now on.
    pub(crate) fn hollow(&self, sequence: u64) {
        let mut st = self.state.lock();
        let first = st.hot_first();
        let Some(i) = sequence
            .checked_sub(first)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if let Some(e) = st.window.get_mut(i) {
            if e.loc.is_none() || e.hollow {
                return;
            }
            e.message = Arc::new(Message {
                address: Arc::clone(&e.message.address),
                sequence: e.message.sequence,
                payload: Bytes::new(),
                headers: Headers::new(),
                sent_at: e.message.sent_at,
                size: e.message.size,
            });
            e.hollow = true;
            e.frame = None;
        }
        Self::freeze(&mut st);
    }

    /// Moves the hollow entries at the front of the in-memory window into the cold index: out
    /// of the cache, a message costs its share of a run instead of an entry.
    fn freeze(st: &mut State) {
        while let Some(e) = st.window.front() {
            let (true, Some(loc)) = (e.hollow, e.loc) else {
                break;
            };
            let m = ColdMessage {
                sequence: e.message.sequence,
                size: e.message.size,
                appended: e.appended,
                sent_at: e.message.sent_at,
                loc,
            };
            st.window.pop_front();
            st.cold.push(m);
        }
    }

    /// The message of `e`, loaded from its segment if it left the cache.
    ///
    /// # Errors
    /// The read failed (logged); the caller stops at this message and tries again later.
    fn load(&self, e: &Entry) -> Result<Arc<Message>, ()> {
        let (true, Some(loc), Some(d)) = (e.hollow, e.loc, &self.disk) else {
            return Ok(Arc::clone(&e.message));
        };
        match d.files.read_message(loc.segment, loc.offset) {
            Ok(m) if m.sequence == e.message.sequence => Ok(Arc::new(Message {
                address: Arc::clone(&self.name),
                sequence: m.sequence,
                payload: m.payload,
                headers: m.headers,
                sent_at: m.sent_at,
                size: e.message.size,
            })),
            Ok(m) => {
                tracing::error!(address = %self.name, sequence = e.message.sequence, found = m.sequence, "storage: the record at the message's offset holds another sequence");
                Err(())
            }
            Err(err) => {
                tracing::error!(address = %self.name, sequence = e.message.sequence, error = %err, "storage: cannot read a message back from its segment");
                Err(())
            }
        }
    }

    /// Disk engine: a write failed; drops every staged message (none was acknowledged) so the
    /// next append reuses their sequences, and fails the jobs queued behind them.
    pub(crate) fn rollback_staged(&self) {
        let mut st = self.state.lock();
        st.staged.clear();
        let next = st.next_seq;
        st.dedup.forget_from(next);
        st.next_assign = next;
        st.epoch += 1;
    }

    /// Whether `sequence` is staged (written, not yet durable).
    pub(crate) fn is_staged(st: &State, sequence: u64) -> bool {
        sequence >= st.next_seq
    }

    /// Whether the budget's heap holds this address.
    pub(crate) fn in_budget(&self) -> bool {
        self.in_budget.load(Ordering::Acquire)
    }

    /// Sets whether the budget's heap holds this address; returns what it was.
    pub(crate) fn set_in_budget(&self, held: bool) -> bool {
        self.in_budget.swap(held, Ordering::AcqRel)
    }

    /// Whether the address holds messages now (and is still open).
    pub(crate) fn holds_messages(&self) -> bool {
        let st = self.state.lock();
        !st.closed && st.retained_messages() > 0
    }

    /// When the oldest retained message was appended.
    fn front_appended(&self, st: &mut State) -> Option<Instant> {
        if st.closed {
            return None;
        }
        if !st.cold.is_empty() {
            let files = self.disk_files();
            // Unreadable records: the run's newest time stands in (logged when trimmed).
            return st
                .cold
                .front_appended(files)
                .or_else(|| st.cold.front_run_appended());
        }
        st.window.front().map(|e| e.appended)
    }

    /// The budget's view of the address: when its oldest message was appended.
    pub(crate) fn oldest(&self) -> Oldest {
        let mut st = self.state.lock();
        self.front_appended(&mut st)
            .map_or(Oldest::Empty, Oldest::At)
    }

    /// The budget's "discard old": evicts the oldest message if it was appended at or before
    /// `key` (the budget's heap key for the address); otherwise says when it was appended.
    pub(crate) fn evict_oldest_if(&self, key: Instant) -> Oldest {
        let mut st = self.state.lock();
        match self.front_appended(&mut st) {
            None => Oldest::Empty,
            Some(t) if t > key => Oldest::At(t),
            Some(_) => {
                let n = self.pop_front(&mut st);
                if n > 0 {
                    self.metrics.evicted.inc_by(n);
                }
                Oldest::Evicted(n, self.front_appended(&mut st))
            }
        }
    }

    /// Removes the oldest message and returns the bytes it held to the budget. Returns how many
    /// messages left: 1, 0 when the window is empty, or a whole cold run when its records
    /// cannot be read back to trim it one by one (logged).
    fn pop_front(&self, st: &mut State) -> u64 {
        if !st.cold.is_empty() {
            match st.cold.pop_front(self.disk_files()) {
                Ok(Some(size)) => {
                    st.retained_bytes = st.retained_bytes.saturating_sub(size);
                    self.budget.release(1, size);
                    return 1;
                }
                Ok(None) => {}
                Err(()) => return self.pop_cold_run(st),
            }
        }
        let Some(e) = st.window.pop_front() else {
            return 0;
        };
        st.retained_bytes -= e.message.size;
        self.budget.release(1, e.message.size);
        1
    }

    /// Removes the oldest cold run whole; returns how many messages it held.
    fn pop_cold_run(&self, st: &mut State) -> u64 {
        let Some((n, bytes)) = st.cold.pop_run() else {
            return 0;
        };
        st.retained_bytes = st.retained_bytes.saturating_sub(bytes);
        self.budget.release(n, bytes);
        n
    }

    /// Evicts the messages older than the age bound (front of the window only: entries are in
    /// append order). Returns how many left.
    pub(crate) fn evict_aged(&self, st: &mut State, now: Instant) -> usize {
        let Some(age) = self.retention.age else {
            return 0;
        };
        let mut n = 0;
        let old = |t: Instant| now.saturating_duration_since(t) >= age;
        while !st.cold.is_empty() {
            if st.cold.front_run_appended().is_some_and(old) {
                n += self.pop_cold_run(st);
                continue;
            }
            // Unreadable records: left for retention's other bounds (logged when they trim).
            match st.cold.front_appended(self.disk_files()) {
                Some(t) if old(t) => n += self.pop_front(st),
                _ => break,
            }
        }
        if st.cold.is_empty() {
            while st.window.front().is_some_and(|e| old(e.appended)) {
                n += self.pop_front(st);
            }
        }
        if n > 0 {
            self.metrics.evicted.inc_by(n);
        }
        usize::try_from(n).unwrap_or(usize::MAX)
    }

    /// The sequence a Send with `message_id` was stored under, if the id is remembered (within
    /// the dedup window and still retained).
    pub(crate) fn duplicate_of(&self, st: &mut State, message_id: &str) -> Option<u64> {
        let window = self.dedup_window?;
        let now = Instant::now();
        self.evict_aged(st, now);
        let first = st.first();
        st.dedup.prune(now, window, first);
        st.dedup.lookup(message_id)
    }

    /// Appends a message, first evicting the oldest entries the address's bounds require, then
    /// hands it to the matching pattern subscribers. With `message_id` (checked with
    /// [`Self::duplicate_of`] first) it is remembered for deduplication. `at` is when it was
    /// sent (a batch shares one). Returns the stored message. The caller wakes waiters after
    /// unlocking; in the memory engine it also counts the message sent and charges the budget
    /// ([`Self::count_committed`]), so a batch does both once.
    pub(crate) fn append(
        &self,
        st: &mut State,
        payload: Bytes,
        headers: Headers,
        size: usize,
        message_id: Option<&str>,
        at: Stamp,
    ) -> Arc<Message> {
        let message = Arc::new(Message {
            address: Arc::clone(&self.name),
            sequence: st.next_assign,
            payload,
            headers,
            sent_at: at.sent_at,
            size,
        });
        st.next_assign += 1;
        if let (Some(id), Some(_)) = (message_id, self.dedup_window) {
            st.dedup.record(id, message.sequence, at.now);
        }
        if self.disk.is_some() {
            st.staged.push_back((Arc::clone(&message), at.now));
        } else {
            self.place(st, Arc::clone(&message), at.now, None);
        }
        message
    }

    /// Counts `n` messages of `bytes` in all as sent and charges them to the broker-wide
    /// budget, once they are in the window (memory engine: after [`Self::append`]).
    pub(crate) fn count_committed(&self, n: u64, bytes: usize) {
        self.metrics.sent.inc_by(n);
        self.budget.charge(n, bytes);
    }

    /// Puts `message` (the next sequence) into the window: evicts what the address's bounds
    /// require, charges the budget, hands it to pattern subscribers.
    fn commit(&self, st: &mut State, message: Arc<Message>, now: Instant, loc: Option<Loc>) {
        let size = message.size;
        self.place(st, message, now, loc);
        self.count_committed(1, size);
    }

    /// [`Self::commit`] without counting the message sent or charging the budget: the caller
    /// does both (see [`Self::count_committed`]) before it releases the address lock.
    fn place(&self, st: &mut State, message: Arc<Message>, now: Instant, loc: Option<Loc>) {
        self.evict_aged(st, now);
        let size = message.size;
        let mut evicted = 0;
        while st.retained_messages() > 0
            && (st.retained_messages() >= self.retention.messages
                || st.retained_bytes + size > self.retention.bytes)
        {
            match self.pop_front(st) {
                0 => break,
                n => evicted += n,
            }
        }
        if evicted > 0 {
            self.metrics.evicted.inc_by(evicted);
        }
        st.next_seq = message.sequence + 1;
        st.retained_bytes += size;
        // Under the address lock, so each pattern subscriber sees this address in order.
        st.patterns.deliver(&self.name, &message);
        st.window.push_back(Entry {
            message,
            loc,
            hollow: false,
            appended: now,
            pending_subscribers: st.fanout,
            frame: None,
        });
        st.last_active = now;
    }

    /// Reads the cold messages `from..end` (at most `max`) back from their segments into
    /// `out`, in order.
    ///
    /// # Errors
    /// A read failed or the records are not the expected ones (logged): `out` holds what came
    /// before; the caller stops there and tries again later.
    fn read_cold(
        &self,
        cold: &ColdIndex,
        mut from: u64,
        end: u64,
        (max, max_bytes): (usize, usize),
        out: &mut Vec<Arc<Message>>,
    ) -> Result<(), ()> {
        let Some(files) = self.disk_files() else {
            return Err(());
        };
        let mut want = max;
        let mut bytes = 0usize;
        while want > 0 && from < end && bytes < max_bytes {
            let Some((segment, offset)) = cold.locate(from) else {
                return Err(());
            };
            let before = from;
            let mut wrong = None;
            let scanned = files.scan_records(segment, offset, |body, _| {
                match record::message_sequence(body) {
                    Some(s) if s < from => return true,
                    Some(s) if s == from => {}
                    other => {
                        wrong = Some(other.unwrap_or(0));
                        return false;
                    }
                }
                let Ok(m) = record::decode_message(body) else {
                    wrong = Some(from);
                    return false;
                };
                out.push(Arc::new(Message {
                    address: Arc::clone(&self.name),
                    sequence: m.sequence,
                    payload: m.payload,
                    headers: m.headers,
                    sent_at: m.sent_at,
                    size: m.size,
                }));
                bytes = bytes.saturating_add(m.size);
                from += 1;
                want -= 1;
                want > 0 && from < end && bytes < max_bytes
            });
            if let Err(e) = scanned {
                tracing::error!(address = %self.name, sequence = from, error = %e, "storage: cannot read messages back from their segment");
                return Err(());
            }
            if let Some(found) = wrong {
                tracing::error!(address = %self.name, sequence = from, found, "storage: the segment holds another record where the message should be");
                return Err(());
            }
            if from == before {
                tracing::error!(address = %self.name, sequence = from, "storage: the message's segment ends before its record");
                return Err(());
            }
        }
        Ok(())
    }

    /// Up to `max` messages from `from` on (cold ones read back from disk, hollow ones loaded)
    /// into `out`, and no more once they come to `max_bytes` (as charged to retention; the
    /// message that reaches it is included, so at least one is read); stops early at one that
    /// cannot be read.
    fn read_range(
        &self,
        v: &View<'_>,
        from: u64,
        (max, max_bytes): (usize, usize),
        out: &mut Vec<Arc<Message>>,
    ) {
        let from = from.max(v.first);
        let start = out.len();
        if from < v.hot_first
            && self
                .read_cold(v.cold, from, v.hot_first, (max, max_bytes), out)
                .is_err()
        {
            return;
        }
        // The hot part goes on where the cold part stopped, within what is left of both bounds.
        let mut bytes: usize = out[start..].iter().map(|m| m.size).sum();
        let skip = usize::try_from(from.saturating_sub(v.hot_first)).unwrap_or(usize::MAX);
        let left = max - (out.len() - start);
        for e in v.hot.iter().skip(skip).take(left) {
            if bytes >= max_bytes {
                break;
            }
            let Ok(m) = self.load(e) else { break };
            bytes = bytes.saturating_add(m.size);
            out.push(m);
        }
    }

    /// The message at `sequence`, if retained and readable.
    fn message_at(&self, v: &View<'_>, sequence: u64) -> Option<Arc<Message>> {
        if sequence < v.first {
            return None;
        }
        let mut one = Vec::with_capacity(1);
        self.read_range(v, sequence, (1, usize::MAX), &mut one);
        one.pop().filter(|m| m.sequence == sequence)
    }

    /// The first cold message sent at or after `t`, if any.
    fn cold_position(&self, st: &State, t: SystemTime) -> Option<u64> {
        let (segment, offset, first, count) = st.cold.locate_time(t)?;
        let files = self.disk_files()?;
        let end = first + u64::from(count);
        let mut found = None;
        let _ = files.scan_records(segment, offset, |body, _| {
            let Ok(m) = record::decode_message_index(body) else {
                return false;
            };
            if m.sequence >= end {
                return false;
            }
            if m.sequence >= first && m.sent_at >= t {
                found = Some(m.sequence);
                return false;
            }
            true
        });
        found
    }

    /// The sequence a reader starting at `start` reads first.
    ///
    /// # Errors
    /// [`BrokerError::PastEnd`] for a sequence beyond the last one + 1.
    fn position(&self, st: &State, start: StartAt) -> Result<u64, BrokerError> {
        match start {
            StartAt::End => Ok(st.next_seq),
            StartAt::Sequence(n) if n > st.next_seq => Err(BrokerError::PastEnd {
                field: "start_sequence",
                requested: n,
                last: st.next_seq - 1,
            }),
            StartAt::Sequence(n) => Ok(n),
            StartAt::Time(t) => {
                // Entries are in append order, and so (clock steps aside) in sent_at order.
                if let Some(seq) = self.cold_position(st, t) {
                    return Ok(seq);
                }
                let i = st.window.partition_point(|e| e.message.sent_at < t);
                Ok(st.window.get(i).map_or(st.next_seq, |e| e.message.sequence))
            }
        }
    }

    fn new_group(st: &mut State, next: u64, created: Option<GroupSettings>, used: bool) -> Cursor {
        let id = st.next_group_id;
        st.next_group_id += 1;
        let leases = created
            .as_ref()
            .and_then(|s| s.ack.clone())
            .map(|policy| Box::new(Leases::new(policy)));
        Cursor {
            id,
            next,
            dropped: 0,
            used,
            created,
            leases,
            last_read: Instant::now(),
        }
    }

    /// Refuses a new named group when the address holds `--max-groups-per-address` already.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] (`RESOURCE_EXHAUSTED`) naming the flag.
    fn room_for_group(&self, st: &State) -> Result<(), BrokerError> {
        // The default group is always there and not counted.
        if st.groups.len().saturating_sub(1) >= self.retention.groups {
            return Err(BrokerError::LimitReached {
                what: "consumer groups on this address",
                limit: self.retention.groups,
                flag: "--max-groups-per-address",
            });
        }
        Ok(())
    }

    /// Dead letters for `dead` (sequence, deliveries) of `group`; messages no longer retained
    /// are skipped (their loss is reported as `dropped`).
    fn dead_letters(
        &self,
        v: &View<'_>,
        group: &str,
        to: Option<&crate::validate::Address>,
        dead: &[(u64, u32)],
        out: &mut Vec<DeadLetter>,
    ) {
        self.metrics.dead_lettered.inc_by(dead.len() as u64);
        let Some(to) = to else { return };
        for &(seq, deliveries) in dead {
            if let Some(message) = self.message_at(v, seq) {
                out.push(DeadLetter {
                    message,
                    group: group.to_string(),
                    deliveries,
                    to: to.clone(),
                });
            }
        }
    }

    /// Takes up to `max` messages for `group`, with the count the group lost since its last
    /// take. With `expect` (the group's id from an earlier take or registration), a group that
    /// was deleted (or deleted and created again) is [`BrokerError::GroupDeleted`]; without it,
    /// a named group is created at the current end of the address on first use. For a group
    /// with acknowledgements the messages are leased to `holder` (0: a Recv caller), due
    /// redeliveries go first, and new messages only while `max_ack_pending` allows. Returns the
    /// group's id with the batch. The batch holds at most `max_bytes` of encoded messages
    /// ([`ByteBudget`]); a first message larger than that is left where it is and reported in
    /// [`Batch::too_large`].
    pub(crate) fn take(
        self: &Arc<Self>,
        st: &mut State,
        group: &str,
        expect: Option<u64>,
        max: usize,
        max_bytes: usize,
        holder: u64,
    ) -> Result<(u64, Batch), BrokerError> {
        let now = Instant::now();
        self.evict_aged(st, now);
        let first = st.first();
        if !st.groups.contains_key(group) {
            if expect.is_some() {
                return Err(BrokerError::GroupDeleted);
            }
            self.room_for_group(st)?;
            self.metrics.groups.inc();
            let next = st.next_seq;
            let cursor = Self::new_group(st, next, None, true);
            st.groups.insert(Box::from(group), cursor);
        }
        let State {
            groups,
            window,
            cold,
            next_seq,
            last_active,
            ..
        } = st;
        let view = View::new(window, cold, *next_seq);
        let Some(cursor) = groups.get_mut(group) else {
            return Err(BrokerError::GroupDeleted);
        };
        if expect.is_some_and(|id| id != cursor.id) {
            return Err(BrokerError::GroupDeleted);
        }
        cursor.used = true;
        cursor.last_read = now;
        if cursor.next < first {
            cursor.dropped += first - cursor.next;
            cursor.next = first;
        }
        let mut batch = Batch::default();
        let mut budget = ByteBudget::new(max_bytes);
        let journaling = self.disk.is_some();
        let mut events = Vec::new();
        let from = cursor.next;
        match cursor.leases.as_deref_mut() {
            None => {
                // A message that cannot be read back stops the batch; it is tried again.
                let mut read = Vec::new();
                self.read_range(&view, cursor.next, (max, max_bytes), &mut read);
                batch.messages = read
                    .into_iter()
                    .take_while(|m| budget.admit(m))
                    .map(|message| Taken {
                        message,
                        attempt: 0,
                    })
                    .collect();
                cursor.next += batch.messages.len() as u64;
            }
            Some(leases) => {
                cursor.dropped += leases.evict_below(first);
                let dead = leases.expire(now);
                let to = leases.policy.dead_letter.clone();
                self.dead_letters(&view, group, to.as_ref(), &dead, &mut batch.dead_letters);
                // With a dead-letter address, the broker journals Done once the dead letter is
                // durable (`Broker::dead_letter`); a crash before that redelivers instead of
                // losing it.
                if journaling && !dead.is_empty() && to.is_none() {
                    events.push(GroupEvent::Done {
                        group: group.to_string(),
                        sequences: dead.iter().map(|d| d.0).collect(),
                    });
                }
                // Redeliveries first, lowest sequence first, while they fit the batch. One
                // that cannot be read back is leased again all the same (it expires again).
                let mut full = false;
                while batch.messages.len() < max {
                    let Some(seq) = leases.first_ready() else {
                        break;
                    };
                    let message = self.message_at(&view, seq);
                    if message.as_ref().is_some_and(|m| !budget.admit(m)) {
                        full = true;
                        break;
                    }
                    let Some(attempt) = leases.redeliver_one(seq, now, holder) else {
                        continue;
                    };
                    self.metrics.redelivered.inc();
                    if let Some(message) = message {
                        batch.messages.push(Taken { message, attempt });
                    }
                }
                // Read ahead in one pass (cold messages come from disk), then lease while
                // there is room.
                let mut fresh = Vec::new();
                if !full && leases.has_room() && cursor.next < *next_seq {
                    let want = (max - batch.messages.len().min(max)).min(leases.room());
                    self.read_range(&view, cursor.next, (want, max_bytes), &mut fresh);
                }
                for message in fresh {
                    if batch.messages.len() >= max || !leases.has_room() || !budget.admit(&message)
                    {
                        break;
                    }
                    leases.lease_new(cursor.next, now, holder);
                    batch.messages.push(Taken {
                        message,
                        attempt: 1,
                    });
                    cursor.next += 1;
                }
                batch.next_due = leases.next_due();
                if journaling {
                    events.extend(batch.messages.iter().map(|t| GroupEvent::Lease {
                        group: group.to_string(),
                        sequence: t.message.sequence,
                        attempt: t.attempt,
                    }));
                }
            }
        }
        if journaling && cursor.next != from {
            events.push(GroupEvent::Position {
                group: group.to_string(),
                next: cursor.next,
            });
        }
        batch.too_large = budget.refused.filter(|_| batch.messages.is_empty());
        if batch.too_large.is_none() {
            // An empty batch refused for its size reports the loss with the next one.
            batch.dropped = std::mem::take(&mut cursor.dropped);
        }
        let id = cursor.id;
        self.metrics.delivered.inc_by(batch.messages.len() as u64);
        if batch.dropped > 0 {
            self.metrics.dropped.inc_by(batch.dropped);
        }
        *last_active = now;
        // At most once holds across a crash: the position is durable before the messages go.
        batch.durable = self.journal(st, &events, true);
        Ok((id, batch))
    }

    /// Ack, Nack or ExtendLease of `sequences` for `group`.
    ///
    /// # Errors
    /// [`BrokerError::NotAcknowledged`] (`FAILED_PRECONDITION`) when the group is the default
    /// group, unknown, or has no `ack_wait`.
    pub(crate) fn settle(
        self: &Arc<Self>,
        st: &mut State,
        group: &str,
        sequences: &[u64],
        op: Settle,
    ) -> Result<Settled, BrokerError> {
        let now = Instant::now();
        self.evict_aged(st, now);
        let first = st.first();
        let State {
            groups,
            window,
            cold,
            next_seq,
            ..
        } = st;
        let view = View::new(window, cold, *next_seq);
        let not_acked = |reason: &str| BrokerError::NotAcknowledged {
            group: group.to_string(),
            reason: reason.to_string(),
        };
        if group.is_empty() {
            return Err(not_acked("the default group has no acknowledgements"));
        }
        let cursor = groups
            .get_mut(group)
            .ok_or_else(|| not_acked("no such group on this address"))?;
        let leases = cursor
            .leases
            .as_deref_mut()
            .ok_or_else(|| not_acked("the group has no ack_wait (create it with ack_wait > 0)"))?;
        cursor.dropped += leases.evict_below(first);
        let mut out = Settled::default();
        let mut dead = Vec::new();
        let mut acked = 0;
        let mut done = Vec::new();
        for &seq in sequences {
            match leases.settle(seq, op, now) {
                Outcome::Settled => {
                    if op == Settle::Ack {
                        acked += 1;
                        done.push(seq);
                    }
                }
                Outcome::NotPending => out.not_pending.push(seq),
                Outcome::DeadLetter(n) => {
                    dead.push((seq, n));
                    // With a dead-letter address: journaled once the dead letter is durable.
                    if leases.policy.dead_letter.is_none() {
                        done.push(seq);
                    }
                }
            }
        }
        self.metrics.acked.inc_by(acked);
        let to = leases.policy.dead_letter.clone();
        self.dead_letters(&view, group, to.as_ref(), &dead, &mut out.dead_letters);
        st.last_active = now;
        if !done.is_empty() {
            let event = GroupEvent::Done {
                group: group.to_string(),
                sequences: done,
            };
            // An Ack that returned OK is on disk: the message is not delivered again.
            out.durable = self.journal(st, &[event], true);
        }
        Ok(out)
    }

    /// Makes every message of `group` (incarnation `id`) leased to `holder` deliverable again
    /// at once: the group stream holding them ended. Returns how many.
    pub(crate) fn release(&self, group: &str, id: u64, holder: u64) -> usize {
        let mut st = self.state.lock();
        let n = match st.groups.get_mut(group) {
            Some(c) if c.id == id => c.leases.as_deref_mut().map_or(0, |l| l.release(holder)),
            _ => 0,
        };
        drop(st);
        if n > 0 {
            self.notify.notify_waiters();
        }
        n
    }

    /// CreateGroup: a named group with `settings`. Returns whether it was created (false: it
    /// existed with the same settings) and the sequence it hands out next.
    ///
    /// # Errors
    /// [`BrokerError::GroupExists`] when it exists with other settings;
    /// [`BrokerError::PastEnd`] for a start beyond the last sequence + 1.
    pub(crate) fn create_group(
        self: &Arc<Self>,
        st: &mut State,
        group: &str,
        settings: GroupSettings,
    ) -> Result<(bool, u64, Durable), BrokerError> {
        self.evict_aged(st, Instant::now());
        let first = st.first();
        if let Some(c) = st.groups.get_mut(group) {
            // A group created by its first read started at the end, without acknowledgements.
            let existing = c.settings();
            if existing != settings {
                return Err(BrokerError::GroupExists {
                    group: group.to_string(),
                    existing: existing.describe(),
                });
            }
            // Asked for explicitly now: it is kept like a created group from here on.
            let fresh = c.created.is_none();
            c.created = Some(existing.clone());
            let next = c.next.max(first);
            let durable = if fresh {
                let event = GroupEvent::Create {
                    group: group.to_string(),
                    settings: existing,
                    next,
                };
                self.journal(st, &[event], true)
            } else {
                Durable::done()
            };
            return Ok((false, next, durable));
        }
        self.room_for_group(st)?;
        let next = self.position(st, settings.start)?;
        self.metrics.groups.inc();
        let event = GroupEvent::Create {
            group: group.to_string(),
            settings: settings.clone(),
            next,
        };
        let cursor = Self::new_group(st, next, Some(settings), false);
        st.groups.insert(Box::from(group), cursor);
        st.last_active = Instant::now();
        let durable = self.journal(st, &[event], true);
        Ok((true, next.max(first), durable))
    }

    /// DeleteGroup: forgets a named group. The caller wakes waiters after unlocking, so that
    /// waiting Recv calls and the group's streams see it gone.
    ///
    /// # Errors
    /// [`BrokerError::NoSuchGroup`] when the address has no such group.
    pub(crate) fn delete_group(
        self: &Arc<Self>,
        st: &mut State,
        group: &str,
    ) -> Result<Durable, BrokerError> {
        if st.groups.remove(group).is_none() {
            return Err(BrokerError::NoSuchGroup {
                address: self.name.to_string(),
                group: group.to_string(),
            });
        }
        self.metrics.groups.dec();
        st.last_active = Instant::now();
        let event = GroupEvent::Delete {
            group: group.to_string(),
        };
        Ok(self.journal(st, &[event], true))
    }

    /// Registers a fan-out subscriber starting at `start`; returns its cursor (the first
    /// sequence it is owed) and the sequence from which appends count it in their
    /// `pending_subscribers`.
    ///
    /// # Errors
    /// [`BrokerError::PastEnd`] for a start beyond the last sequence + 1 (nothing registered).
    pub(crate) fn subscribe_fanout(
        &self,
        st: &mut State,
        start: StartAt,
    ) -> Result<(u64, u64), BrokerError> {
        self.evict_aged(st, Instant::now());
        let cursor = self.position(st, start)?;
        st.fanout += 1;
        st.subscribers += 1;
        self.metrics.subscribers.inc();
        st.last_active = Instant::now();
        Ok((cursor, st.next_seq))
    }

    /// Registers a group stream (creating the group on first use); returns the group's id.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when the group is new and the address holds
    /// `--max-groups-per-address` groups (nothing registered).
    pub(crate) fn subscribe_group(&self, st: &mut State, group: &str) -> Result<u64, BrokerError> {
        let id = match st.groups.get(group) {
            Some(c) => c.id,
            None => {
                self.room_for_group(st)?;
                self.metrics.groups.inc();
                let next = st.next_seq;
                let cursor = Self::new_group(st, next, None, true);
                let id = cursor.id;
                st.groups.insert(Box::from(group), cursor);
                id
            }
        };
        st.subscribers += 1;
        self.metrics.subscribers.inc();
        st.last_active = Instant::now();
        Ok(id)
    }

    /// Hands a fan-out subscriber at `cursor` up to `max` messages, each with its wire frame
    /// when one is shared, into `out`; returns how many it lost to retention since its last
    /// read. `registered` is the sequence from which appends counted this subscriber.
    pub(crate) fn read_fanout(
        &self,
        st: &mut State,
        cursor: &mut u64,
        registered: u64,
        (max, max_bytes): (usize, usize),
        out: &mut VecDeque<Delivery>,
    ) -> u64 {
        self.evict_aged(st, Instant::now());
        let first = st.first();
        let mut dropped = 0;
        if *cursor < first {
            dropped = first - *cursor;
            *cursor = first;
        }
        let before = out.len();
        let hot_first = st.hot_first();
        let mut max = max;
        let mut bytes = 0usize;
        if *cursor < hot_first {
            // Out of memory: read back from the segments for this subscriber alone.
            let mut read = Vec::new();
            let failed = self
                .read_cold(&st.cold, *cursor, hot_first, (max, max_bytes), &mut read)
                .is_err();
            max -= read.len();
            bytes = read.iter().map(|m| m.size).sum();
            out.extend(read.into_iter().map(|m| (m, None)));
            if failed {
                max = 0;
            }
        }
        let from = *cursor + (out.len() - before) as u64;
        let start = usize::try_from(from.saturating_sub(hot_first)).unwrap_or(usize::MAX);
        for e in st.window.iter_mut().skip(start).take(max) {
            if bytes >= max_bytes {
                break;
            }
            bytes = bytes.saturating_add(e.message.size);
            if e.hollow {
                // Out of the cache: read back for this subscriber alone (no shared frame, so
                // the payload does not come back into memory for the others).
                let Ok(message) = self.load(e) else { break };
                if e.message.sequence >= registered {
                    e.pending_subscribers = e.pending_subscribers.saturating_sub(1);
                }
                out.push_back((message, None));
                continue;
            }
            if e.message.sequence < registered {
                // History from before this subscriber registered (replay): it was not counted
                // in the entry, so it takes a shared frame if one exists and otherwise encodes
                // its own, outside the lock.
                out.push_back((Arc::clone(&e.message), e.frame.clone()));
                continue;
            }
            // Shared messages are encoded once, by the first subscriber to read them, and kept
            // while others still need them. A message only this subscriber is owed is encoded
            // later, outside the lock, by the subscriber itself.
            let frame = match &e.frame {
                Some(f) => Some(f.clone()),
                None if e.pending_subscribers > 1 => {
                    let f = encode_message(&e.message, 0);
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
        dropped
    }

    /// Unregisters a fan-out subscriber at `cursor`: what it was still owed no longer waits for
    /// it.
    pub(crate) fn unsubscribe_fanout(&self, cursor: u64, registered: u64) {
        let mut st = self.state.lock();
        let first = st.hot_first();
        let from = cursor.max(registered);
        let start = usize::try_from(from.saturating_sub(first)).unwrap_or(usize::MAX);
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

    /// The engine's periodic sweep: evicts what the age bound says has expired, and expires
    /// the due leases of groups with acknowledgements (so a message on its last delivery is
    /// dead-lettered even if nobody reads the group again). Returns how many messages aged out,
    /// and the dead letters to send on.
    pub(crate) fn sweep(self: &Arc<Self>, dead_letters: &mut Vec<DeadLetter>) -> usize {
        let now = Instant::now();
        let mut st = self.state.lock();
        let aged = self.evict_aged(&mut st, now);
        let first = st.first();
        let State {
            groups,
            window,
            cold,
            next_seq,
            ..
        } = &mut *st;
        let view = View::new(window, cold, *next_seq);
        let mut ready = false;
        let mut events = Vec::new();
        for (name, cursor) in groups.iter_mut() {
            let Some(leases) = cursor.leases.as_deref_mut() else {
                continue;
            };
            cursor.dropped += leases.evict_below(first);
            let dead = leases.expire(now);
            ready |= leases.has_ready();
            let to = leases.policy.dead_letter.clone();
            self.dead_letters(&view, name, to.as_ref(), &dead, dead_letters);
            if self.disk.is_some() && !dead.is_empty() && to.is_none() {
                events.push(GroupEvent::Done {
                    group: name.to_string(),
                    sequences: dead.iter().map(|d| d.0).collect(),
                });
            }
        }
        self.reclaim_idle_groups(&mut st, now, &mut events);
        let _ = self.journal(&st, &events, false);
        drop(st);
        if let Some(d) = &self.disk {
            d.files.drop_below(first);
        }
        if ready {
            // Readers waiting for room or for a redelivery.
            self.notify.notify_waiters();
        }
        aged
    }

    /// Removes the groups created by a read (not by CreateGroup, so without acknowledgements
    /// or leases) that nobody has read for `--idle-group`, while the address has no group
    /// stream and no waiting Recv (so no reader is inside one). A later read creates such a
    /// group again at the end; the messages it had not read are logged with the removal.
    fn reclaim_idle_groups(&self, st: &mut State, now: Instant, events: &mut Vec<GroupEvent>) {
        let Some(idle) = self.retention.idle_group else {
            return;
        };
        let group_streams = st.subscribers.saturating_sub(st.fanout as usize);
        if st.waiters > 0 || group_streams > 0 {
            return;
        }
        let next_seq = st.next_seq;
        let journaling = self.disk.is_some();
        let name = &self.name;
        let (mut removed, mut unread) = (0usize, 0u64);
        let mut example = None;
        st.groups.retain(|group, c| {
            let reclaim = !group.is_empty()
                && c.created.is_none()
                && c.leases.is_none()
                && now.saturating_duration_since(c.last_read) >= idle;
            if reclaim {
                removed += 1;
                unread += next_seq.saturating_sub(c.next);
                example.get_or_insert_with(|| group.to_string());
                if journaling {
                    events.push(GroupEvent::Delete {
                        group: group.to_string(),
                    });
                }
            }
            !reclaim
        });
        if removed > 0 {
            self.metrics.groups.dec_by(gauge(removed));
            // One line per address and sweep, however many groups went.
            tracing::info!(
                address = %name,
                groups = removed,
                first = example.as_deref().unwrap_or_default(),
                unread,
                "idle consumer groups made by a read removed (--idle-group)"
            );
        }
    }

    /// Closes the address if it has been idle for `idle`: nothing retained, no subscriber, no
    /// waiting Recv, no group created by CreateGroup. Called by the engine while it holds the
    /// map entry, so no new handle can be taken; handles already out see `closed` and look the
    /// address up again.
    pub(crate) fn close_if_idle(&self, idle: std::time::Duration) -> bool {
        let mut st = self.state.lock();
        // A group that is read from and lost messages keeps the address until its next read
        // has reported them: reclaiming would make that loss silent. A group an operator
        // created keeps it too: reclaiming would forget its position.
        let owes_report = st
            .groups
            .values()
            .any(|c| c.created.is_some() || (c.used && (c.dropped > 0 || c.next < st.next_seq)));
        let idle_now = st.retained_messages() == 0
            && st.staged.is_empty()
            && st.subscribers == 0
            && st.waiters == 0
            && !owes_report
            && st.last_active.elapsed() >= idle;
        if idle_now {
            st.closed = true;
            self.closed.store(true, Ordering::Release);
            self.metrics.groups.dec_by(gauge(st.groups.len()));
            if let Some(d) = &self.disk {
                d.files.remove(d.store.trash());
            }
        }
        idle_now
    }

    /// Deletes the address (the engine has already removed it from the map): purges its
    /// messages and marks it so its subscribers end with `NOT_FOUND` and waiting Recv calls
    /// return. Returns how many messages were purged.
    pub(crate) fn delete(&self) -> usize {
        let mut st = self.state.lock();
        if st.closed {
            return 0;
        }
        let mut purged = 0;
        while !st.cold.is_empty() {
            purged += self.pop_cold_run(&mut st);
        }
        loop {
            match self.pop_front(&mut st) {
                0 => break,
                n => purged += n,
            }
        }
        // Free what the address held beyond its messages (window capacity, groups, ids):
        // handles to it may live on for a while (age entries, subscribers ending).
        st.window = VecDeque::new();
        st.staged.clear();
        st.epoch += 1;
        st.dedup = Dedup::default();
        if let Some(d) = &self.disk {
            d.files.remove(d.store.trash());
        }
        st.closed = true;
        self.closed.store(true, Ordering::Release);
        self.deleted.store(true, Ordering::Release);
        self.metrics.groups.dec_by(gauge(st.groups.len()));
        drop(st);
        self.notify.notify_waiters();
        usize::try_from(purged).unwrap_or(usize::MAX)
    }

    /// Drops the window's spare capacity (idle maintenance).
    pub(crate) fn shrink(&self) {
        let mut st = self.state.lock();
        st.window.shrink_to_fit();
        st.cold.shrink();
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
        let mut st = self.state.lock();
        self.evict_aged(&mut st, Instant::now());
        let first = st.first();
        let info = AddressInfo {
            address: self.name.to_string(),
            retained_messages: st.retained_messages(),
            retained_bytes: st.retained_bytes,
            first_sequence: if st.retained_messages() > 0 { first } else { 0 },
            last_sequence: st.next_seq - 1,
            subscribers: st.subscribers,
            groups: st.groups.len(),
            disk_bytes: self.disk_bytes(),
        };
        let mut groups = Vec::new();
        if with_groups {
            groups = st
                .groups
                .iter()
                .map(|(name, c)| {
                    let leases = c.leases.as_deref();
                    GroupInfo {
                        group: name.to_string(),
                        next_sequence: c.next.max(first),
                        lag: st.next_seq - c.next.max(first),
                        dropped: c.dropped + first.saturating_sub(c.next),
                        pending: leases.map_or(0, |l| l.pending() as u64),
                        redelivered: leases.map_or(0, |l| l.redelivered),
                        dead_lettered: leases.map_or(0, |l| l.dead_lettered),
                        ack: leases.map(|l| l.policy.clone()),
                    }
                })
                .collect();
            groups.sort_by(|a, b| a.group.cmp(&b.group));
        }
        (info, groups)
    }
}

impl State {
    /// The first retained sequence, or the next sequence when nothing is retained.
    fn first(&self) -> u64 {
        self.cold.first().unwrap_or_else(|| self.hot_first())
    }

    /// The first in-memory sequence (the window's entries run from it to `next_seq`).
    fn hot_first(&self) -> u64 {
        self.next_seq - self.window.len() as u64
    }

    /// Whether the engine has reclaimed this address (look it up again).
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
        self.window.len() + usize::try_from(self.cold.len()).unwrap_or(usize::MAX)
    }

    /// Runs in the cold index (disk engine; each costs about 64 bytes).
    #[cfg(test)]
    pub(crate) fn cold_runs(&self) -> usize {
        self.cold.runs()
    }

    /// Bytes the window holds, as charged against the bounds.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }
}

/// A group as its journal describes it (disk engine start-up).
struct JournaledGroup {
    created: Option<GroupSettings>,
    next: u64,
    leases: std::collections::BTreeMap<u64, u32>,
}

impl AddressLog {
    /// The group journal compacted to the groups' state now: per group one Create (a group
    /// CreateGroup made) or Position (one made by its first read), plus one Lease per pending
    /// message. Replaying the events queued before it on top of it gives the same state, so the
    /// flusher may compact while such events are still queued.
    fn journal_snapshot(st: &State) -> Vec<u8> {
        let first = st.first();
        let mut journal = Vec::new();
        let mut names: Vec<&Box<str>> = st.groups.keys().collect();
        names.sort();
        for name in names {
            let Some(c) = st.groups.get(name) else {
                continue;
            };
            let group = name.to_string();
            match &c.created {
                Some(settings) => GroupEvent::Create {
                    group: group.clone(),
                    settings: settings.clone(),
                    next: c.next,
                }
                .encode(&mut journal),
                None if c.used => GroupEvent::Position {
                    group: group.clone(),
                    next: c.next,
                }
                .encode(&mut journal),
                None => continue,
            }
            if let Some(leases) = c.leases.as_deref() {
                for (sequence, attempt) in leases.attempts().filter(|(s, _)| *s >= first) {
                    GroupEvent::Lease {
                        group: group.clone(),
                        sequence,
                        attempt,
                    }
                    .encode(&mut journal);
                }
            }
        }
        journal
    }

    /// Disk engine: the journal compacted to the groups' state now (see
    /// [`Self::journal_snapshot`]).
    pub(crate) fn compacted_journal(&self) -> Vec<u8> {
        Self::journal_snapshot(&self.state.lock())
    }

    /// Disk engine start-up (the files attached): rebuilds the address from what recovery
    /// read (its messages as the cold index's runs, the dedup ids, the sequence after the
    /// last, its journal's events), applying the retention bounds as if the messages had just
    /// been appended at their `sent_at`. Returns whether any message is retained (for the
    /// broker-wide budget) and the journal compacted to one record per group plus one per
    /// pending lease.
    pub(crate) fn restore(
        &self,
        runs: ColdIndex,
        ids: Vec<(String, u64, SystemTime)>,
        next_seq: u64,
        events: Vec<GroupEvent>,
    ) -> (bool, Vec<u8>) {
        let now = Instant::now();
        let wall = SystemTime::now();
        let mut st = self.state.lock();
        if let Some(window) = self.dedup_window {
            for (id, sequence, sent_at) in ids {
                let age = wall.duration_since(sent_at).unwrap_or_default();
                if age < window {
                    st.dedup
                        .record(&id, sequence, now.checked_sub(age).unwrap_or(now));
                }
            }
        }
        let (n, bytes) = (runs.len(), runs.bytes());
        st.cold = runs;
        st.retained_bytes = bytes;
        self.budget.charge(n, bytes);
        st.next_seq = next_seq;
        st.next_assign = next_seq;
        // The count and byte bounds keep the newest messages that fit (the newest always):
        // what appending them one by one would have left.
        let mut evicted = 0;
        while st.retained_messages() > 1
            && (st.retained_messages() > self.retention.messages
                || st.retained_bytes > self.retention.bytes)
        {
            match self.pop_front(&mut st) {
                0 => break,
                k => evicted += k,
            }
        }
        self.metrics.evicted.inc_by(evicted);
        self.evict_aged(&mut st, now);
        let first = st.first();

        let mut groups: Vec<(String, JournaledGroup)> = Vec::new();
        for e in events {
            let find = |groups: &mut Vec<(String, JournaledGroup)>, g: &str| {
                groups.iter().position(|(n, _)| n == g)
            };
            match e {
                GroupEvent::Create {
                    group,
                    settings,
                    next,
                } => {
                    if let Some(i) = find(&mut groups, &group) {
                        groups.remove(i);
                    }
                    groups.push((
                        group,
                        JournaledGroup {
                            created: Some(settings),
                            next,
                            leases: Default::default(),
                        },
                    ));
                }
                GroupEvent::Delete { group } => {
                    if let Some(i) = find(&mut groups, &group) {
                        groups.remove(i);
                    }
                }
                GroupEvent::Position { group, next } => match find(&mut groups, &group) {
                    Some(i) => groups[i].1.next = next,
                    None => groups.push((
                        group,
                        JournaledGroup {
                            created: None,
                            next,
                            leases: Default::default(),
                        },
                    )),
                },
                GroupEvent::Lease {
                    group,
                    sequence,
                    attempt,
                } => {
                    if let Some(i) = find(&mut groups, &group) {
                        groups[i].1.leases.insert(sequence, attempt);
                    }
                }
                GroupEvent::Done { group, sequences } => {
                    if let Some(i) = find(&mut groups, &group) {
                        for s in sequences {
                            groups[i].1.leases.remove(&s);
                        }
                    }
                }
            }
        }
        for (name, g) in groups {
            let mut cursor = if name.is_empty() {
                match st.groups.remove("") {
                    Some(mut c) => {
                        c.next = g.next;
                        c.used = true;
                        c
                    }
                    None => continue,
                }
            } else {
                self.metrics.groups.inc();
                Self::new_group(&mut st, g.next, g.created.clone(), true)
            };
            if let Some(leases) = cursor.leases.as_deref_mut() {
                for (&seq, &attempt) in g.leases.range(first..) {
                    leases.restore(seq, attempt, now);
                }
            }
            st.groups.insert(Box::from(name.as_str()), cursor);
        }
        let journal = Self::journal_snapshot(&st);
        st.last_active = now;
        let retained = st.retained_messages() > 0;
        (retained, journal)
    }
}
