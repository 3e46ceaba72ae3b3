//! The broker's paths on the Redis engine, where every engine call is a round trip: Recv's
//! long-poll, subscriptions, dead letters. Policy is the same as on the local engines; what
//! differs is how a reader waits:
//! - it follows the address on this node (one `XREAD BLOCK` reader per address, see
//!   `engine::redis::feed`), so a message sent through any node wakes it;
//! - a group reader also wakes when its next lease falls due, and re-polls every
//!   [`REPOLL`] for what no message announces: an Ack or a Nack on another node freeing room
//!   under `max_ack_pending`, or a released lease;
//! - while Redis is unreachable, Recv fails with `UNAVAILABLE` and streams wait and retry every
//!   500 ms, then resume where they were.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use tokio::time::Instant;

use super::{
    read_budget::{ReadCharge, SUBSCRIBER_READ_BYTES},
    subscription::FANOUT_BATCH,
    Broker, Event,
};
use crate::{
    engine::{
        redis::{feed::Found, Following, RedisEngine},
        Batch, DeadLetter, Delivery, StartAt,
    },
    error::BrokerError,
    message::encode_message,
    shutdown::ShutdownToken,
    validate::{Address, Group},
};

/// How often a waiting group reader asks Redis again when nothing woke it.
pub(crate) const REPOLL: Duration = Duration::from_millis(500);

/// How long a stream waits before retrying while Redis is unreachable.
const RETRY: Duration = Duration::from_millis(500);

