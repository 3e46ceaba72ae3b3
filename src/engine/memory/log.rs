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
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::SystemTime,
};

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::{sync::Notify, time::Instant};

use super::{
    budget::Budget,
    dedup::Dedup,
    lease::{Leases, Outcome},
    patterns::{PatternIndex, PatternMatches},
};
use crate::{
    engine::{
        AddressInfo, Batch, DeadLetter, Delivery, GroupInfo, GroupSettings, Retention, Settle,
        Settled, StartAt, Taken,
    },
    error::BrokerError,
    message::{encode_message, Message, WireFrame},
    metrics::Metrics,
    validate::Headers,
};

struct Entry {
    message: Arc<Message>,
    /// When it was appended (monotonic), for the age bound.
    appended: Instant,
    /// Fan-out subscribers registered at append time that have not yet been handed it.
    pending_subscribers: u32,
    /// The message encoded for the wire, shared by the fan-out subscribers still owed it and
    /// dropped when the last one has it, so retained messages do not carry a second copy.
    frame: Option<WireFrame>,
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
    /// Which of the budget's age queues this address's messages go to.
    pub(crate) age_queue: usize,
    /// Mirror of the first retained sequence (or the next sequence when empty), readable without
    /// the lock by the budget's stale-entry checks.
    first_seq: AtomicU64,
    /// Set (under the lock) when the engine reclaims or deletes the address.
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
        age_queue: usize,
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
            },
        );
        Self {
            name,
            state: Mutex::new(State {
                next_seq: 1,
                window: VecDeque::new(),
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
        self.first_seq.store(st.first(), Ordering::Release);
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

    /// Evicts the messages older than the age bound (front of the window only: entries are in
    /// append order). Returns how many left.
    pub(crate) fn evict_aged(&self, st: &mut State, now: Instant) -> usize {
        let Some(age) = self.retention.age else {
            return 0;
        };
        let mut n = 0;
        while st
            .window
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.appended) >= age)
        {
            self.pop_front(st);
            n += 1;
        }
        if n > 0 {
            self.sync_first(st);
            self.metrics.evicted.inc_by(n as u64);
        }
        n
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
    /// [`Self::duplicate_of`] first) it is remembered for deduplication. Returns the stored
    /// message. The caller wakes waiters after unlocking.
    pub(crate) fn append(
        &self,
        st: &mut State,
        payload: Bytes,
        headers: Headers,
        size: usize,
        message_id: Option<&str>,
    ) -> Arc<Message> {
        let now = Instant::now();
        self.evict_aged(st, now);
        let mut evicted = 0;
        while !st.window.is_empty()
            && (st.window.len() >= self.retention.messages
                || st.retained_bytes + size > self.retention.bytes)
        {
            self.pop_front(st);
            evicted += 1;
        }
        if evicted > 0 {
            self.metrics.evicted.inc_by(evicted);
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
            appended: now,
            pending_subscribers: st.fanout,
            frame: None,
        });
        st.last_active = now;
        self.budget.charge(self.age_queue, size);
        self.sync_first(st);
        if let (Some(id), Some(_)) = (message_id, self.dedup_window) {
            st.dedup.record(id, message.sequence, now);
        }
        // Under the address lock, so each pattern subscriber sees this address in order.
        st.patterns.deliver(&self.name, &message);
        message
    }

    /// Evicts every entry up to and including `sequence`: the broker-wide byte bound's "discard
    /// old". Returns how many left.
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

    /// The sequence a reader starting at `start` reads first.
    ///
    /// # Errors
    /// [`BrokerError::PastEnd`] for a sequence beyond the last one + 1.
    fn position(st: &State, start: StartAt) -> Result<u64, BrokerError> {
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
        }
    }

    /// Dead letters for `dead` (sequence, deliveries) of `group`; messages no longer retained
    /// are skipped (their loss is reported as `dropped`).
    fn dead_letters(
        &self,
        window: &VecDeque<Entry>,
        first: u64,
        group: &str,
        to: Option<&crate::validate::Address>,
        dead: &[(u64, u32)],
        out: &mut Vec<DeadLetter>,
    ) {
        self.metrics.dead_lettered.inc_by(dead.len() as u64);
        let Some(to) = to else { return };
        for &(seq, deliveries) in dead {
            let i = usize::try_from(seq.saturating_sub(first)).unwrap_or(usize::MAX);
            if let Some(e) = window.get(i).filter(|_| seq >= first) {
                out.push(DeadLetter {
                    message: Arc::clone(&e.message),
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
    /// group's id with the batch.
    pub(crate) fn take(
        &self,
        st: &mut State,
        group: &str,
        expect: Option<u64>,
        max: usize,
        holder: u64,
    ) -> Result<(u64, Batch), BrokerError> {
        let now = Instant::now();
        self.evict_aged(st, now);
        let first = st.first();
        if !st.groups.contains_key(group) {
            if expect.is_some() {
                return Err(BrokerError::GroupDeleted);
            }
            self.metrics.groups.inc();
            let next = st.next_seq;
            let cursor = Self::new_group(st, next, None, true);
            st.groups.insert(Box::from(group), cursor);
        }
        let State {
            groups,
            window,
            next_seq,
            last_active,
            ..
        } = st;
        let Some(cursor) = groups.get_mut(group) else {
            return Err(BrokerError::GroupDeleted);
        };
        if expect.is_some_and(|id| id != cursor.id) {
            return Err(BrokerError::GroupDeleted);
        }
        cursor.used = true;
        if cursor.next < first {
            cursor.dropped += first - cursor.next;
            cursor.next = first;
        }
        let entry = |seq: u64| {
            let i = usize::try_from(seq.saturating_sub(first)).unwrap_or(usize::MAX);
            window.get(i).filter(|_| seq >= first)
        };
        let mut batch = Batch::default();
        match cursor.leases.as_deref_mut() {
            None => {
                let start = usize::try_from(cursor.next - first).unwrap_or(usize::MAX);
                batch
                    .messages
                    .extend(window.iter().skip(start).take(max).map(|e| Taken {
                        message: Arc::clone(&e.message),
                        attempt: 0,
                    }));
                cursor.next += batch.messages.len() as u64;
            }
            Some(leases) => {
                cursor.dropped += leases.evict_below(first);
                let dead = leases.expire(now);
                let to = leases.policy.dead_letter.clone();
                self.dead_letters(
                    window,
                    first,
                    group,
                    to.as_ref(),
                    &dead,
                    &mut batch.dead_letters,
                );
                let again = leases.redeliver(now, max, holder);
                self.metrics.redelivered.inc_by(again.len() as u64);
                for (seq, attempt) in again {
                    if let Some(e) = entry(seq) {
                        batch.messages.push(Taken {
                            message: Arc::clone(&e.message),
                            attempt,
                        });
                    }
                }
                while batch.messages.len() < max && leases.has_room() && cursor.next < *next_seq {
                    let Some(e) = entry(cursor.next) else { break };
                    leases.lease_new(cursor.next, now, holder);
                    batch.messages.push(Taken {
                        message: Arc::clone(&e.message),
                        attempt: 1,
                    });
                    cursor.next += 1;
                }
                batch.next_due = leases.next_due();
            }
        }
        batch.dropped = std::mem::take(&mut cursor.dropped);
        let id = cursor.id;
        self.metrics.delivered.inc_by(batch.messages.len() as u64);
        if batch.dropped > 0 {
            self.metrics.dropped.inc_by(batch.dropped);
        }
        *last_active = now;
        Ok((id, batch))
    }

    /// Ack, Nack or ExtendLease of `sequences` for `group`.
    ///
    /// # Errors
    /// [`BrokerError::NotAcknowledged`] (`FAILED_PRECONDITION`) when the group is the default
    /// group, unknown, or has no `ack_wait`.
    pub(crate) fn settle(
        &self,
        st: &mut State,
        group: &str,
        sequences: &[u64],
        op: Settle,
    ) -> Result<Settled, BrokerError> {
        let now = Instant::now();
        self.evict_aged(st, now);
        let first = st.first();
        let State { groups, window, .. } = st;
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
        for &seq in sequences {
            match leases.settle(seq, op, now) {
                Outcome::Settled => acked += u64::from(op == Settle::Ack),
                Outcome::NotPending => out.not_pending.push(seq),
                Outcome::DeadLetter(n) => dead.push((seq, n)),
            }
        }
        self.metrics.acked.inc_by(acked);
        let to = leases.policy.dead_letter.clone();
        self.dead_letters(
            window,
            first,
            group,
            to.as_ref(),
            &dead,
            &mut out.dead_letters,
        );
        st.last_active = now;
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
        &self,
        st: &mut State,
        group: &str,
        settings: GroupSettings,
    ) -> Result<(bool, u64), BrokerError> {
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
            c.created = Some(existing);
            return Ok((false, c.next.max(first)));
        }
        let next = Self::position(st, settings.start)?;
        self.metrics.groups.inc();
        let cursor = Self::new_group(st, next, Some(settings), false);
        st.groups.insert(Box::from(group), cursor);
        st.last_active = Instant::now();
        Ok((true, next.max(first)))
    }

    /// DeleteGroup: forgets a named group. The caller wakes waiters after unlocking, so that
    /// waiting Recv calls and the group's streams see it gone.
    ///
    /// # Errors
    /// [`BrokerError::NoSuchGroup`] when the address has no such group.
    pub(crate) fn delete_group(&self, st: &mut State, group: &str) -> Result<(), BrokerError> {
        if st.groups.remove(group).is_none() {
            return Err(BrokerError::NoSuchGroup {
                address: self.name.to_string(),
                group: group.to_string(),
            });
        }
        self.metrics.groups.dec();
        st.last_active = Instant::now();
        Ok(())
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
        let cursor = Self::position(st, start)?;
        st.fanout += 1;
        st.subscribers += 1;
        self.metrics.subscribers.inc();
        st.last_active = Instant::now();
        Ok((cursor, st.next_seq))
    }

    /// Registers a group stream (creating the group on first use); returns the group's id.
    pub(crate) fn subscribe_group(&self, st: &mut State, group: &str) -> u64 {
        let id = match st.groups.get(group) {
            Some(c) => c.id,
            None => {
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
        id
    }

    /// Hands a fan-out subscriber at `cursor` up to `max` messages, each with its wire frame
    /// when one is shared, into `out`; returns how many it lost to retention since its last
    /// read. `registered` is the sequence from which appends counted this subscriber.
    pub(crate) fn read_fanout(
        &self,
        st: &mut State,
        cursor: &mut u64,
        registered: u64,
        max: usize,
        out: &mut VecDeque<Delivery>,
    ) -> u64 {
        self.evict_aged(st, Instant::now());
        let first = st.first();
        let mut dropped = 0;
        if *cursor < first {
            dropped = first - *cursor;
            *cursor = first;
        }
        let start = usize::try_from(*cursor - first).unwrap_or(usize::MAX);
        let before = out.len();
        for e in st.window.iter_mut().skip(start).take(max) {
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
        let first = st.first();
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
    pub(crate) fn sweep(&self, dead_letters: &mut Vec<DeadLetter>) -> usize {
        let now = Instant::now();
        let mut st = self.state.lock();
        let aged = self.evict_aged(&mut st, now);
        let first = st.first();
        let State { groups, window, .. } = &mut *st;
        let mut ready = false;
        for (name, cursor) in groups.iter_mut() {
            let Some(leases) = cursor.leases.as_deref_mut() else {
                continue;
            };
            cursor.dropped += leases.evict_below(first);
            let dead = leases.expire(now);
            ready |= leases.has_ready();
            let to = leases.policy.dead_letter.clone();
            self.dead_letters(window, first, name, to.as_ref(), &dead, dead_letters);
        }
        drop(st);
        if ready {
            // Readers waiting for room or for a redelivery.
            self.notify.notify_waiters();
        }
        aged
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

    /// Deletes the address (the engine has already removed it from the map): purges its
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
        // Free what the address held beyond its messages (window capacity, groups, ids):
        // handles to it may live on for a while (age entries, subscribers ending).
        st.window = VecDeque::new();
        st.dedup = Dedup::default();
        st.closed = true;
        self.closed.store(true, Ordering::Release);
        self.deleted.store(true, Ordering::Release);
        self.metrics.groups.dec_by(gauge(st.groups.len()));
        self.sync_first(&st);
        drop(st);
        self.notify.notify_waiters();
        purged
    }

    /// Drops the window's spare capacity (idle maintenance).
    pub(crate) fn shrink(&self) {
        let mut st = self.state.lock();
        st.window.shrink_to_fit();
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
        self.window
            .front()
            .map_or(self.next_seq, |e| e.message.sequence)
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
        self.window.len()
    }

    /// Bytes the window holds, as charged against the bounds.
    pub(crate) fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }
}
