//! The [`Broker`]: a sharded registry of addresses and the in-process API the gRPC service
//! translates to. Usable without gRPC (tests, embedding).
//!
//! Addresses live in a [`DashMap`] (sharded `RwLock`s): a Send holds a shard lock only for the
//! lookup or insert, then works under the address's own lock. There is no global lock on the
//! Send, Recv or Subscribe paths.
//!
//! Idle addresses are reclaimed by [`Broker::reclaim_idle`] (run periodically by
//! [`Broker::run_reclaimer`]). Reclaim closes the address under the map's shard lock; a handle
//! taken just before sees `closed` under the address lock and looks the address up again, so no
//! message is ever appended to a reclaimed address.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use dashmap::{mapref::entry::Entry, DashMap};
use tokio::time::Instant;

use crate::{
    address::{AddressInfo, AddressShared, Batch, GroupInfo, State},
    budget::{Budget, AGE_QUEUES},
    config::{Limits, MESSAGE_OVERHEAD_BYTES},
    error::BrokerError,
    metrics::Metrics,
    shutdown::ShutdownToken,
    subscription::Subscription,
    validate::{self, Address, Group, Headers},
};

/// Payloads smaller than this are copied out of the receive buffer on Send (see `send`).
const UNPIN_BELOW_BYTES: usize = 64 * 1024;

/// A cheap-clone handle to the broker's state.
#[derive(Clone, Debug)]
pub struct Broker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    addresses: DashMap<Box<str>, Arc<AddressShared>>,
    limits: Limits,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    /// Addresses in the map; changed under the map's shard locks, so `--max-addresses` is exact.
    address_count: AtomicUsize,
    /// Set when shutdown begins: Sends are refused from then on.
    closing: AtomicBool,
    hasher: RandomState,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Age entries hold addresses, which hold the budget: break the cycle.
        self.budget.clear();
    }
}

impl Broker {
    /// A broker with no addresses, enforcing `limits` (assumed validated, see
    /// [`Limits::validate`]).
    pub fn new(limits: Limits) -> Self {
        let budget = Arc::new(Budget::new(limits.max_retained_bytes));
        Self {
            inner: Arc::new(Inner {
                addresses: DashMap::new(),
                limits,
                budget,
                metrics: Arc::new(Metrics::new()),
                address_count: AtomicUsize::new(0),
                closing: AtomicBool::new(false),
                hasher: RandomState::new(),
            }),
        }
    }

    /// Begins shutdown: every Send from now on is refused with `UNAVAILABLE`. Call it before
    /// triggering the shutdown token, so that draining subscribers miss nothing acknowledged.
    pub fn begin_shutdown(&self) {
        self.inner.closing.store(true, Ordering::SeqCst);
    }

    /// The broker's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.inner.metrics
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    /// The address, created if needed.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when creating it would exceed `--max-addresses`.
    fn get_or_create(&self, name: &Address) -> Result<Arc<AddressShared>, BrokerError> {
        if let Some(a) = self.inner.addresses.get(name.as_str()) {
            return Ok(Arc::clone(a.value()));
        }
        match self.inner.addresses.entry(Box::from(name.as_str())) {
            Entry::Occupied(e) => Ok(Arc::clone(e.get())),
            Entry::Vacant(e) => {
                // Counted under the shard's write lock, so the bound is exact.
                let max = self.inner.limits.max_addresses;
                if self.inner.address_count.fetch_add(1, Ordering::AcqRel) >= max {
                    self.inner.address_count.fetch_sub(1, Ordering::AcqRel);
                    return Err(BrokerError::LimitReached {
                        what: "addresses",
                        limit: max,
                        flag: "--max-addresses",
                    });
                }
                let queue = usize::try_from(self.inner.hasher.hash_one(name.as_str())).unwrap_or(0)
                    % AGE_QUEUES;
                let address = Arc::new(AddressShared::new(
                    Arc::from(name.as_str()),
                    Arc::clone(&self.inner.budget),
                    queue,
                    Arc::clone(&self.inner.metrics),
                ));
                e.insert(Arc::clone(&address));
                Ok(address)
            }
        }
    }

    /// Runs `f` under the lock of a live (not reclaimed) address, creating it if needed.
    fn with_address<R>(
        &self,
        name: &Address,
        f: impl FnOnce(&Arc<AddressShared>, &mut State) -> R,
    ) -> Result<(Arc<AddressShared>, R), BrokerError> {
        loop {
            let address = self.get_or_create(name)?;
            let mut st = address.state.lock();
            if st.is_closed() {
                continue;
            }
            let r = f(&address, &mut st);
            drop(st);
            return Ok((address, r));
        }
    }

