//! The disk engine's message cache (`--cache-bytes`): which retained messages keep their
//! payload and headers in memory.
//!
//! Messages are admitted when they become visible (and at start-up, in log order), oldest
//! first out: once the admitted bytes pass the limit, the oldest admitted message is made
//! *hollow* (its payload and headers dropped; its sequence, time, size and record location
//! stay), and readers load it back from its segment when they need it, without re-admitting it.
//! A message evicted by retention before it leaves the cache still counts until its turn comes,
//! so the cache errs on the side of holding less. Cost per message in the cache: one queue entry
//! (about 32 bytes); the queue is bounded because every entry counts at least 128 bytes (the
//! per-message overhead in `size`).

use std::{collections::VecDeque, sync::Arc};

use parking_lot::Mutex;

use crate::engine::memory::AddressLog;

/// The messages in the cache, oldest first: (address, sequence, bytes); and their bytes.
#[derive(Debug, Default)]
struct Admitted {
    queue: VecDeque<(Arc<AddressLog>, u64, usize)>,
    bytes: usize,
}

/// See the module docs.
#[derive(Debug)]
pub struct Cache {
    limit: usize,
    admitted: Mutex<Admitted>,
}

impl Cache {
    /// A cache of `limit` bytes (payload + headers + 128 per message); 0 keeps nothing.
    pub fn new(limit: usize) -> Self {
        Self {
            limit,
            admitted: Mutex::new(Admitted::default()),
        }
    }

    /// Admits `sequence` of `log` (`size` bytes), then hollows the oldest admitted messages
    /// while the cache holds more than its limit. Call it with no address lock held.
    pub fn admit(&self, log: &Arc<AddressLog>, sequence: u64, size: usize) {
        let out = {
            let mut a = self.admitted.lock();
            a.queue.push_back((Arc::clone(log), sequence, size));
            a.bytes += size;
            let mut out = Vec::new();
            while a.bytes > self.limit {
                let Some(oldest) = a.queue.pop_front() else {
                    break;
                };
                a.bytes -= oldest.2;
                out.push(oldest);
            }
            out
        };
        for (log, sequence, _) in out {
            log.hollow(sequence);
        }
    }

    /// Forgets every entry (they hold their addresses; the engine breaks that cycle on drop).
    pub fn clear(&self) {
        let mut a = self.admitted.lock();
        a.queue.clear();
        a.bytes = 0;
    }
}
