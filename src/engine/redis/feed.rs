//! Following an address on one node: one task per followed address reads its stream with
//! `XREAD BLOCK` (batches of up to [`READ_BATCH`]) on a connection of its own and keeps the
//! newest messages in a ring ([`RING_MESSAGES`] / [`RING_BYTES`]) with their wire frames,
//! encoded once and shared by every local fan-out subscriber. It also wakes the node's waiting
//! Recv calls and group streams on the address when a message arrives, whichever node sent it:
//! fan-out subscribers all (they copy from the ring), but per consumer group only as many group
//! readers as messages arrived ([`Takers`]), since each woken group reader runs a take script in
//! Redis. Waking every one of a group's readers per message made 8 Recv workers run ~4 take
//! scripts per message, and a pool of N workers would run N.
//!
//! The node's own appends do not come back through Redis: when an append script's reply
//! arrives, the appending node puts the messages straight into its feed (`Feed::push_own`,
//! with the sequences and `sent_at` from the reply) if they follow the ring's newest one. The
//! task then blocks with `COUNT 1` (a probe) rather than a full batch; when the probe returns an
//! entry it first waits for this node's append scripts issued so far to be answered (Redis runs
//! an append and answers a blocked read in the same turn, on two connections), and reads a
//! batch only if the entry is still missing, which means another node sent it. Reading back a
//! node's own appends was ~70 % of its CPU on the Redis SendStream benchmark (BENCHMARKS, W10).
//! After a probe that had to read, the task reads full batches until a batch brings nothing new.
//!
//! A reader behind the ring reads Redis directly (`XRANGE`); a reader in the ring copies from it
//! under a short lock. The task ends once the address has no local reader (checked at least
//! every [`BLOCK`]). A deleted address is noticed by its epoch (see `scripts`): when a blocking
//! read times out and the epoch has changed, local readers end with `NOT_FOUND`.
//!
//! When Redis is unreachable the task retries every 500 ms; readers wait and resume where they
//! were when it is back.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use parking_lot::Mutex;
use redis::Value;
use tokio::sync::Notify;

use super::{Conn, RedisEngine};
use crate::{
    engine::Delivery,
    message::{encode_message, Message},
};

/// Longest one blocking read waits before the task checks its readers and the epoch.
pub const BLOCK: Duration = Duration::from_secs(1);
/// Most entries one blocking read returns.
pub const READ_BATCH: usize = 512;
/// Most recent messages the ring keeps per followed address.
pub const RING_MESSAGES: usize = 4096;
/// Most bytes (as charged to retention) the ring keeps per followed address.
pub const RING_BYTES: usize = 32 * 1024 * 1024;

#[derive(Debug, Default)]
struct State {
    ring: VecDeque<Delivery>,
    ring_bytes: usize,
    /// The sequence after the newest one read; 0 until the first read of the address's state.
    next: u64,
    /// The address's epoch when following began (`None`: it did not exist yet).
    epoch: Option<String>,
    deleted: bool,
}

/// One consumer group's readers on this node (waiting Recv calls and group streams) for one
/// followed address: woken one per new message, in the order they began to wait (`notify_one`;
/// a reader that stops waiting after it was woken hands the wake-up to the next).
#[derive(Debug, Default)]
pub struct Takers {
    /// Woken when messages arrive (one reader per message) or the address is deleted (all).
    notify: Notify,
    readers: AtomicUsize,
}

/// One followed address on this node. See the module docs.
#[derive(Debug)]
pub struct Feed {
    address: Arc<str>,
    state: Mutex<State>,
    notify: Notify,
    /// Group readers by group name.
    groups: Mutex<HashMap<Arc<str>, Arc<Takers>>>,
    /// Local readers: fan-out subscribers, group streams, waiting Recv calls.
    users: AtomicUsize,
    subscribers: AtomicUsize,
    waiters: AtomicUsize,
    /// Append scripts for the address this node has issued / had answered while followed.
    issued: AtomicU64,
    answered: AtomicU64,
    /// Woken when an append script is answered.
    answer: Notify,
}

/// What a reader at sequence `next` finds in the ring.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// This many messages were copied out.
    Copied(usize),
    /// Nothing past `next` yet: wait for [`Feed::notify`].
    Nothing,
    /// `next` is older than the ring: read from Redis, up to (not including) this sequence.
    Behind(u64),
    /// The address was deleted.
    Deleted,
}

impl Feed {
    fn new(address: &str) -> Self {
        Self {
            address: Arc::from(address),
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            groups: Mutex::new(HashMap::new()),
            users: AtomicUsize::new(0),
            subscribers: AtomicUsize::new(0),
            waiters: AtomicUsize::new(0),
            issued: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            answer: Notify::new(),
        }
    }

