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

use crate::{
    engine::{Delivery, FanoutCursor, Log},
    error::BrokerError,
    message::{Message, WireFrame},
    shutdown::ShutdownToken,
    validate::Group,
};

/// How many messages a fan-out subscriber copies out of the window per lock.
pub const FANOUT_BATCH: usize = 64;

/// What a subscriber receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// The next message, in sequence order, with its wire encoding when the subscriber is
    /// fan-out (shared with the other fan-out subscribers; see `wire`).
    Message(Arc<Message>, Option<WireFrame>),
    /// The subscriber fell behind the retention window and lost exactly this many messages.
    Dropped(u64),
}

#[derive(Debug)]
enum Kind {
    /// Where this subscriber is in the window.
    Fanout(FanoutCursor),
    /// The group and the id of the incarnation it joined.
    Group(Group, u64),
}

/// A registered subscriber. See the module docs.
#[derive(Debug)]
pub struct Subscription {
    log: Log,
    kind: Kind,
    buffer: VecDeque<Delivery>,
    shutdown: ShutdownToken,
    done: bool,
}

impl Subscription {
    pub(crate) fn fanout(log: Log, cursor: FanoutCursor, shutdown: ShutdownToken) -> Self {
        Self {
            log,
            kind: Kind::Fanout(cursor),
            buffer: VecDeque::new(),
            shutdown,
            done: false,
        }
    }

    pub(crate) fn group(log: Log, group: Group, id: u64, shutdown: ShutdownToken) -> Self {
        Self {
            log,
            kind: Kind::Group(group, id),
            buffer: VecDeque::new(),
            shutdown,
            done: false,
        }
    }

    /// The next event. Waits while nothing is there.
    ///
    /// Returns `Some(Err(BrokerError::ShuttingDown))` once when the server shuts down,
    /// `Some(Err(BrokerError::AddressDeleted))` when an operator deletes the address, or
    /// `Some(Err(BrokerError::GroupDeleted))` when its group is deleted; then `None`.
    pub async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        loop {
            if self.done {
                return None;
            }
            if self.shutdown.is_cancelled() {
                // A fan-out subscriber first gets what is already retained for it, so no
                // acknowledged message is silently skipped; then the stream ends.
                if let Kind::Fanout(cursor) = &mut self.kind {
                    if self.buffer.is_empty() {
                        let dropped = self.log.read_fanout(cursor, FANOUT_BATCH, &mut self.buffer);
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
            let Self {
                log,
                kind,
                buffer,
                shutdown,
                done,
            } = self;
            let notified = log.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let dropped = match kind {
                Kind::Fanout(cursor) => log.read_fanout(cursor, FANOUT_BATCH, buffer),
                Kind::Group(group, id) => {
                    // One at a time, so the group's other members get their share.
                    match log.take(group.as_str(), *id, 1) {
                        Ok(batch) => {
                            buffer.extend(batch.messages.into_iter().map(|m| (m, None)));
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
            tokio::select! {
                () = notified => {}
                () = shutdown.cancelled() => {}
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Fanout(cursor) => self.log.unsubscribe_fanout(*cursor),
            Kind::Group(..) => self.log.unsubscribe_group(),
        }
    }
}
