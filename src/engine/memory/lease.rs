//! The leases of one group with acknowledgements: which handed-out messages are awaiting an
//! Ack, until when, how often each was delivered, and which are ready to go out again.
//!
//! Pure bookkeeping over sequences (no messages, no locks of its own): the address log calls it
//! under the address lock. Redelivery goes lowest sequence first (the `ready` set is ordered),
//! before any new message. Expiry is found by one scan of the pending map when the earliest
//! deadline (`next_due`, kept as a lower bound) has passed, so a take costs O(log n) while no
//! lease is due and O(pending) — at most `max_ack_pending` — when one is.

use std::collections::{BTreeMap, BTreeSet};

use tokio::time::Instant;

use crate::engine::{AckPolicy, Settle};

#[derive(Debug, Clone, Copy)]
struct Lease {
    /// Leased: when the lease expires. Waiting (not leased, not ready): when it becomes ready.
    deadline: Instant,
    /// Deliveries so far.
    attempts: u32,
    leased: bool,
    /// Which reader holds the lease (a group stream's id; 0 for Recv callers).
    holder: u64,
}

/// See the module docs.
#[derive(Debug)]
pub(super) struct Leases {
    pub(super) policy: AckPolicy,
    pending: BTreeMap<u64, Lease>,
    ready: BTreeSet<u64>,
    /// No deadline of a leased or delayed entry is earlier than this (may be stale-early).
    next_due: Option<Instant>,
    pub(super) redelivered: u64,
    pub(super) dead_lettered: u64,
    pub(super) acked: u64,
}

/// The outcome of a settle operation on one sequence.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// Done.
    Settled,
    /// The sequence was not awaiting an acknowledgement.
    NotPending,
    /// A Nack on the last allowed delivery: dead-letter it (deliveries so far).
    DeadLetter(u32),
}

impl Leases {
    pub(super) fn new(policy: AckPolicy) -> Self {
        Self {
            policy,
            pending: BTreeMap::new(),
            ready: BTreeSet::new(),
            next_due: None,
            redelivered: 0,
            dead_lettered: 0,
            acked: 0,
        }
    }

    /// Messages handed out and not acknowledged.
    pub(super) fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Whether one more new message may be handed out.
    pub(super) fn has_room(&self) -> bool {
        self.pending.len() < self.policy.max_ack_pending as usize
    }

    /// How many more new messages may be handed out.
    pub(super) fn room(&self) -> usize {
        (self.policy.max_ack_pending as usize).saturating_sub(self.pending.len())
    }

    pub(super) fn next_due(&self) -> Option<Instant> {
        self.next_due
    }

    fn due(&mut self, at: Instant) {
        self.next_due = Some(self.next_due.map_or(at, |d| d.min(at)));
    }

    fn exhausted(&self, attempts: u32) -> bool {
        self.policy.max_deliveries > 0 && attempts >= self.policy.max_deliveries
    }

    /// Forgets pending messages below `first` (evicted by retention); returns how many.
    pub(super) fn evict_below(&mut self, first: u64) -> u64 {
        // The common case, nothing evicted, costs one lookup.
        if self
            .pending
            .first_key_value()
            .is_none_or(|(&k, _)| k >= first)
        {
            return 0;
        }
        let kept = self.pending.split_off(&first);
        let gone = std::mem::replace(&mut self.pending, kept);
        self.ready = self.ready.split_off(&first);
        gone.len() as u64
    }

    /// Expires the leases and delays that are due at `now`: each becomes ready for redelivery,
    /// or, on its last allowed delivery, is removed and returned (sequence, deliveries) to be
    /// dead-lettered.
    pub(super) fn expire(&mut self, now: Instant) -> Vec<(u64, u32)> {
        if self.next_due.is_none_or(|d| d > now) {
            return Vec::new();
        }
        let mut dead = Vec::new();
        let mut next: Option<Instant> = None;
        for (&seq, lease) in &mut self.pending {
            if self.ready.contains(&seq) {
                continue;
            }
            if lease.deadline > now {
                next = Some(next.map_or(lease.deadline, |d| d.min(lease.deadline)));
                continue;
            }
            if lease.leased
                && self.policy.max_deliveries > 0
                && lease.attempts >= self.policy.max_deliveries
            {
                dead.push((seq, lease.attempts));
                continue;
            }
            lease.leased = false;
            self.ready.insert(seq);
        }
        for (seq, _) in &dead {
            self.pending.remove(seq);
        }
        self.dead_lettered += dead.len() as u64;
        self.next_due = next;
        dead
    }

