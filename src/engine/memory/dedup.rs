//! Publish deduplication of one address (NATS JetStream's `Nats-Msg-Id` duplicate window): a
//! `message_id` seen within the window, whose message is still retained, maps to the sequence
//! it was stored under.
//!
//! Ids are kept in send order, so expiry (older than the window) and eviction (the message left
//! the retention window) both remove from the front: amortised O(1) per Send, and the memory is
//! bounded by what retention keeps. Cost per remembered id: its bytes once (shared by the map
//! and the queue) plus about 100 bytes of map and queue entries.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use tokio::time::Instant;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Dedup {
    ids: HashMap<Arc<str>, u64>,
    order: VecDeque<(Instant, u64, Arc<str>)>,
}

impl Dedup {
    /// Forgets ids older than `window` at `now`, and ids whose message is below `first` (no
    /// longer retained).
    pub(super) fn prune(&mut self, now: Instant, window: Duration, first: u64) {
        while let Some((t, seq, id)) = self.order.front() {
            if now.saturating_duration_since(*t) < window && *seq >= first {
                break;
            }
            if self.ids.get(id) == Some(seq) {
                self.ids.remove(id);
            }
            self.order.pop_front();
        }
    }

    /// The sequence `id` was stored under, if it is remembered.
    pub(super) fn lookup(&self, id: &str) -> Option<u64> {
        self.ids.get(id).copied()
    }

    /// Forgets the ids of messages from `seq` on (their write failed: they were never stored).
    pub(super) fn forget_from(&mut self, seq: u64) {
        while self.order.back().is_some_and(|(_, s, _)| *s >= seq) {
            if let Some((_, s, id)) = self.order.pop_back() {
                if self.ids.get(&id) == Some(&s) {
                    self.ids.remove(&id);
                }
            }
        }
    }

    /// Remembers `id` for the message stored as `seq` at `now`.
    pub(super) fn record(&mut self, id: &str, seq: u64, now: Instant) {
        let id: Arc<str> = Arc::from(id);
        self.ids.insert(Arc::clone(&id), seq);
        self.order.push_back((now, seq, id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_expire_with_the_window_and_with_eviction() {
        let t0 = Instant::now();
        let w = Duration::from_secs(120);
        let mut d = Dedup::default();
        d.record("a", 1, t0);
        d.record("b", 2, t0 + Duration::from_secs(60));
        d.prune(t0 + Duration::from_secs(119), w, 1);
        assert_eq!((d.lookup("a"), d.lookup("b")), (Some(1), Some(2)));
        d.prune(t0 + Duration::from_secs(120), w, 1);
        assert_eq!((d.lookup("a"), d.lookup("b")), (None, Some(2)));
        // "b" evicted by retention (first retained is now 3).
        d.prune(t0 + Duration::from_secs(121), w, 3);
        assert_eq!(d.lookup("b"), None);
        assert!(d.order.is_empty() && d.ids.is_empty());
        // A re-used id after expiry maps to its new message; the old queue entry does not
        // remove it.
        d.record("c", 4, t0);
        d.record("c", 9, t0 + Duration::from_secs(130));
        d.prune(t0 + Duration::from_secs(125), w, 1);
        assert_eq!(d.lookup("c"), Some(9));
    }
}
