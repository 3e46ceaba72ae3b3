//! The broker-wide retention byte bound and its "discard old" eviction.
//!
//! Every retained message is charged to one [`Budget`]. When a Send takes the total above
//! `--max-retained-bytes`, the oldest retained messages broker-wide are evicted until it is back
//! under, whichever address holds them (NATS JetStream's `DiscardOld`). Age order across
//! addresses comes from a global stamp; to keep a global lock off the Send path, messages are
//! recorded in [`AGE_QUEUES`] queues (by address hash), each in age order, and eviction takes the
//! oldest front among them.
//!
//! One entry covers a run of messages of one address with consecutive sequences *and*
//! consecutive stamps (nothing else was recorded between them), so a busy address costs one
//! entry per run, not one per message, and the order stays exact.
//!
//! Entries of messages that were consumed (or whose address was reclaimed) go stale: they are
//! skipped at the front, and a queue is compacted when it holds more than twice its live entries
//! plus [`COMPACT_SLACK`], so stale entries cost amortised O(1) and bounded memory.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicI64, AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use super::log::AddressLog;

/// Number of age queues (a power of two above the core count keeps Sends on different
/// addresses off each other's lock).
pub(crate) const AGE_QUEUES: usize = 16;
/// Stale entries a queue may hold beyond its live ones before it is compacted.
const COMPACT_SLACK: usize = 1024;

struct AgeEntry {
    /// The stamp of `first`; the entry's later messages have the stamps after it.
    stamp: u64,
    first: u64,
    last: u64,
    address: Arc<AddressLog>,
}

impl AgeEntry {
    fn is_live(&self) -> bool {
        self.address.retains(self.last)
    }

    /// Skips the messages already gone from the front of the entry.
    fn catch_up(&mut self) {
        let retained = self.address.first_retained();
        if retained > self.first && retained <= self.last {
            self.stamp += retained - self.first;
            self.first = retained;
        }
    }
}

/// Drops the stale entries at the front of `entries` and moves the first live one to its
/// first retained message.
fn skip_stale(entries: &mut VecDeque<AgeEntry>) {
    while entries.front().is_some_and(|e| !e.is_live()) {
        entries.pop_front();
    }
    if let Some(e) = entries.front_mut() {
        e.catch_up();
    }
}

#[derive(Default)]
struct AgeQueue {
    entries: Mutex<VecDeque<AgeEntry>>,
    /// Messages of this queue's addresses retained now.
    live: AtomicI64,
}