    /// The lowest sequence ready for redelivery, if any.
    pub(super) fn first_ready(&self) -> Option<u64> {
        self.ready.first().copied()
    }

    /// Leases the ready message `seq` again to `holder`; returns its delivery attempt, or
    /// `None` (and forgets it) if it was not pending. One step of a take, which first checks
    /// that the message fits the batch (see [`Leases::first_ready`]).
    pub(super) fn redeliver_one(&mut self, seq: u64, now: Instant, holder: u64) -> Option<u32> {
        self.ready.remove(&seq);
        let lease = self.pending.get_mut(&seq)?;
        let deadline = now + self.policy.ack_wait;
        lease.attempts = lease.attempts.saturating_add(1);
        lease.leased = true;
        lease.deadline = deadline;
        lease.holder = holder;
        let attempts = lease.attempts;
        self.redelivered += 1;
        self.due(deadline);
        Some(attempts)
    }

    /// Restores a message that was leased `attempts` times and not acknowledged when the broker
    /// stopped (disk engine start-up): its lease counts as expired now, so the next read
    /// redelivers it with its attempts continuing, or dead-letters it if that was its last
    /// allowed delivery.
    pub(super) fn restore(&mut self, seq: u64, attempts: u32, now: Instant) {
        self.pending.insert(
            seq,
            Lease {
                deadline: now,
                attempts,
                leased: true,
                holder: 0,
            },
        );
        self.due(now);
    }

    /// The pending messages (sequence, deliveries so far), lowest sequence first, for the disk
    /// engine's journal.
    pub(super) fn attempts(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.pending.iter().map(|(&s, l)| (s, l.attempts))
    }

    /// Leases a message handed out for the first time.
    pub(super) fn lease_new(&mut self, seq: u64, now: Instant, holder: u64) {
        let deadline = now + self.policy.ack_wait;
        self.pending.insert(
            seq,
            Lease {
                deadline,
                attempts: 1,
                leased: true,
                holder,
            },
        );
        self.due(deadline);
    }

    /// Ack, Nack or ExtendLease of one sequence.
    pub(super) fn settle(&mut self, seq: u64, op: Settle, now: Instant) -> Outcome {
        match op {
            Settle::Ack => {
                if self.pending.remove(&seq).is_none() {
                    return Outcome::NotPending;
                }
                self.ready.remove(&seq);
                self.acked += 1;
                Outcome::Settled
            }
            Settle::Nack(delay) => {
                let Some(lease) = self.pending.get(&seq).copied() else {
                    return Outcome::NotPending;
                };
                if !lease.leased {
                    return Outcome::NotPending;
                }
                if self.exhausted(lease.attempts) {
                    self.pending.remove(&seq);
                    self.dead_lettered += 1;
                    return Outcome::DeadLetter(lease.attempts);
                }
                let at = now + delay;
                if let Some(l) = self.pending.get_mut(&seq) {
                    l.leased = false;
                    l.deadline = at;
                }
                if delay.is_zero() {
                    self.ready.insert(seq);
                } else {
                    self.due(at);
                }
                Outcome::Settled
            }
            Settle::Extend => match self.pending.get_mut(&seq) {
                Some(l) if l.leased => {
                    l.deadline = now + self.policy.ack_wait;
                    Outcome::Settled
                }
                _ => Outcome::NotPending,
            },
        }
    }

    /// Makes every message leased to `holder` ready for redelivery at once (its stream ended);
    /// returns how many.
    pub(super) fn release(&mut self, holder: u64) -> usize {
        let mut n = 0;
        for (&seq, lease) in &mut self.pending {
            if lease.leased && lease.holder == holder {
                lease.leased = false;
                self.ready.insert(seq);
                n += 1;
            }
        }
        n
    }