    /// Woken when messages arrive or the address is deleted (fan-out subscribers).
    pub fn notify(&self) -> &Notify {
        &self.notify
    }

    /// Wakes every reader: fan-out subscribers and all group readers.
    fn wake_all(&self) {
        self.notify.notify_waiters();
        for takers in self.groups.lock().values() {
            takers.notify.notify_waiters();
        }
    }

    /// `n` messages arrived: wakes every fan-out subscriber and, per group, up to `n` readers.
    fn wake(&self, n: usize) {
        self.notify.notify_waiters();
        for takers in self.groups.lock().values() {
            for _ in 0..n.min(takers.readers.load(Ordering::Relaxed)) {
                takers.notify.notify_one();
            }
        }
    }

    /// The address.
    pub fn address(&self) -> &Arc<str> {
        &self.address
    }

    /// Local fan-out subscribers and group streams.
    pub fn subscribers(&self) -> usize {
        self.subscribers.load(Ordering::Relaxed)
    }

    /// Recv calls waiting on this node.
    pub fn waiters(&self) -> usize {
        self.waiters.load(Ordering::Relaxed)
    }

    /// Copies up to `max` messages from sequence `*next` on into `out`, advancing `*next`.
    pub fn read(&self, next: &mut u64, max: usize, out: &mut VecDeque<Delivery>) -> Found {
        let st = self.state.lock();
        if st.deleted {
            return Found::Deleted;
        }
        if st.next == 0 || *next >= st.next {
            return Found::Nothing;
        }
        let first = st.ring.front().map_or(st.next, |(m, _)| m.sequence);
        if *next < first {
            return Found::Behind(first);
        }
        let skip = usize::try_from(*next - first).unwrap_or(usize::MAX);
        let mut n = 0;
        for d in st.ring.iter().skip(skip).take(max) {
            out.push_back(d.clone());
            n += 1;
        }
        *next += n as u64;
        Found::Copied(n)
    }

    /// Whether the address was deleted while followed.
    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// This node is sending an append script for the address: a probe that returns an entry
    /// waits until the returned guard is dropped (see the module docs), which happens once the
    /// script is answered and its messages pushed, or when the Send is abandoned.
    pub(super) fn issue(self: &Arc<Self>) -> Issued {
        self.issued.fetch_add(1, Ordering::AcqRel);
        Issued(Arc::clone(self))
    }

    /// This node's append script stored `appended` (in sequence order): they go into the ring
    /// if they follow its newest message; otherwise the task reads them from Redis as any other
    /// node's.
    pub(super) fn push_own(&self, appended: Vec<Message>, max_messages: usize, max_bytes: usize) {
        let follows = appended.first().is_some_and(|m| {
            let st = self.state.lock();
            !st.deleted && st.next != 0 && m.sequence == st.next
        });
        if follows {
            self.push(appended, max_messages, max_bytes);
        }
    }

    /// Waits (at most [`BLOCK`]) until every append script this node issued before the call
    /// has been answered.
    async fn answers(&self) {
        let issued = self.issued.load(Ordering::Acquire);
        let _ = tokio::time::timeout(BLOCK, async {
            loop {
                let answered = self.answer.notified();
                tokio::pin!(answered);
                answered.as_mut().enable();
                if self.answered.load(Ordering::Acquire) >= issued {
                    return;
                }
                answered.await;
            }
        })
        .await;
    }

    /// Adds messages read from the stream (or appended by this node); the ring keeps at most
    /// `max_messages` / `max_bytes` (never more than retention keeps, so a lagging reader loses
    /// what Redis lost). Returns how many were new to the ring.
    fn push(&self, batch: Vec<Message>, max_messages: usize, max_bytes: usize) -> usize {
        let mut st = self.state.lock();
        let mut added = 0;
        for m in batch {
            if m.sequence < st.next {
                continue;
            }
            added += 1;
            if m.sequence > st.next && !st.ring.is_empty() {
                // Retention took messages before this node read them: the ring restarts, and
                // readers in the gap read Redis (which reports what is gone).
                st.ring.clear();
                st.ring_bytes = 0;
            }
            st.next = m.sequence + 1;
            st.ring_bytes += m.size;
            let m = Arc::new(m);
            let frame = encode_message(&m, 0);
            st.ring.push_back((m, Some(frame)));
        }
        while st.ring.len() > max_messages || (st.ring_bytes > max_bytes && !st.ring.is_empty()) {
            if let Some((m, _)) = st.ring.pop_front() {
                st.ring_bytes -= m.size;
            }
        }
        drop(st);
        if added > 0 {
            self.wake(added);
        }
        added
    }
}

