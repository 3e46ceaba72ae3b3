//! [`Subscription`]: one registered subscriber, fan-out or group member, read as a sequence of
//! [`Event`]s. Dropping it unregisters the subscriber.
//!
//! At shutdown a fan-out subscriber is first handed every message already retained for it, then
//! its stream ends with `UNAVAILABLE`; a group member ends at once (the group's messages stay in
//! the window).
//!
//! Slow-consumer policy: a subscriber never slows Send or other subscribers. It reads from the
//! address's retention window at its own pace; if the window moves past it, the messages it
//! missed are reported as one [`Event::Dropped`] with the exact count, then delivery resumes at
//! the oldest retained message.

use std::{collections::VecDeque, sync::Arc};

use crate::{
    address::{AddressShared, Message},
    error::BrokerError,
    shutdown::ShutdownToken,
    validate::Group,
    wire::WireFrame,
};

/// How many messages a fan-out subscriber copies out of the window per lock.
const FANOUT_BATCH: usize = 64;

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
    /// Next sequence this subscriber is owed.
    Fanout {
        cursor: u64,
    },
    Group(Group),
}

/// A registered subscriber. See the module docs.
#[derive(Debug)]
pub struct Subscription {
    address: Arc<AddressShared>,
    kind: Kind,
    buffer: VecDeque<(Arc<Message>, Option<WireFrame>)>,
    shutdown: ShutdownToken,
    done: bool,
}

impl Subscription {
    pub(crate) fn fanout(
        address: Arc<AddressShared>,
        cursor: u64,
        shutdown: ShutdownToken,
    ) -> Self {
        Self {
            address,
            kind: Kind::Fanout { cursor },
            buffer: VecDeque::new(),
            shutdown,
            done: false,
        }
    }

    pub(crate) fn group(
        address: Arc<AddressShared>,
        group: Group,
        shutdown: ShutdownToken,
    ) -> Self {
        Self {
            address,
            kind: Kind::Group(group),
            buffer: VecDeque::new(),
            shutdown,
            done: false,
        }
    }

    /// The next event. Waits while nothing is there.
    ///
    /// Returns `Some(Err(BrokerError::ShuttingDown))` once when the server shuts down, or
    /// `Some(Err(BrokerError::AddressDeleted))` when an operator deletes the address, then `None`.
    pub async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        loop {
            if self.done {
                return None;
            }
            if self.shutdown.is_cancelled() {
                // A fan-out subscriber first gets what is already retained for it, so no
                // acknowledged message is silently skipped; then the stream ends.
                if let Kind::Fanout { cursor } = &mut self.kind {
                    if self.buffer.is_empty() {
                        let mut st = self.address.state.lock();
                        let dropped = self.address.read_fanout(
                            &mut st,
                            cursor,
                            FANOUT_BATCH,
                            &mut self.buffer,
                        );
                        drop(st);
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
            if let Err(e) = self.address.check_deleted() {
                self.done = true;
                return Some(Err(e));
            }
            if let Some((m, f)) = self.buffer.pop_front() {
                return Some(Ok(Event::Message(m, f)));
            }
            let Self {
                address,
                kind,
                buffer,
                shutdown,
                ..
            } = self;
            let notified = address.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let dropped = {
                let mut st = address.state.lock();
                match kind {
                    Kind::Fanout { cursor } => {
                        address.read_fanout(&mut st, cursor, FANOUT_BATCH, buffer)
                    }
                    Kind::Group(group) => {
                        // One at a time, so the group's other members get their share.
                        let batch = address.take(&mut st, group.as_str(), 1);
                        buffer.extend(batch.messages.into_iter().map(|m| (m, None)));
                        batch.dropped
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
        match self.kind {
            Kind::Fanout { cursor } => self.address.unsubscribe_fanout(cursor),
            Kind::Group(_) => self.address.unsubscribe_group(),
        }
    }
}
