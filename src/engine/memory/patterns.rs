//! Wildcard (pattern) subscriptions: a subject trie of patterns in NATS syntax (tokens split by
//! `.`, `*` one token, `>` one or more trailing tokens), and per address a cache of the pattern
//! subscribers its messages go to.
//!
//! Send never scans the patterns: each address keeps the list of matching subscribers with the
//! trie's epoch it was computed at; the epoch moves when a pattern comes or goes, and the next
//! append to each address recomputes its list from the trie (one walk of the address's
//! tokens). With no pattern change an append pays one atomic load.
//!
//! A pattern subscriber is fed by push, under the address lock (so messages of one address
//! arrive in sequence order), into a bounded queue: at most [`PATTERN_QUEUE_MESSAGES`] messages
//! and [`PATTERN_QUEUE_BYTES`] bytes. A subscriber that falls further behind loses the oldest
//! queued messages and is told the exact count (`Dropped{count}`), like any subscriber that
//! falls behind retention. Queued messages are shared (`Arc`), so they cost memory beyond the
//! retention bounds only once retention has evicted them.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::{message::Message, validate::Pattern};

/// Most messages a pattern subscriber's queue holds before the oldest are dropped.
pub const PATTERN_QUEUE_MESSAGES: usize = 16_384;
/// Most bytes (as charged to retention) a pattern subscriber's queue holds.
pub const PATTERN_QUEUE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, Default)]
struct Queue {
    messages: VecDeque<Arc<Message>>,
    bytes: usize,
    /// Messages dropped from the front since the last pop.
    dropped: u64,
}

/// One pattern subscription's queue. See the module docs.
#[derive(Debug)]
pub struct PatternSub {
    id: u64,
    pattern: Pattern,
    queue: Mutex<Queue>,
    /// Woken (one permit) when a message is queued.
    pub(crate) notify: Notify,
    closed: AtomicBool,
}

impl PatternSub {
    fn push(&self, m: &Arc<Message>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        {
            let mut q = self.queue.lock();
            while !q.messages.is_empty()
                && (q.messages.len() >= PATTERN_QUEUE_MESSAGES
                    || q.bytes + m.size > PATTERN_QUEUE_BYTES)
            {
                if let Some(old) = q.messages.pop_front() {
                    q.bytes -= old.size;
                    q.dropped += 1;
                }
            }
            q.bytes += m.size;
            q.messages.push_back(Arc::clone(m));
        }
        self.notify.notify_one();
    }

    /// Moves up to `max` queued messages into `out`; returns how many were dropped before them.
    pub(crate) fn pop(&self, max: usize, out: &mut VecDeque<Arc<Message>>) -> u64 {
        let mut guard = self.queue.lock();
        let q: &mut Queue = &mut guard;
        let n = max.min(q.messages.len());
        for m in q.messages.drain(..n) {
            q.bytes -= m.size;
            out.push_back(m);
        }
        std::mem::take(&mut q.dropped)
    }
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Self>,
    star: Option<Box<Self>>,
    /// Patterns that end here.
    exact: Vec<Arc<PatternSub>>,
    /// Patterns that end with `>` here: any one or more further tokens.
    rest: Vec<Arc<PatternSub>>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty()
            && self.star.is_none()
            && self.exact.is_empty()
            && self.rest.is_empty()
    }

    fn insert(&mut self, tokens: &[&str], sub: Arc<PatternSub>) {
        match tokens.split_first() {
            None => self.exact.push(sub),
            Some((&">", _)) => self.rest.push(sub),
            Some((&"*", more)) => self.star.get_or_insert_with(Box::default).insert(more, sub),
            Some((t, more)) => self
                .children
                .entry(Box::from(*t))
                .or_default()
                .insert(more, sub),
        }
    }

    /// Removes subscription `id` along `tokens`, pruning nodes left empty.
    fn remove(&mut self, tokens: &[&str], id: u64) {
        match tokens.split_first() {
            None => self.exact.retain(|s| s.id != id),
            Some((&">", _)) => self.rest.retain(|s| s.id != id),
            Some((&"*", more)) => {
                if let Some(star) = self.star.as_deref_mut() {
                    star.remove(more, id);
                    if star.is_empty() {
                        self.star = None;
                    }
                }
            }
            Some((t, more)) => {
                if let Some(child) = self.children.get_mut(*t) {
                    child.remove(more, id);
                    if child.is_empty() {
                        self.children.remove(*t);
                    }
                }
            }
        }
    }

    fn collect(&self, tokens: &[&str], out: &mut Vec<Arc<PatternSub>>) {
        let Some((first, more)) = tokens.split_first() else {
            out.extend(self.exact.iter().cloned());
            return;
        };
        out.extend(self.rest.iter().cloned());
        if let Some(child) = self.children.get(*first) {
            child.collect(more, out);
        }
        if let Some(star) = &self.star {
            star.collect(more, out);
        }
    }
}