    /// Sends one message; returns its sequence.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` ([`BrokerError::TooLarge`]) when the payload is above
    /// `--max-message-bytes`, the headers above 16 KiB, or the message alone (payload + headers +
    /// 128 bytes overhead) above `--retention-bytes` or `--max-retained-bytes`;
    /// `INVALID_ARGUMENT` for more than 64 headers or an empty header key; `RESOURCE_EXHAUSTED`
    /// when the address does not exist and `--max-addresses` is reached; `UNAVAILABLE` once
    /// shutdown has begun. Nothing is stored then.
    pub fn send(
        &self,
        address: &Address,
        payload: Bytes,
        headers: Headers,
    ) -> Result<u64, BrokerError> {
        let limits = &self.inner.limits;
        validate::payload(payload.len(), limits)?;
        let size = payload.len() + validate::headers(&headers)? + MESSAGE_OVERHEAD_BYTES;
        // A small payload decoded by tonic is a slice of the connection's receive buffer; kept
        // as is, it would pin that whole buffer for as long as it is retained. Copying it
        // (small, once per message) keeps retained memory close to what the budget counts.
        let payload = if payload.len() < UNPIN_BELOW_BYTES {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        for (limit, limit_name) in [
            (limits.retention_bytes, "--retention-bytes"),
            (limits.max_retained_bytes, "--max-retained-bytes"),
        ] {
            if size > limit {
                return Err(BrokerError::TooLarge {
                    field: "payload",
                    actual: size,
                    limit,
                    limit_name,
                });
            }
        }
        let (address, sequence) = self.with_address(address, |a, st| {
            // Checked under the address lock: a subscriber that drains after shutdown began
            // (under the same lock) sees every message accepted before it.
            if self.inner.closing.load(Ordering::SeqCst) {
                return Err(BrokerError::ShuttingDown);
            }
            Ok(a.append(
                st,
                payload,
                headers,
                size,
                limits.retention_messages,
                limits.retention_bytes,
            )
            .sequence)
        })?;
        let sequence = sequence?;
        address.notify.notify_waiters();
        self.inner.budget.record(&address, sequence);
        Ok(sequence)
    }

    /// Takes up to `max` messages (1–1000) for `group`, waiting up to `wait` for the first one.
    /// Returns early with an empty batch when `shutdown` fires.
    ///
    /// Each message goes to exactly one caller of a group (competing consumers, like NATS queue
    /// groups or a Kafka consumer group). The default group (`""`) exists from the address's
    /// creation; a named group starts at the messages sent after its first use.
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the address does not exist and `--max-addresses` is reached;
    /// `NOT_FOUND` when an operator deletes the address during the wait.
    pub async fn recv(
        &self,
        address: &Address,
        group: &Group,
        max: usize,
        wait: Duration,
        shutdown: &mut ShutdownToken,
    ) -> Result<Batch, BrokerError> {
        let deadline = Instant::now() + wait;
        let (address, batch) = self.with_address(address, |a, st| {
            let batch = a.take(st, group.as_str(), max);
            if batch.is_empty() && !wait.is_zero() {
                AddressShared::add_waiter(st);
            }
            batch
        })?;
        if !batch.is_empty() || wait.is_zero() {
            return Ok(batch);
        }
        let _waiting = WaiterGuard(&address);
        loop {
            let notified = address.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            address.check_deleted()?;
            let batch = address.take(&mut address.state.lock(), group.as_str(), max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(deadline) => return Ok(Batch::default()),
                () = shutdown.cancelled() => return Ok(Batch::default()),
            }
        }
    }

    /// Registers a subscriber and returns its stream of events. Registration is complete when
    /// this returns: every message sent afterwards is delivered (or counted as dropped).
    ///
    /// With the default group (`""`) the subscriber is fan-out: it gets every message. With a
    /// named group it competes with the group's other members (Recv callers and streams).
    ///
    /// # Errors
    /// `RESOURCE_EXHAUSTED` when the address already has `--max-subscribers-per-address`
    /// subscribers, or does not exist and `--max-addresses` is reached.
    pub fn subscribe(
        &self,
        address: &Address,
        group: &Group,
        shutdown: ShutdownToken,
    ) -> Result<Subscription, BrokerError> {
        let max = self.inner.limits.max_subscribers_per_address;
        let full = || BrokerError::LimitReached {
            what: "subscribers on this address",
            limit: max,
            flag: "--max-subscribers-per-address",
        };
        if group.is_default() {
            let (address, cursor) = self.with_address(address, |a, st| {
                if st.subscribers() >= max {
                    return Err(full());
                }
                Ok(a.subscribe_fanout(st))
            })?;
            Ok(Subscription::fanout(address, cursor?, shutdown))
        } else {
            let (address, registered) = self.with_address(address, |a, st| {
                if st.subscribers() >= max {
                    return Err(full());
                }
                a.subscribe_group(st, group.as_str());
                Ok(())
            })?;
            registered?;
            Ok(Subscription::group(address, group.clone(), shutdown))
        }
    }

    /// Subscribers (fan-out and group streams) on `address` now; 0 for an unknown address.
    pub fn subscriber_count(&self, address: &str) -> usize {
        self.snapshot(address, State::subscribers)
    }

    /// Recv calls waiting on `address` now; 0 for an unknown address.
    pub fn waiting_recvs(&self, address: &str) -> usize {
        self.snapshot(address, State::waiters)
    }

    /// Messages retained by `address` now; 0 for an unknown address.
    pub fn retained_messages(&self, address: &str) -> usize {
        self.snapshot(address, State::retained_messages)
    }

    /// Bytes retained by `address` now (payload + headers + 128 per message).
    pub fn retained_bytes(&self, address: &str) -> usize {
        self.snapshot(address, State::retained_bytes)
    }

    fn snapshot(&self, address: &str, f: impl FnOnce(&State) -> usize) -> usize {
        let Some(a) = self
            .inner
            .addresses
            .get(address)
            .map(|a| Arc::clone(a.value()))
        else {
            return 0;
        };
        let st = a.state.lock();
        f(&st)
    }

    /// Whether the registry holds `address` now.
    pub fn contains(&self, address: &str) -> bool {
        self.inner.addresses.contains_key(address)
    }

    /// Addresses in the registry now.
    pub fn address_count(&self) -> usize {
        self.inner.addresses.len()
    }

    /// Messages retained across all addresses now.
    pub fn total_retained_messages(&self) -> usize {
        self.inner.budget.live_messages()
    }

    /// One address's figures and, with `with_groups`, its groups'; `None` if it does not exist.
    pub fn address_info(
        &self,
        address: &str,
        with_groups: bool,
    ) -> Option<(AddressInfo, Vec<GroupInfo>)> {
        let a = self
            .inner
            .addresses
            .get(address)
            .map(|a| Arc::clone(a.value()))?;
        Some(a.info(with_groups))
    }

    /// Addresses whose name starts with `prefix` and sorts after `after`, in name order, at most
    /// `limit`; and the name to continue after when more remain.
    pub fn list_addresses(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> (Vec<AddressInfo>, Option<String>) {
        let mut names: Vec<(Box<str>, Arc<AddressShared>)> = self
            .inner
            .addresses
            .iter()
            .filter(|e| e.key().starts_with(prefix) && e.key().as_ref() > after)
            .map(|e| (e.key().clone(), Arc::clone(e.value())))
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        let more = names.len() > limit;
        names.truncate(limit);
        let next = if more {
            names.last().map(|(n, _)| n.to_string())
        } else {
            None
        };
        (names.iter().map(|(_, a)| a.info(false).0).collect(), next)
    }

    /// Deletes `address`: purges its messages; its subscribers' streams end with `NOT_FOUND`
    /// ("address deleted") and waiting Recv calls return `NOT_FOUND`. Returns how many messages
    /// were purged, or `None` if the address did not exist. A later Send creates it afresh.
    pub fn delete_address(&self, address: &str) -> Option<usize> {
        let (_, a) = self.inner.addresses.remove(address)?;
        self.inner.address_count.fetch_sub(1, Ordering::AcqRel);
        Some(a.delete())
    }

    /// Bytes retained across all addresses now.
    pub fn total_retained_bytes(&self) -> usize {
        self.inner.budget.used()
    }

    /// Removes every address that has been idle for `--idle-address-ms`: nothing retained, no
    /// subscriber, no waiting Recv. Returns how many were removed.
    pub fn reclaim_idle(&self) -> usize {
        let idle = self.inner.limits.idle_address;
        // Find candidates under read locks, then remove each under its shard's write lock.
        let candidates: Vec<Box<str>> = self
            .inner
            .addresses
            .iter()
            .filter(|e| {
                let st = e.value().state.lock();
                st.retained_messages() == 0 && st.subscribers() == 0
            })
            .map(|e| e.key().clone())
            .collect();
        candidates
            .iter()
            .filter(|name| {
                let removed = self
                    .inner
                    .addresses
                    .remove_if(name.as_ref(), |_, a| a.close_if_idle(idle))
                    .is_some();
                if removed {
                    self.inner.address_count.fetch_sub(1, Ordering::AcqRel);
                }
                removed
            })
            .count()
    }

    /// Calls [`Broker::reclaim_idle`] every half idle period (at most every second) until
    /// `shutdown` fires.
    pub async fn run_reclaimer(self, mut shutdown: ShutdownToken) {
        let period = (self.inner.limits.idle_address / 2)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let n = self.reclaim_idle();
                    if n > 0 {
                        tracing::debug!(reclaimed = n, "idle addresses reclaimed");
                    }
                }
                () = shutdown.cancelled() => return,
            }
        }
    }
}

struct WaiterGuard<'a>(&'a AddressShared);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.remove_waiter();
    }
}
