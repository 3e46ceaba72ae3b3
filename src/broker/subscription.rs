//! [`Subscription`]: one registered subscriber, fan-out or group member, read as a sequence of
//! [`Event`]s. Dropping it unregisters the subscriber.
//!
//! At shutdown a fan-out subscriber is first handed every message already retained for it, then
//! its stream ends with `UNAVAILABLE`; a group member ends at once (the group's messages stay in
//! the window).
//!
//! A fan-out subscriber that starts in the past (replay) reads the retention window in batches
//! of [`FANOUT_BATCH`] under the address lock, and the next batch only when its stream has
//! written the previous one: the address lock is never held for the whole backlog, and the
//! backlog is never buffered (backpressure comes from the HTTP/2 flow control of its stream).
//! After the backlog it is live with no gap and no duplicate: one cursor covers both.
//!
//! Slow-consumer policy: a subscriber never slows Send or other subscribers. It reads from the
//! address's retention window at its own pace; if the window moves past it, the messages it
//! missed are reported as one [`Event::Dropped`] with the exact count, then delivery resumes at
//! the oldest retained message.

use std::{collections::VecDeque, sync::Arc};

use super::{
    read_budget::{ReadBudget, ReadCharge, SUBSCRIBER_READ_BYTES},
    Broker,
};
use crate::{
    engine::{Delivery, FanoutCursor, Log, PatternFeed},
    error::BrokerError,
    message::{encode_message, Message, WireFrame},
    shutdown::ShutdownToken,
    validate::Group,
};

/// How many messages a fan-out subscriber copies out of the window per lock.
pub const FANOUT_BATCH: usize = 64;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// The next message, with its wire encoding when one was made already: shared with the
    /// other fan-out subscribers (see `wire`), or, for a group member, encoded with its
    /// delivery attempt. `None`: encode it with delivery attempt 0.
    Message(Arc<Message>, Option<WireFrame>),
    /// The subscriber fell behind the retention window and lost exactly this many messages.
    Dropped(u64),
}

#[derive(Debug)]
enum Kind {
    /// Where this subscriber is in the window; what it reads is charged to the broker's read
    /// budget until handed to its stream.
    Fanout(FanoutCursor, ReadBudget),
    /// A member of a consumer group.
    Group {
        group: Group,
        /// The incarnation of the group it joined.
        id: u64,
        /// This stream's lease holder id: its leases return at once when it ends.
        holder: u64,
        /// For dead letters found while taking, and the wake-up of lease expiry.
        broker: Broker,
        next_due: Option<tokio::time::Instant>,
    },
}

/// A registered subscriber. See the module docs.
#[derive(Debug)]
pub struct Subscription(Inner);

#[derive(Debug)]
enum Inner {
    Local(LocalSubscription),
    Redis(Box<super::redis::RedisSubscription>),
}

impl Subscription {
    pub(crate) fn fanout(
        log: Log,
        cursor: FanoutCursor,
        budget: ReadBudget,
        shutdown: ShutdownToken,
    ) -> Self {
        Self(Inner::Local(LocalSubscription::fanout(
            log, cursor, budget, shutdown,
        )))
    }

    pub(crate) fn group(
        broker: Broker,
        log: Log,
        group: Group,
        id: u64,
        holder: u64,
        shutdown: ShutdownToken,
    ) -> Self {
        Self(Inner::Local(LocalSubscription::group(
            broker, log, group, id, holder, shutdown,
        )))
    }

    pub(crate) fn redis(s: super::redis::RedisSubscription) -> Self {
        Self(Inner::Redis(Box::new(s)))
    }

    /// The next event. Waits while nothing is there.
    ///
    /// Returns `Some(Err(BrokerError::ShuttingDown))` once when the server shuts down,
    /// `Some(Err(BrokerError::AddressDeleted))` when an operator deletes the address, or
    /// `Some(Err(BrokerError::GroupDeleted))` when its group is deleted; then `None`.
    pub async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        match &mut self.0 {
            Inner::Local(s) => s.next().await,
            Inner::Redis(s) => s.next().await,
        }
    }
}

/// A subscriber on a local engine (memory, disk).
#[derive(Debug)]
struct LocalSubscription {
    log: Log,
    kind: Kind,
    buffer: VecDeque<Delivery>,
    /// What `buffer` holds, charged to the read budget (fan-out only).
    charge: ReadCharge,
    shutdown: ShutdownToken,
    done: bool,
}

impl LocalSubscription {
    fn fanout(log: Log, cursor: FanoutCursor, budget: ReadBudget, shutdown: ShutdownToken) -> Self {
        Self {
            log,
            kind: Kind::Fanout(cursor, budget),
            buffer: VecDeque::new(),
            charge: ReadCharge::default(),
            shutdown,
            done: false,
        }
    }

    fn group(
        broker: Broker,
        log: Log,
        group: Group,
        id: u64,
        holder: u64,
        shutdown: ShutdownToken,
    ) -> Self {
        Self {
            log,
            kind: Kind::Group {
                group,
                id,
                holder,
                broker,
                next_due: None,
            },
            buffer: VecDeque::new(),
            charge: ReadCharge::default(),
            shutdown,
            done: false,
        }
    }