/// An append script of this node in flight for a followed address (`Feed::issue`); dropping
/// it counts the script as answered.
#[derive(Debug)]
pub struct Issued(Arc<Feed>);

impl Issued {
    /// The feed.
    pub fn feed(&self) -> &Feed {
        &self.0
    }
}

impl Drop for Issued {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::AcqRel);
        self.0.answer.notify_waiters();
    }
}

/// Keeps a [`Feed`] running while held; as a subscriber it also counts in
/// [`Feed::subscribers`].
#[derive(Debug)]
pub struct Following {
    feed: Arc<Feed>,
    subscriber: bool,
    waiter: bool,
    /// As a group reader: the group's name and wake-ups.
    takers: Option<(Arc<str>, Arc<Takers>)>,
}

impl Following {
    /// The feed.
    pub fn feed(&self) -> &Arc<Feed> {
        &self.feed
    }

    /// Counts this reader as a subscriber (a stream, not a waiting Recv).
    pub fn as_subscriber(mut self) -> Self {
        self.feed.subscribers.fetch_add(1, Ordering::Relaxed);
        self.subscriber = true;
        self
    }

    /// Counts this reader as a waiting Recv.
    pub fn as_waiter(mut self) -> Self {
        self.feed.waiters.fetch_add(1, Ordering::Relaxed);
        self.waiter = true;
        self
    }

    /// Makes this reader one of `group`'s readers: it waits on [`Following::notify`], then woken
    /// once per new message among the group's readers on this node.
    pub fn as_taker(mut self, group: &str) -> Self {
        let name: Arc<str> = Arc::from(group);
        let takers = {
            let mut groups = self.feed.groups.lock();
            let t = Arc::clone(groups.entry(Arc::clone(&name)).or_default());
            t.readers.fetch_add(1, Ordering::Relaxed);
            t
        };
        self.takers = Some((name, takers));
        self
    }