    /// Whether a redelivery is ready now.
    pub(super) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }
}

#[cfg(test)]
mod tests {
    /// Leases up to `max` ready messages again (lowest first), as a take with room does.
    fn redeliver_n(l: &mut Leases, now: Instant, max: usize, holder: u64) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        while out.len() < max {
            let Some(seq) = l.first_ready() else { break };
            if let Some(a) = l.redeliver_one(seq, now, holder) {
                out.push((seq, a));
            }
        }
        out
    }

    use std::time::Duration;

    use super::*;

    fn leases(max_deliveries: u32) -> Leases {
        Leases::new(AckPolicy {
            ack_wait: Duration::from_secs(10),
            max_deliveries,
            dead_letter: None,
            max_ack_pending: 3,
        })
    }

    #[test]
    fn expiry_makes_ready_and_redelivery_goes_lowest_first() {
        let t0 = Instant::now();
        let mut l = leases(0);
        for seq in [5, 3, 4] {
            l.lease_new(seq, t0, 1);
        }
        assert!(!l.has_room(), "max_ack_pending 3 reached");
        assert!(l.expire(t0 + Duration::from_secs(9)).is_empty());
        assert!(!l.has_ready());
        assert!(l.expire(t0 + Duration::from_secs(10)).is_empty());
        let again = redeliver_n(&mut l, t0 + Duration::from_secs(10), 2, 2);
        assert_eq!(again, vec![(3, 2), (4, 2)]);
        assert_eq!(l.redelivered, 2);
        assert_eq!(l.settle(3, Settle::Ack, t0), Outcome::Settled);
        assert_eq!(l.settle(3, Settle::Ack, t0), Outcome::NotPending);
        assert_eq!(l.pending(), 2);
    }

    #[test]
    fn last_delivery_dead_letters_on_expiry_and_on_nack() {
        let t0 = Instant::now();
        let mut l = leases(2);
        l.lease_new(1, t0, 0);
        l.lease_new(2, t0, 0);
        let t1 = t0 + Duration::from_secs(10);
        assert!(l.expire(t1).is_empty(), "first delivery of 2 may go again");
        assert_eq!(redeliver_n(&mut l, t1, 10, 0), vec![(1, 2), (2, 2)]);
        assert_eq!(
            l.settle(2, Settle::Nack(Duration::ZERO), t1),
            Outcome::DeadLetter(2)
        );
        assert_eq!(l.expire(t1 + Duration::from_secs(10)), vec![(1, 2)]);
        assert_eq!(l.pending(), 0);
        assert_eq!(l.dead_lettered, 2);
    }

    #[test]
    fn nack_delay_extend_and_release() {
        let t0 = Instant::now();
        let mut l = leases(0);
        l.lease_new(1, t0, 7);
        l.lease_new(2, t0, 7);
        l.lease_new(3, t0, 8);
        assert_eq!(
            l.settle(1, Settle::Nack(Duration::from_secs(3)), t0),
            Outcome::Settled
        );
        assert!(l.expire(t0 + Duration::from_secs(2)).is_empty());
        assert!(!l.has_ready(), "not before the delay");
        l.expire(t0 + Duration::from_secs(3));
        assert!(l.has_ready());
        assert_eq!(
            l.settle(2, Settle::Extend, t0 + Duration::from_secs(9)),
            Outcome::Settled
        );
        l.expire(t0 + Duration::from_secs(12));
        // 3 expired at 10 s; 2 was extended to 19 s.
        assert_eq!(
            redeliver_n(&mut l, t0 + Duration::from_secs(12), 10, 9),
            vec![(1, 2), (3, 2)]
        );
        assert_eq!(l.release(9), 2);
        assert_eq!(l.release(7), 1, "2 is still leased to 7");
        assert_eq!(l.settle(5, Settle::Extend, t0), Outcome::NotPending);
        assert_eq!(l.evict_below(3), 2);
        assert_eq!(l.pending(), 1);
    }
}