    async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        loop {
            if self.done {
                return None;
            }
            if self.shutdown.is_cancelled() {
                // A fan-out subscriber first gets what is already retained for it, so no
                // acknowledged message is silently skipped; then the stream ends.
                if let Kind::Fanout(cursor, _) = &mut self.kind {
                    if self.buffer.is_empty() {
                        // Outside the read budget: the last reads before the stream ends.
                        let dropped = self.log.read_fanout(
                            cursor,
                            (FANOUT_BATCH, SUBSCRIBER_READ_BYTES),
                            &mut self.buffer,
                        );
                        if dropped > 0 {
                            return Some(Ok(Event::Dropped(dropped)));
                        }
                    }
                    if let Some((m, f)) = self.buffer.pop_front() {
                        return Some(Ok(Event::Message(m, f)));
                    }
                }
                self.done = true;
                return Some(Err(BrokerError::ShuttingDown));
            }
            if let Err(e) = self.log.check_deleted() {
                self.done = true;
                return Some(Err(e));
            }
            if let Some((m, f)) = self.buffer.pop_front() {
                return Some(Ok(Event::Message(m, f)));
            }
            // Everything read before is handed to the stream: its charge goes back.
            self.charge = ReadCharge::default();
            let Self {
                log,
                kind,
                buffer,
                charge,
                shutdown,
                done,
            } = self;
            if let Kind::Fanout(_, budget) = kind {
                // Reserve before reading, waiting while the broker's read budget is spent.
                let Some(c) = budget.reserve_until(SUBSCRIBER_READ_BYTES, shutdown).await else {
                    continue;
                };
                *charge = c;
            }
            let notified = log.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut wake = None;
            let dropped = match kind {
                Kind::Fanout(cursor, budget) => {
                    let dropped =
                        log.read_fanout(cursor, (FANOUT_BATCH, SUBSCRIBER_READ_BYTES), buffer);
                    let bytes = buffer.iter().map(|(m, _)| m.size).sum();
                    budget.settle(charge, bytes).await;
                    dropped
                }
                Kind::Group {
                    group,
                    id,
                    holder,
                    broker,
                    next_due,
                } => {
                    // One at a time, so the group's other members get their share (and, with
                    // acknowledgements, max_ack_pending holds across the group).
                    match log.take(group.as_str(), *id, 1, usize::MAX, *holder) {
                        Ok(mut batch) => {
                            broker.dead_letter(std::mem::take(&mut batch.dead_letters));
                            // Disk engine: the group's position is durable before the message
                            // goes out.
                            if let Err(e) = std::mem::take(&mut batch.durable).wait().await {
                                *done = true;
                                return Some(Err(e));
                            }
                            buffer.extend(batch.messages.into_iter().map(|t| {
                                let frame = encode_message(&t.message, t.attempt);
                                (t.message, Some(frame))
                            }));
                            *next_due = batch.next_due.or(*next_due);
                            wake = *next_due;
                            batch.dropped
                        }
                        Err(e) => {
                            *done = true;
                            return Some(Err(e));
                        }
                    }
                }
            };
            if dropped > 0 {
                return Some(Ok(Event::Dropped(dropped)));
            }
            if !buffer.is_empty() {
                continue;
            }
            let lease_due = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = notified => {}
                () = lease_due => {
                    if let Kind::Group { next_due, .. } = kind {
                        *next_due = None;
                    }
                }
                () = shutdown.cancelled() => {}
            }
        }
    }
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Fanout(cursor, _) => self.log.unsubscribe_fanout(*cursor),
            Kind::Group {
                group, id, holder, ..
            } => {
                // Messages leased to this stream go out again at once, not after ack_wait.
                self.log.release(group.as_str(), *id, *holder);
                self.log.unsubscribe_group();
            }
        }
    }
}

/// A pattern (wildcard) subscriber: messages of every matching address, read as [`Event`]s.
/// Dropping it unregisters the pattern. At shutdown it is first handed what is already queued
/// for it, then ends with `UNAVAILABLE`.
#[derive(Debug)]
pub struct PatternSubscription {
    broker: Broker,
    feed: PatternFeed,
    buffer: VecDeque<Arc<Message>>,
    shutdown: ShutdownToken,
    done: bool,
}

impl PatternSubscription {
    pub(crate) fn new(broker: Broker, feed: PatternFeed, shutdown: ShutdownToken) -> Self {
        Self {
            broker,
            feed,
            buffer: VecDeque::new(),
            shutdown,
            done: false,
        }
    }

    /// The next event: a message of a matching address, or the exact count dropped because
    /// this subscriber fell more than its queue behind. Waits while nothing is there.
    ///
    /// Returns `Some(Err(BrokerError::ShuttingDown))` once at shutdown, then `None`.
    pub async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some(m) = self.buffer.pop_front() {
                return Some(Ok(Event::Message(m, None)));
            }
            let notified = self.feed.notify().notified();
            let dropped = self.feed.pop(FANOUT_BATCH, &mut self.buffer);
            if dropped > 0 {
                return Some(Ok(Event::Dropped(dropped)));
            }
            if !self.buffer.is_empty() {
                continue;
            }
            if self.shutdown.is_cancelled() {
                self.done = true;
                return Some(Err(BrokerError::ShuttingDown));
            }
            tokio::select! {
                () = notified => {}
                () = self.shutdown.cancelled() => {}
            }
        }
    }
}

impl Drop for PatternSubscription {
    fn drop(&mut self) {
        self.broker.engine().unsubscribe_pattern(&self.feed);
        self.broker.metrics().subscribers.dec();
    }
}
