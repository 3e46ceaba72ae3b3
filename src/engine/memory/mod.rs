//! The in-memory engine: a sharded map of addresses, each an [`AddressLog`] behind its own short
//! lock, and the broker-wide byte [`Budget`].
//!
//! Addresses live in a [`DashMap`] (sharded `RwLock`s): an append holds a shard lock only for
//! the lookup or insert, then works under the address's own lock. There is no global lock on
//! the Send, Recv or Subscribe paths.
//!
//! Idle addresses are reclaimed by `MemoryEngine::maintain`. Reclaim closes the address under
//! the map's shard lock; a handle taken just before sees `closed` under the address lock and
//! looks the address up again, so no message is ever appended to a reclaimed address.

mod budget;
mod cold;
mod dedup;
mod lease;
mod log;
pub mod patterns;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use dashmap::{mapref::entry::Entry, DashMap};

pub use budget::Budget;
pub(crate) use cold::{ColdIndex, ColdMessage};
pub use log::AddressLog;
pub use log::Loc;
use log::{Stamp, State};

use patterns::{PatternIndex, PatternSub};

use super::{
    disk::{AddressFiles, DiskConfig, DiskLog, Store, Work},
    AddressInfo, Appended, DeadLetter, Durable, GroupInfo, GroupSettings, Maintenance, NewMessage,
    Retention, Settle, Settled,
};
use crate::{
    config::Limits,
    error::BrokerError,
    metrics::Metrics,
    validate::{Address, Headers, Pattern},
};

/// Most pattern (wildcard) subscriptions the broker holds at once.
pub const MAX_PATTERN_SUBSCRIPTIONS: usize = 100_000;

/// The in-memory engine. See the module docs.
#[derive(Debug)]
pub struct MemoryEngine {
    addresses: DashMap<Box<str>, Arc<AddressLog>>,
    retention: Retention,
    dedup_window: Option<Duration>,
    patterns: Arc<PatternIndex>,
    max_addresses: usize,
    idle_address: Duration,
    budget: Arc<Budget>,
    metrics: Arc<Metrics>,
    /// Addresses in the map; changed under the map's shard locks, so `--max-addresses` is exact.
    address_count: AtomicUsize,
    /// Set when shutdown begins: appends are refused from then on.
    closing: AtomicBool,
    /// The data directory, in the disk engine.
    store: Option<Arc<Store>>,
}

impl Drop for MemoryEngine {
    fn drop(&mut self) {
        // Heap entries hold addresses, which hold the budget: break the cycle.
        self.budget.clear();
        if let Some(s) = &self.store {
            s.cache.clear();
        }
    }
}