impl Broker {
    /// [`Broker::recv`] on the Redis engine.
    pub(super) async fn recv_redis(
        &self,
        r: &Arc<RedisEngine>,
        address: &Address,
        group: &Group,
        (max, max_bytes): (usize, usize),
        wait: Duration,
        shutdown: &mut ShutdownToken,
    ) -> Result<Batch, BrokerError> {
        let deadline = Instant::now() + wait;
        let name: Arc<str> = Arc::from(address.as_str());
        let following = (!wait.is_zero()).then(|| {
            r.follow(address.as_str())
                .as_waiter()
                .as_taker(group.as_str())
        });
        let mut incarnation: Option<String> = None;
        loop {
            let notified = following.as_ref().map(|f| f.notify().notified());
            tokio::pin!(notified);
            if let Some(n) = notified.as_mut().as_pin_mut() {
                n.enable();
            }
            if following.as_ref().is_some_and(|f| f.feed().is_deleted()) {
                return Err(BrokerError::AddressDeleted);
            }
            let (inc, mut batch) = r
                .take(
                    &name,
                    group.as_str(),
                    incarnation.as_deref(),
                    max,
                    max_bytes,
                    0,
                )
                .await?;
            incarnation = Some(inc);
            self.dead_letter(std::mem::take(&mut batch.dead_letters));
            batch.refuse_if_too_large()?;
            if !batch.is_empty() || Instant::now() >= deadline {
                return Ok(batch);
            }
            let wake = batch
                .next_due
                .map_or(deadline, |d| d.min(deadline))
                .min(Instant::now() + REPOLL);
            let notified = async {
                match notified.as_mut().as_pin_mut() {
                    Some(n) => n.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {}
                () = shutdown.cancelled() => return Ok(Batch::default()),
            }
        }
    }

    /// [`Broker::subscribe`] on the Redis engine.
    pub(super) async fn subscribe_redis(
        &self,
        r: &Arc<RedisEngine>,
        address: &Address,
        group: &Group,
        start: StartAt,
        shutdown: ShutdownToken,
    ) -> Result<super::Subscription, BrokerError> {
        let max = self.inner.limits.max_subscribers_per_address;
        if r.subscribers(address.as_str()) >= max {
            return Err(BrokerError::LimitReached {
                what: "subscribers on this node for this address",
                limit: max,
                flag: "--max-subscribers-per-address",
            });
        }
        let following = r.follow(address.as_str()).as_subscriber();
        let (kind, following) = if group.is_default() {
            let next = r.start_position(address.as_str(), start).await?;
            (Kind::Fanout { next }, following)
        } else {
            if start != StartAt::End {
                return Err(BrokerError::invalid(
                    "start_sequence",
                    "start_sequence and start_time are for fan-out streams only; a group has its own position (set it with CreateGroup)",
                ));
            }
            let name: Arc<str> = Arc::from(address.as_str());
            // Creates the group at the end on first use, and learns its incarnation.
            let (incarnation, batch) = r
                .take(&name, group.as_str(), None, 0, usize::MAX, 0)
                .await?;
            debug_assert!(batch.messages.is_empty());
            let holder = self
                .inner
                .next_holder
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (
                Kind::Group {
                    group: group.clone(),
                    incarnation,
                    holder,
                    next_due: None,
                },
                following.as_taker(group.as_str()),
            )
        };
        self.inner.metrics.subscribers.inc();
        Ok(super::Subscription::redis(RedisSubscription {
            broker: self.clone(),
            engine: Arc::clone(r),
            following,
            kind,
            buffer: VecDeque::new(),
            charge: ReadCharge::default(),
            shutdown,
            done: false,
        }))
    }

    /// Stores dead letters through Redis, then forgets their originals; a dead letter that
    /// cannot be stored stays leased and is dead-lettered again after `ack_wait`.
    pub(super) fn dead_letter_redis(&self, r: &Arc<RedisEngine>, letters: Vec<DeadLetter>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("dead letters outside a runtime: dead-lettered again after ack_wait");
            return;
        };
        for d in letters {
            let (r, limits) = (Arc::clone(r), self.inner.limits.clone());
            rt.spawn(async move {
                let (address, group, sequence) = (
                    Arc::clone(&d.message.address),
                    d.group.clone(),
                    d.message.sequence,
                );
                if !d.to.as_str().is_empty() {
                    let (headers, size) = Self::dead_letter_headers(&d);
                    let limit = limits.retention_bytes.min(limits.max_retained_bytes);
                    if size <= limit {
                        let m = crate::engine::NewMessage {
                            payload: d.message.payload.clone(),
                            headers,
                            size,
                            message_id: None,
                        };
                        if let Err(e) = r.append(d.to.as_str(), &[m]).await {
                            tracing::warn!(
                                address = %address, group = %group, sequence,
                                dead_letter_address = d.to.as_str(), error = %e,
                                "dead letter not stored; dead-lettered again after ack_wait"
                            );
                            return;
                        }
                    } else {
                        tracing::warn!(
                            address = %address, group = %group, sequence,
                            "dead letter too large for --retention-bytes; dropped"
                        );
                    }
                }
                r.finish(&address, &group, &[sequence]).await;
            });
        }
    }
}

#[derive(Debug)]
enum Kind {
    Fanout {
        /// The next sequence this subscriber is owed.
        next: u64,
    },
    Group {
        group: Group,
        incarnation: String,
        holder: u64,
        next_due: Option<Instant>,
    },
}

/// A subscriber on the Redis engine (see the module docs).
#[derive(Debug)]
pub(crate) struct RedisSubscription {
    broker: Broker,
    engine: Arc<RedisEngine>,
    following: Following,
    kind: Kind,
    buffer: VecDeque<Delivery>,
    /// A replay read from Redis, charged to the broker's read budget until handed on.
    charge: ReadCharge,
    shutdown: ShutdownToken,
    done: bool,
}

