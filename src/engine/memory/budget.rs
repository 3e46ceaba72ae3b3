//! The broker-wide retention byte bound and its "discard old" eviction.
//!
//! Every retained message is charged to one [`Budget`]. When a Send takes the total above
//! `--max-retained-bytes`, the oldest retained messages broker-wide are evicted until it is back
//! under, whichever address holds them (NATS JetStream's `DiscardOld`).
//!
//! "Oldest" is by append time. Each address's messages are in append order, so the oldest
//! message broker-wide is the oldest *front* among the addresses: the budget keeps one heap
//! entry per address that holds messages, keyed by when its front message was appended. Keys
//! go stale as an address's front moves on (its own retention, or evictions); they only ever
//! grow, so a popped entry whose address's front is newer than its key is pushed back with the
//! new key (a lazy heap). The cost is one entry per address, not per message, which keeps a
//! disk-mode broker's memory independent of how many messages it retains; the Send path pays
//! one atomic swap per append (and the heap's lock only when an address goes from empty to
//! holding a message).

use std::{
    cmp::{Ordering as CmpOrdering, Reverse},
    collections::BinaryHeap,
    sync::{
        atomic::{AtomicI64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::log::{AddressLog, Oldest};

/// An address in the heap, keyed by when its front message was appended (at the time of
/// the push).
struct Held {
    appended: Instant,
    address: Arc<AddressLog>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for Held {}

impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for Held {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.appended
            .cmp(&other.appended)
            .then_with(|| Arc::as_ptr(&self.address).cmp(&Arc::as_ptr(&other.address)))
    }
}

/// Bytes retained broker-wide, with the eviction heap. See the module docs.
pub struct Budget {
    /// Retained bytes now; signed because a release may be seen before its charge.
    used: AtomicI64,
    /// Retained messages now.
    live: AtomicI64,
    limit: i64,
    /// The addresses holding messages, oldest front first.
    held: Mutex<BinaryHeap<Reverse<Held>>>,
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
            live: AtomicI64::new(0),
            limit: to_i64(limit),
            held: Mutex::new(BinaryHeap::new()),
        }
    }

    /// Bytes retained broker-wide now.
    pub fn used(&self) -> usize {
        usize::try_from(self.used.load(Ordering::Acquire)).unwrap_or(0)
    }

    /// Forgets every heap entry. Entries hold their address, and addresses hold the budget:
    /// the broker calls this when it is dropped, to break that cycle.
    pub(crate) fn clear(&self) {
        self.held.lock().clear();
    }

    /// Drops the entries of addresses that hold nothing now (deleted, reclaimed or emptied by
    /// retention) and the heap's spare capacity. O(addresses); the engine calls it only while
    /// the broker is idle.
    pub(crate) fn compact(&self) {
        let mut held = self.held.lock();
        held.retain(|Reverse(h)| {
            let keep = h.address.holds_messages();
            if !keep {
                h.address.set_in_budget(false);
            }
            keep
        });
        held.shrink_to_fit();
        drop(held);
    }

    /// Heap entries held now (one per address holding messages, plus stale ones).
    #[cfg(test)]
    pub(crate) fn entries(&self) -> usize {
        self.held.lock().len()
    }

    /// Messages retained broker-wide now.
    pub fn live_messages(&self) -> usize {
        usize::try_from(self.live.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Charges `n` appended messages of `bytes` in all (called under their address lock;
    /// atomics only).
    pub(crate) fn charge(&self, n: u64, bytes: usize) {
        self.used.fetch_add(to_i64(bytes), Ordering::AcqRel);
        self.live
            .fetch_add(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Returns `n` removed messages' `bytes` (called under their address lock; atomics only).
    pub(crate) fn release(&self, n: u64, bytes: usize) {
        self.used.fetch_sub(to_i64(bytes), Ordering::AcqRel);
        self.live
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// Notes that `address` holds messages (after an append, with its lock released), then
    /// evicts the oldest messages broker-wide while the bound is exceeded. Returns how many
    /// were evicted.
    pub(crate) fn record(&self, address: &Arc<AddressLog>) -> usize {
        // A read first: the flag is almost always set already, and a write on every append
        // would bounce the address's cache line between cores.
        if !address.in_budget() && !address.set_in_budget(true) {
            self.push(address);
        }
        if self.used.load(Ordering::Acquire) > self.limit {
            self.evict_oldest()
        } else {
            0
        }
    }

    /// Puts `address` (flagged as in the heap by the caller) into the heap with its front's
    /// time, or unflags it when it holds nothing.
    fn push(&self, address: &Arc<AddressLog>) {
        match address.oldest() {
            Oldest::At(appended) => self.held.lock().push(Reverse(Held {
                appended,
                address: Arc::clone(address),
            })),
            _ => Self::unflag(address, &mut self.held.lock()),
        }
    }

    /// Marks `address` as out of the heap; if it gained a message meanwhile (its `record` saw
    /// the flag still set and skipped the push), puts it back.
    fn unflag(address: &Arc<AddressLog>, held: &mut BinaryHeap<Reverse<Held>>) {
        address.set_in_budget(false);
        if let Oldest::At(appended) = address.oldest() {
            if !address.set_in_budget(true) {
                held.push(Reverse(Held {
                    appended,
                    address: Arc::clone(address),
                }));
            }
        }
    }

    fn evict_oldest(&self) -> usize {
        let mut evicted = 0;
        let mut held = self.held.lock();
        while self.used.load(Ordering::Acquire) > self.limit {
            let Some(Reverse(top)) = held.pop() else {
                break;
            };
            match top.address.evict_oldest_if(top.appended) {
                Oldest::Empty => Self::unflag(&top.address, &mut held),
                // Its front moved on since the key was set: back in with the right key.
                Oldest::At(appended) => held.push(Reverse(Held {
                    appended,
                    address: top.address,
                })),
                Oldest::Evicted(n, next) => {
                    evicted += n;
                    match next {
                        Some(appended) => held.push(Reverse(Held {
                            appended,
                            address: top.address,
                        })),
                        None => Self::unflag(&top.address, &mut held),
                    }
                }
            }
        }
        usize::try_from(evicted).unwrap_or(usize::MAX)
    }
}