impl MemoryEngine {
    /// An empty engine enforcing `limits` (assumed validated).
    pub fn new(limits: &Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            addresses: DashMap::new(),
            retention: Retention::from(limits),
            dedup_window: (!limits.dedup_window.is_zero()).then_some(limits.dedup_window),
            patterns: Arc::default(),
            max_addresses: limits.max_addresses,
            idle_address: limits.idle_address,
            budget: Arc::new(Budget::new(limits.max_retained_bytes)),
            metrics,
            address_count: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            store: None,
        }
    }

    /// The disk engine: this index over the files in `config.dir`, every address in it
    /// recovered (see [`disk`]).
    pub(crate) fn open_disk(
        limits: &Limits,
        metrics: Arc<Metrics>,
        config: &DiskConfig,
    ) -> Result<Self, String> {
        let (store, found) = Store::open(config, Arc::clone(&metrics))?;
        let mut engine = Self::new(limits, metrics);
        let store = Arc::new(store);
        engine.store = Some(Arc::clone(&store));
        let (mut messages, mut bytes, mut cut) = (0u64, 0u64, 0u64);
        for r in found {
            let Ok(name) = Address::parse(&r.name) else {
                tracing::warn!(dir = %r.dir.display(), "storage: skipping a directory whose address name is not valid");
                continue;
            };
            messages += r.messages;
            cut += r.cut;
            let files = AddressFiles::recovered(
                r.dir.clone(),
                name.as_str(),
                r.segments,
                r.journal_len,
                r.high_water,
            );
            let log = engine.new_log(&name, None).with_disk(DiskLog {
                files,
                store: Arc::clone(&store),
            });
            let (retained, journal) = log.restore(r.runs, r.ids, r.next_seq, r.events);
            // Compacted: one record per group and per pending lease.
            if let Some(files) = log.disk_files() {
                files.replace_journal(&journal).map_err(|e| {
                    format!("{}: cannot rewrite the group journal: {e}", r.dir.display())
                })?;
                bytes += files.bytes();
            }
            let log = Arc::new(log);
            engine.address_count.fetch_add(1, Ordering::AcqRel);
            engine
                .addresses
                .insert(Box::from(name.as_str()), Arc::clone(&log));
            if retained {
                engine.budget.record(&log);
            }
        }
        tracing::info!(
            addresses = engine.addresses.len(),
            messages,
            disk_bytes = bytes,
            torn_bytes_cut = cut,
            "storage: recovered the data directory"
        );
        Ok(engine)
    }

    /// A new address log (not yet in the map).
    fn new_log(&self, name: &Address, disk: Option<DiskLog>) -> AddressLog {
        let log = AddressLog::new(
            Arc::from(name.as_str()),
            Arc::clone(&self.budget),
            Arc::clone(&self.metrics),
            self.retention,
            self.dedup_window,
            Arc::clone(&self.patterns),
        );
        match disk {
            Some(d) => log.with_disk(d),
            None => log,
        }
    }

    pub(crate) fn disk_bytes(&self) -> u64 {
        self.addresses.iter().map(|a| a.value().disk_bytes()).sum()
    }

    pub(crate) fn close(&self) {
        if let Some(s) = &self.store {
            s.flusher.stop();
        }
    }

    pub(crate) fn begin_shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
    }

    /// The address, created if needed.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when creating it would exceed `--max-addresses`.
    fn get_or_create(&self, name: &Address) -> Result<Arc<AddressLog>, BrokerError> {
        if let Some(a) = self.addresses.get(name.as_str()) {
            return Ok(Arc::clone(a.value()));
        }
        match self.addresses.entry(Box::from(name.as_str())) {
            Entry::Occupied(e) => Ok(Arc::clone(e.get())),
            Entry::Vacant(e) => {
                // Counted under the shard's write lock, so the bound is exact.
                let max = self.max_addresses;
                if self.address_count.fetch_add(1, Ordering::AcqRel) >= max {
                    self.address_count.fetch_sub(1, Ordering::AcqRel);
                    return Err(BrokerError::LimitReached {
                        what: "addresses",
                        limit: max,
                        flag: "--max-addresses",
                    });
                }
                let disk = self.store.as_ref().map(|store| DiskLog {
                    files: AddressFiles::new(store.address_dir(name.as_str()), name.as_str()),
                    store: Arc::clone(store),
                });
                let address = Arc::new(self.new_log(name, disk));
                e.insert(Arc::clone(&address));
                Ok(address)
            }
        }
    }

    /// Runs `f` under the lock of a live (not reclaimed) address, creating it if needed.
    pub(crate) fn with_address<R>(
        &self,
        name: &Address,
        f: impl FnOnce(&Arc<AddressLog>, &mut State) -> R,
    ) -> Result<(Arc<AddressLog>, R), BrokerError> {
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

    fn find(&self, address: &str) -> Option<Arc<AddressLog>> {
        self.addresses.get(address).map(|a| Arc::clone(a.value()))
    }

    pub(crate) fn append(
        &self,
        address: &Address,
        payload: Bytes,
        headers: Headers,
        size: usize,
        message_id: Option<&str>,
    ) -> Result<(Appended, Durable), BrokerError> {
        let (address, appended) = self.with_address(address, |a, st| {
            // Checked under the address lock: a subscriber that drains after shutdown began
            // (under the same lock) sees every message accepted before it.
            if self.closing.load(Ordering::SeqCst) {
                return Err(BrokerError::ShuttingDown);
            }
            if let Some(sequence) = message_id.and_then(|id| a.duplicate_of(st, id)) {
                // A duplicate of a message still being written answers once that write is.
                let durable = if AddressLog::is_staged(st, sequence) {
                    a.submit(st, Work::Marker, true)
                } else {
                    Durable::done()
                };
                let dup = Appended {
                    sequence,
                    duplicate: true,
                };
                return Ok((dup, durable));
            }
            let m = a.append(st, payload, headers, size, message_id, Stamp::now());
            let sequence = m.sequence;
            let durable = if self.store.is_some() {
                a.submit(
                    st,
                    Work::Messages(vec![(m, message_id.map(Box::from))]),
                    true,
                )
            } else {
                a.count_committed(1, size);
                Durable::done()
            };
            let new = Appended {
                sequence,
                duplicate: false,
            };
            Ok((new, durable))
        })?;
        let (appended, durable) = appended?;
        // The disk engine wakes readers and charges the budget when the message is durable.
        if !appended.duplicate && self.store.is_none() {
            address.notify.notify_waiters();
            self.budget.record(&address);
        }
        Ok((appended, durable))
    }

    pub(crate) fn append_batch(
        &self,
        address: &Address,
        messages: Vec<NewMessage>,
    ) -> Result<(Vec<Appended>, Durable), BrokerError> {
        let disk = self.store.is_some();
        let (address, appended) = self.with_address(address, |a, st| {
            if self.closing.load(Ordering::SeqCst) {
                return Err(BrokerError::ShuttingDown);
            }
            let mut out = Vec::with_capacity(messages.len());
            let mut written = Vec::new();
            let mut staged_duplicate = false;
            let at = Stamp::now();
            let (mut stored_n, mut stored_bytes) = (0u64, 0usize);
            for m in messages {
                let id = m.message_id.as_deref();
                if let Some(sequence) = id.and_then(|id| a.duplicate_of(st, id)) {
                    staged_duplicate |= AddressLog::is_staged(st, sequence);
                    out.push(Appended {
                        sequence,
                        duplicate: true,
                    });
                    continue;
                }
                let stored = a.append(st, m.payload, m.headers, m.size, id, at);
                stored_n += 1;
                stored_bytes += m.size;
                out.push(Appended {
                    sequence: stored.sequence,
                    duplicate: false,
                });
                if disk {
                    written.push((stored, m.message_id.map(String::into_boxed_str)));
                }
            }
            if !disk && stored_n > 0 {
                a.count_committed(stored_n, stored_bytes);
            }
            // One write and one fsync for the whole batch; a job queued after a duplicate's
            // write completes after it.
            let durable = if !written.is_empty() {
                a.submit(st, Work::Messages(written), true)
            } else if staged_duplicate {
                a.submit(st, Work::Marker, true)
            } else {
                Durable::done()
            };
            Ok((out, durable))
        })?;
        let (appended, durable) = appended?;
        if disk {
            return Ok((appended, durable));
        }
        if appended.iter().any(|a| !a.duplicate) {
            address.notify.notify_waiters();
            self.budget.record(&address);
        }
        Ok((appended, durable))
    }

    pub(crate) fn subscribe_pattern(
        &self,
        pattern: Pattern,
    ) -> Result<Arc<PatternSub>, BrokerError> {
        if self.patterns.len() >= MAX_PATTERN_SUBSCRIPTIONS {
            return Err(BrokerError::LimitReached {
                what: "pattern subscriptions",
                limit: MAX_PATTERN_SUBSCRIPTIONS,
                flag: "a fixed limit",
            });
        }
        Ok(self.patterns.subscribe(pattern))
    }

    pub(crate) fn pattern_count(&self) -> usize {
        self.patterns.len()
    }

    pub(crate) fn unsubscribe_pattern(&self, sub: &PatternSub) {
        self.patterns.unsubscribe(sub);
    }

    pub(crate) fn create_group(
        &self,
        address: &Address,
        group: &str,
        settings: GroupSettings,
    ) -> Result<(bool, u64, Durable), BrokerError> {
        self.with_address(address, |a, st| a.create_group(st, group, settings))?
            .1
    }

    pub(crate) fn settle(
        &self,
        address: &str,
        group: &str,
        sequences: &[u64],
        op: Settle,
    ) -> Result<Settled, BrokerError> {
        let unknown = || BrokerError::NotAcknowledged {
            group: group.to_string(),
            reason: "no such group on this address".into(),
        };
        let a = self.find(address).ok_or_else(unknown)?;
        let r = {
            let mut st = a.state.lock();
            if st.is_closed() {
                return Err(unknown());
            }
            a.settle(&mut st, group, sequences, op)
        };
        // Room in max_ack_pending, or a redelivery ready now: wake the group's readers.
        a.notify.notify_waiters();
        r
    }

    pub(crate) fn journal_done(&self, address: &str, group: &str, sequences: Vec<u64>) {
        if let Some(a) = self.find(address) {
            a.journal_done(group, sequences);
        }
    }

    pub(crate) fn delete_group(&self, address: &str, group: &str) -> Result<Durable, BrokerError> {
        let a = self
            .find(address)
            .ok_or_else(|| BrokerError::NoSuchAddress(address.to_string()))?;
        let r = {
            let mut st = a.state.lock();
            if st.is_closed() {
                return Err(BrokerError::NoSuchAddress(address.to_string()));
            }
            a.delete_group(&mut st, group)
        };
        a.notify.notify_waiters();
        r
    }

    pub(crate) fn snapshot(&self, address: &str, f: impl FnOnce(&State) -> usize) -> usize {
        let Some(a) = self.find(address) else {
            return 0;
        };
        let st = a.state.lock();
        f(&st)
    }

    pub(crate) fn contains(&self, address: &str) -> bool {
        self.addresses.contains_key(address)
    }

    pub(crate) fn address_count(&self) -> usize {
        self.addresses.len()
    }

    pub(crate) fn total_retained_messages(&self) -> usize {
        self.budget.live_messages()
    }

    pub(crate) fn total_retained_bytes(&self) -> usize {
        self.budget.used()
    }

    pub(crate) fn address_info(
        &self,
        address: &str,
        with_groups: bool,
    ) -> Option<(AddressInfo, Vec<GroupInfo>)> {
        Some(self.find(address)?.info(with_groups))
    }

    pub(crate) fn list_addresses(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> (Vec<AddressInfo>, Option<String>) {
        let mut names: Vec<(Box<str>, Arc<AddressLog>)> = self
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

    pub(crate) fn delete_address(&self, address: &str) -> Option<usize> {
        // Deleted under the map's shard lock, so a new address of the same name cannot
        // begin writing into the directory before it is gone.
        let mut purged = None;
        let (_, a) = self.addresses.remove_if(address, |_, a| {
            purged = Some(a.delete());
            true
        })?;
        self.address_count.fetch_sub(1, Ordering::AcqRel);
        if let Some(files) = a.disk_files() {
            files.purge();
        }
        purged
    }

    /// One maintenance pass: evicts messages past `--retention-age` and expires due leases on
    /// every address, then removes every address idle for `--idle-address-ms`.
    pub(crate) fn maintain(&self) -> Maintenance {
        // Candidates under read locks (one address lock at a time), then each removal under
        // its shard's write lock.
        let mut aged = 0;
        let mut dead_letters: Vec<DeadLetter> = Vec::new();
        let candidates: Vec<Box<str>> = self
            .addresses
            .iter()
            .filter(|e| {
                aged += e.value().sweep(&mut dead_letters);
                let st = e.value().state.lock();
                st.retained_messages() == 0 && st.subscribers() == 0
            })
            .map(|e| e.key().clone())
            .collect();
        let reclaimed = candidates
            .iter()
            .filter(|name| {
                let removed = self
                    .addresses
                    .remove_if(name.as_ref(), |_, a| a.close_if_idle(self.idle_address));
                if let Some((_, a)) = &removed {
                    self.address_count.fetch_sub(1, Ordering::AcqRel);
                    if let Some(files) = a.disk_files() {
                        files.purge();
                    }
                }
                removed.is_some()
            })
            .count();
        Maintenance {
            aged,
            reclaimed,
            dead_letters,
        }
    }

    pub(crate) fn shrink(&self) {
        self.budget.compact();
        self.addresses.shrink_to_fit();
        for a in &self.addresses {
            a.value().shrink();
        }
    }

    pub(crate) fn idle_address(&self) -> Duration {
        self.idle_address
    }
}