    /// What this reader waits on: its group's wake-ups ([`Following::as_taker`]), else the
    /// feed's.
    pub fn notify(&self) -> &Notify {
        match &self.takers {
            Some((_, t)) => &t.notify,
            None => &self.feed.notify,
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if self.subscriber {
            self.feed.subscribers.fetch_sub(1, Ordering::Relaxed);
        }
        if self.waiter {
            self.feed.waiters.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some((group, takers)) = self.takers.take() {
            let mut groups = self.feed.groups.lock();
            if takers.readers.fetch_sub(1, Ordering::Relaxed) == 1 {
                groups.remove(&group);
            }
        }
        self.feed.users.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) fn follow(engine: &Arc<RedisEngine>, address: &str) -> Following {
    let mut started = None;
    let feed = {
        let entry = engine.feeds.entry(Arc::from(address)).or_insert_with(|| {
            let feed = Arc::new(Feed::new(address));
            started = Some(Arc::clone(&feed));
            feed
        });
        // Under the map's shard lock: the task removes its entry only under it, with no user.
        entry.users.fetch_add(1, Ordering::AcqRel);
        Arc::clone(entry.value())
    };
    if let Some(feed) = started {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(run(Arc::clone(engine), feed));
            }
            Err(_) => tracing::warn!(address, "redis: no runtime to follow the address on"),
        }
    }
    Following {
        feed,
        subscriber: false,
        waiter: false,
        takers: None,
    }
}

/// Removes the feed if nobody uses it; true when it did.
fn leave_if_unused(engine: &RedisEngine, feed: &Arc<Feed>) -> bool {
    engine
        .feeds
        .remove_if(&feed.address, |_, f| {
            Arc::ptr_eq(f, feed) && f.users.load(Ordering::Acquire) == 0
        })
        .is_some()
}

async fn run(engine: Arc<RedisEngine>, feed: Arc<Feed>) {
    let address: &str = &feed.address;
    let (stream, meta) = (engine.keys.stream(address), engine.keys.meta(address));
    let mut conn: Option<Conn> = None;
    let mut failing = false;
    // Block with `COUNT 1` while this node's own appends fill the ring (module docs).
    let mut probe = true;
    loop {
        if leave_if_unused(&engine, &feed) {
            return;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match engine.clients.dedicated().await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if !failing {
                        tracing::warn!(address, error = %e, "redis: cannot follow the address; retrying every 500 ms");
                        failing = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            },
        };
        let next = feed.state.lock().next;
        let r = if next == 0 {
            // Begin after the address's last message, noting its epoch.
            redis::cmd("HMGET")
                .arg(&meta)
                .arg("seq")
                .arg("epoch")
                .query_async::<(Option<u64>, Option<String>)>(c)
                .await
                .map(|(seq, epoch)| {
                    let mut st = feed.state.lock();
                    st.next = seq.unwrap_or(0) + 1;
                    st.epoch = epoch;
                    drop(st);
                    feed.wake_all();
                })
        } else {
            let block = u64::try_from(BLOCK.as_millis()).unwrap_or(1000);
            match redis::cmd("XREAD")
                .arg("COUNT")
                .arg(if probe { 1 } else { READ_BATCH })
                .arg("BLOCK")
                .arg(block)
                .arg("STREAMS")
                .arg(&stream)
                .arg(format!("{}-0", next - 1))
                .query_async::<Value>(c)
                .await
            {
                Ok(Value::Nil) => check_epoch(&feed, c, &meta).await,
                Ok(v) => {
                    let batch = read_reply(&feed.address, v);
                    let limits = &engine.limits;
                    let (max_messages, max_bytes) = (
                        RING_MESSAGES.min(limits.retention_messages),
                        RING_BYTES.min(limits.retention_bytes),
                    );
                    match batch.last().map(|m| m.sequence) {
                        None => check_epoch(&feed, c, &meta).await,
                        Some(newest) if probe => {
                            // Sent by this node, and in the ring once its script is answered?
                            feed.answers().await;
                            if feed.state.lock().next <= newest {
                                // Another node's: read full batches from here on.
                                feed.push(batch, max_messages, max_bytes);
                                probe = false;
                            }
                            Ok(())
                        }
                        Some(_) => {
                            // A batch with nothing new was this node's own: probe again.
                            probe = feed.push(batch, max_messages, max_bytes) == 0;
                            Ok(())
                        }
                    }
                }
                Err(e) => Err(e),
            }
        };
        match r {
            Ok(()) => {
                if failing {
                    tracing::info!(address, "redis: following the address again");
                    failing = false;
                }
                if feed.is_deleted() {
                    engine
                        .feeds
                        .remove_if(&feed.address, |_, f| Arc::ptr_eq(f, &feed));
                    return;
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(address, error = %e, "redis: lost the address's stream; retrying every 500 ms");
                    failing = true;
                }
                conn = None;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// After a quiet read: the address was deleted if its epoch changed.
async fn check_epoch(feed: &Feed, c: &mut Conn, meta: &str) -> redis::RedisResult<()> {
    let epoch: Option<String> = redis::cmd("HGET")
        .arg(meta)
        .arg("epoch")
        .query_async(c)
        .await?;
    let mut st = feed.state.lock();
    match (&st.epoch, epoch) {
        (Some(old), new) if new.as_ref() != Some(old) => {
            st.deleted = true;
            drop(st);
            feed.wake_all();
        }
        (None, Some(new)) => st.epoch = Some(new),
        _ => {}
    }
    Ok(())
}

/// The messages of an `XREAD` reply for one stream.
fn read_reply(address: &Arc<str>, v: Value) -> Vec<Message> {
    let mut out = Vec::new();
    let streams = match v {
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => return out,
    };
    for s in streams {
        let Value::Array(mut kv) = s else { continue };
        let Some(Value::Array(items)) = kv.pop() else {
            continue;
        };
        for item in items {
            let Value::Array(mut pair) = item else {
                continue;
            };
            let fields = pair.pop().unwrap_or(Value::Nil);
            let Some(seq) = pair.first().and_then(super::id_sequence) else {
                continue;
            };
            match super::decode(address, seq, fields) {
                Some(m) => out.push(m),
                None => {
                    tracing::warn!(address = %address, seq, "redis: undecodable stream entry skipped")
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::time::Instant;

    use super::{Feed, BLOCK};

    /// A probe waits for this node's append scripts in flight, and no longer: an abandoned
    /// append (its Send cancelled) counts as answered, or every later probe would wait
    /// [`BLOCK`].
    #[tokio::test(start_paused = true)]
    async fn a_probe_waits_for_appends_in_flight_and_not_for_abandoned_ones() {
        let feed = Arc::new(Feed::new("a"));
        let abandoned = feed.issue();
        drop(abandoned);
        let start = Instant::now();
        feed.answers().await;
        assert_eq!(start.elapsed(), std::time::Duration::ZERO);

        let in_flight = feed.issue();
        let waiting = {
            let feed = Arc::clone(&feed);
            tokio::spawn(async move {
                let start = Instant::now();
                feed.answers().await;
                start.elapsed()
            })
        };
        tokio::time::sleep(BLOCK / 4).await;
        assert!(!waiting.is_finished(), "answered before the append was");
        drop(in_flight);
        let waited = waiting.await.unwrap();
        assert!(waited >= BLOCK / 4 && waited < BLOCK, "waited {waited:?}");
    }
}