/// The engine's patterns. See the module docs.
#[derive(Debug, Default)]
pub struct PatternIndex {
    trie: RwLock<Node>,
    /// Moves whenever a pattern is added or removed (under the trie's write lock).
    epoch: AtomicU64,
    next_id: AtomicU64,
    count: AtomicU64,
}

impl PatternIndex {
    /// Registers a subscription to `pattern`; messages sent from now on to matching addresses
    /// are queued for it.
    pub(crate) fn subscribe(&self, pattern: Pattern) -> Arc<PatternSub> {
        let sub = Arc::new(PatternSub {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            pattern,
            queue: Mutex::default(),
            notify: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let mut trie = self.trie.write();
        let tokens: Vec<&str> = sub.pattern.as_str().split('.').collect();
        trie.insert(&tokens, Arc::clone(&sub));
        self.count.fetch_add(1, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        sub
    }

    /// Unregisters `sub`: nothing more is queued for it.
    pub(crate) fn unsubscribe(&self, sub: &PatternSub) {
        sub.closed.store(true, Ordering::Release);
        let mut trie = self.trie.write();
        let tokens: Vec<&str> = sub.pattern.as_str().split('.').collect();
        trie.remove(&tokens, sub.id);
        self.count.fetch_sub(1, Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Pattern subscriptions open now.
    pub(crate) fn len(&self) -> usize {
        usize::try_from(self.count.load(Ordering::Relaxed)).unwrap_or(usize::MAX)
    }

    fn matching(&self, address: &str) -> Vec<Arc<PatternSub>> {
        let tokens: Vec<&str> = address.split('.').collect();
        let mut out = Vec::new();
        self.trie.read().collect(&tokens, &mut out);
        out
    }
}

/// One address's cached list of matching pattern subscribers.
#[derive(Debug)]
pub(crate) struct PatternMatches {
    index: Option<Arc<PatternIndex>>,
    epoch: u64,
    subs: Vec<Arc<PatternSub>>,
}

impl Default for PatternMatches {
    fn default() -> Self {
        Self {
            index: None,
            // Never an epoch the index has had: the first append computes the list.
            epoch: u64::MAX,
            subs: Vec::new(),
        }
    }
}

impl PatternMatches {
    pub(crate) fn new(index: Arc<PatternIndex>) -> Self {
        Self {
            index: Some(index),
            ..Self::default()
        }
    }

    /// Queues `m` (sent to `address`) for every matching pattern subscriber.
    pub(crate) fn deliver(&mut self, address: &str, m: &Arc<Message>) {
        let Some(index) = &self.index else { return };
        let epoch = index.epoch.load(Ordering::SeqCst);
        if epoch != self.epoch {
            self.subs = index.matching(address);
            self.epoch = epoch;
        }
        for s in &self.subs {
            s.push(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(index: &PatternIndex, address: &str) -> Vec<String> {
        let mut v: Vec<String> = index
            .matching(address)
            .iter()
            .map(|s| s.pattern.as_str().to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn nats_subject_semantics() {
        let index = PatternIndex::default();
        let subs: Vec<_> = ["orders.*.created", "orders.>", "metrics.>", "*", "a.*.c.>"]
            .iter()
            .map(|p| index.subscribe(Pattern::parse(*p).unwrap()))
            .collect();
        assert_eq!(
            matches(&index, "orders.eu.created"),
            ["orders.*.created", "orders.>"]
        );
        assert_eq!(
            matches(&index, "orders"),
            ["*"],
            "> needs at least one more token"
        );
        assert_eq!(matches(&index, "orders.eu"), ["orders.>"]);
        assert_eq!(matches(&index, "orders.eu.created.x"), ["orders.>"]);
        assert!(matches(&index, "metric.cpu").is_empty());
        assert_eq!(matches(&index, "a.b.c.d.e"), ["a.*.c.>"]);
        assert!(matches(&index, "a.b.c").is_empty());
        for s in &subs {
            index.unsubscribe(s);
        }
        assert!(index.trie.read().is_empty(), "pruned");
        assert_eq!(index.len(), 0);
    }
}