/// Bytes retained broker-wide, with the eviction queues. See the module docs.
pub struct Budget {
    /// Retained bytes now; signed because a release may be seen before its charge.
    used: AtomicI64,
    limit: i64,
    stamp: AtomicU64,
    queues: Box<[AgeQueue]>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("used", &self.used.load(Ordering::Relaxed))
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

fn to_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Budget {
    /// A budget of `limit` bytes.
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            used: AtomicI64::new(0),
            limit: to_i64(limit),
            stamp: AtomicU64::new(0),
            queues: (0..AGE_QUEUES).map(|_| AgeQueue::default()).collect(),
        }
    }

    /// Bytes retained broker-wide now.
    pub fn used(&self) -> usize {
        usize::try_from(self.used.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Forgets every age entry. Entries hold their address, and addresses hold the budget: the
    /// broker calls this when it is dropped, to break that cycle.
    pub(crate) fn clear(&self) {
        for q in self.queues.iter() {
            q.entries.lock().clear();
        }
    }

    /// Drops every stale age entry (consumed, evicted, or of a deleted address) and the queues'
    /// spare capacity. O(entries); the engine calls it only while the broker is idle.
    pub(crate) fn compact(&self) {
        for q in self.queues.iter() {
            let mut entries = q.entries.lock();
            entries.retain(AgeEntry::is_live);
            entries.shrink_to_fit();
        }
    }

    /// Age entries held now (each covers a run of messages).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.queues.iter().map(|q| q.entries.lock().len()).sum()
    }

    /// Messages retained broker-wide now.
    pub fn live_messages(&self) -> usize {
        let n: i64 = self
            .queues
            .iter()
            .map(|q| q.live.load(Ordering::Relaxed))
            .sum();
        usize::try_from(n).unwrap_or(0)
    }

    /// Charges one appended message (called under its address lock; atomics only).
    pub(crate) fn charge(&self, queue: usize, size: usize) {
        self.used.fetch_add(to_i64(size), Ordering::AcqRel);
        if let Some(q) = self.queues.get(queue) {
            q.live.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Returns one removed message's bytes (called under its address lock; atomics only).
    pub(crate) fn release(&self, queue: usize, size: usize) {
        self.used.fetch_sub(to_i64(size), Ordering::AcqRel);
        if let Some(q) = self.queues.get(queue) {
            q.live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Returns `n` removed messages' `bytes` at once (a cold run dropped whole).
    pub(crate) fn release_many(&self, queue: usize, n: u64, bytes: usize) {
        self.used.fetch_sub(to_i64(bytes), Ordering::AcqRel);
        if let Some(q) = self.queues.get(queue) {
            q.live
                .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
    }

    /// Records an appended message's age (after its address lock is released), then evicts the
    /// oldest messages broker-wide while the bound is exceeded. Returns how many were evicted.
    pub(crate) fn record(&self, address: &Arc<AddressLog>, sequence: u64) -> usize {
        let stamp = self.stamp.fetch_add(1, Ordering::Relaxed);
        if let Some(q) = self.queues.get(address.age_queue) {
            let mut entries = q.entries.lock();
            match entries.back_mut() {
                Some(e)
                    if Arc::ptr_eq(&e.address, address)
                        && e.last + 1 == sequence
                        && e.stamp + (e.last - e.first) + 1 == stamp =>
                {
                    e.last = sequence;
                }
                _ => entries.push_back(AgeEntry {
                    stamp,
                    first: sequence,
                    last: sequence,
                    address: Arc::clone(address),
                }),
            }
            skip_stale(&mut entries);
            let live = usize::try_from(q.live.load(Ordering::Relaxed)).unwrap_or(0);
            if entries.len() > 2 * live + COMPACT_SLACK {
                entries.retain(AgeEntry::is_live);
            }
        }
        if self.used.load(Ordering::Acquire) > self.limit {
            self.evict_oldest()
        } else {
            0
        }
    }

    /// Records the retained messages `first..=last` of `address` at once, oldest first, as one
    /// entry (start-up), then evicts as [`Self::record`] does.
    pub(crate) fn record_range(&self, address: &Arc<AddressLog>, first: u64, last: u64) -> usize {
        let n = last.saturating_sub(first) + 1;
        let stamp = self.stamp.fetch_add(n, Ordering::Relaxed);
        if let Some(q) = self.queues.get(address.age_queue) {
            q.entries.lock().push_back(AgeEntry {
                stamp,
                first,
                last,
                address: Arc::clone(address),
            });
        }
        if self.used.load(Ordering::Acquire) > self.limit {
            self.evict_oldest()
        } else {
            0
        }
    }

    /// Charges `n` messages of `bytes` at once (start-up).
    pub(crate) fn charge_many(&self, queue: usize, n: u64, bytes: usize) {
        self.used.fetch_add(to_i64(bytes), Ordering::AcqRel);
        if let Some(q) = self.queues.get(queue) {
            q.live
                .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
        }
    }

    fn evict_oldest(&self) -> usize {
        let mut evicted = 0;
        while self.used.load(Ordering::Acquire) > self.limit {
            let mut oldest: Option<(u64, usize)> = None;
            for (i, q) in self.queues.iter().enumerate() {
                let mut entries = q.entries.lock();
                skip_stale(&mut entries);
                if let Some(e) = entries.front() {
                    if oldest.is_none_or(|(s, _)| e.stamp < s) {
                        oldest = Some((e.stamp, i));
                    }
                }
            }
            let Some((stamp, i)) = oldest else { break };
            // The oldest message: take it off its entry (the entry's next message is one
            // stamp younger), then evict it.
            let entry = {
                let Some(q) = self.queues.get(i) else { break };
                let mut entries = q.entries.lock();
                match entries.front_mut() {
                    Some(e) if e.stamp == stamp && e.first < e.last => {
                        let one = (Arc::clone(&e.address), e.first);
                        e.first += 1;
                        e.stamp += 1;
                        Some(one)
                    }
                    Some(e) if e.stamp == stamp => {
                        entries.pop_front().map(|e| (e.address, e.first))
                    }
                    _ => None,
                }
            };
            if let Some((address, sequence)) = entry {
                evicted += address.evict_through(sequence);
            }
        }
        evicted
    }
}