impl RedisSubscription {
    /// As [`super::Subscription::next`].
    pub(crate) async fn next(&mut self) -> Option<Result<Event, BrokerError>> {
        loop {
            if self.done {
                return None;
            }
            if let Some((m, f)) = self.buffer.pop_front() {
                return Some(Ok(Event::Message(m, f)));
            }
            self.charge = ReadCharge::default();
            if self.shutdown.is_cancelled() {
                self.done = true;
                return Some(Err(BrokerError::ShuttingDown));
            }
            let feed = Arc::clone(self.following.feed());
            if feed.is_deleted() {
                self.done = true;
                return Some(Err(BrokerError::AddressDeleted));
            }
            let notified = self.following.notify().notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let mut wake = None;
            match &mut self.kind {
                Kind::Fanout { next } => match feed.read(next, FANOUT_BATCH, &mut self.buffer) {
                    Found::Copied(_) => continue,
                    Found::Deleted => {
                        self.done = true;
                        return Some(Err(BrokerError::AddressDeleted));
                    }
                    Found::Behind(upto) => {
                        let want = usize::try_from(upto - *next)
                            .unwrap_or(FANOUT_BATCH)
                            .min(FANOUT_BATCH);
                        // A replay read is charged to the broker's read budget (reserved
                        // first, waiting while it is spent) until handed to the stream.
                        let budget = self.broker.read_budget().clone();
                        let Some(c) = budget
                            .reserve_until(SUBSCRIBER_READ_BYTES, &mut self.shutdown)
                            .await
                        else {
                            continue;
                        };
                        self.charge = c;
                        match self.engine.read_range(feed.address(), *next, want).await {
                            Ok((dropped, got)) => {
                                let bytes = got.iter().map(|m| m.size).sum();
                                budget.settle(&mut self.charge, bytes).await;
                                let dropped = match got.last() {
                                    Some(m) => {
                                        *next = m.sequence + 1;
                                        dropped
                                    }
                                    // Gone from Redis too before the ring's first.
                                    None => {
                                        let from = std::mem::replace(next, upto);
                                        upto - from
                                    }
                                };
                                self.buffer.extend(got.into_iter().map(|m| {
                                    let frame = encode_message(&m, 0);
                                    (m, Some(frame))
                                }));
                                if dropped > 0 {
                                    return Some(Ok(Event::Dropped(dropped)));
                                }
                                continue;
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "redis: replay read failed; retrying");
                                wake = Some(Instant::now() + RETRY);
                            }
                        }
                    }
                    Found::Nothing => {}
                },
                Kind::Group {
                    group,
                    incarnation,
                    holder,
                    next_due,
                } => {
                    // One at a time, so the group's other members get their share.
                    match self
                        .engine
                        .take(
                            feed.address(),
                            group.as_str(),
                            Some(incarnation),
                            1,
                            usize::MAX,
                            *holder,
                        )
                        .await
                    {
                        Ok((_, mut batch)) => {
                            self.broker
                                .dead_letter(std::mem::take(&mut batch.dead_letters));
                            self.buffer.extend(batch.messages.into_iter().map(|t| {
                                let frame = encode_message(&t.message, t.attempt);
                                (t.message, Some(frame))
                            }));
                            if batch.dropped > 0 {
                                return Some(Ok(Event::Dropped(batch.dropped)));
                            }
                            if !self.buffer.is_empty() {
                                continue;
                            }
                            *next_due = batch.next_due;
                            wake = Some(next_due.map_or(Instant::now() + REPOLL, |d| {
                                d.min(Instant::now() + REPOLL)
                            }));
                        }
                        Err(BrokerError::Storage(e)) => {
                            tracing::debug!(error = %e, "redis: group take failed; retrying");
                            wake = Some(Instant::now() + RETRY);
                        }
                        Err(e) => {
                            self.done = true;
                            return Some(Err(e));
                        }
                    }
                }
            }
            let timer = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = notified => {}
                () = timer => {}
                () = self.shutdown.cancelled() => {}
            }
        }
    }
}

impl Drop for RedisSubscription {
    fn drop(&mut self) {
        self.broker.inner.metrics.subscribers.dec();
        if let Kind::Group {
            group,
            incarnation,
            holder,
            ..
        } = &self.kind
        {
            // Messages leased to this stream go out again at once, not after ack_wait.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (engine, address) = (
                    Arc::clone(&self.engine),
                    Arc::clone(self.following.feed().address()),
                );
                let (group, incarnation, holder) =
                    (group.as_str().to_string(), incarnation.clone(), *holder);
                rt.spawn(async move {
                    engine.release(&address, &group, &incarnation, holder).await;
                });
            }
        }
    }
}
