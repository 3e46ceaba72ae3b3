//! [`ReadBudget`]: the broker-wide bound on bytes of messages that readers hold outside the
//! retention window's own accounting: what a fan-out subscriber has read for its stream and
//! not yet handed to it (a replay from disk, or messages the window has since evicted), and
//! what a SendStream has read ahead of its durable responses. Retention bounds what the
//! addresses keep; this bounds what readers keep, so a stalled reader cannot pin memory that
//! no bound counts.
//!
//! A reader reserves before it reads ([`ReadBudget::reserve`], waiting while the budget is
//! spent: backpressure) and releases when it hands the messages on (dropping the
//! [`ReadCharge`]). A subscriber reads at most [`SUBSCRIBER_READ_BYTES`] at a time (at least
//! one message); a message larger than what was reserved is charged in full once read. So the
//! memory held is at most the budget plus, per stream, the one message its transport is
//! sending.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Most bytes (as charged to retention: payload + headers + 128) a fan-out subscriber reads
/// for its stream at a time.
pub const SUBSCRIBER_READ_BYTES: usize = 256 * 1024;

/// The shared budget. Cloning shares it.
#[derive(Debug, Clone)]
pub struct ReadBudget {
    permits: Arc<Semaphore>,
    limit: usize,
}

/// Bytes reserved from a [`ReadBudget`]; released when dropped.
#[derive(Debug, Default)]
pub struct ReadCharge(Option<OwnedSemaphorePermit>);

impl ReadCharge {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.0.as_ref().map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Gives back what this charge holds beyond `bytes`.
    pub fn shrink_to(&mut self, bytes: usize) {
        let held = self.bytes();
        if held > bytes {
            if let Some(p) = self.0.as_mut() {
                drop(p.split(held - bytes));
            }
        }
    }

    /// Adds `other`'s bytes to this charge.
    pub fn merge(&mut self, other: Self) {
        match (&mut self.0, other.0) {
            (Some(a), Some(b)) => a.merge(b),
            (None, b) => self.0 = b,
            (_, None) => {}
        }
    }
}

impl ReadBudget {
    /// A budget of `limit` bytes (`--max-read-buffer-bytes`).
    pub fn new(limit: usize) -> Self {
        let limit = limit.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The permits for `bytes`: at most the whole budget (a reader asking for more waits for
    /// all of it rather than for ever).
    fn permits(&self, bytes: usize) -> u32 {
        u32::try_from(bytes.clamp(1, self.limit)).unwrap_or(u32::MAX)
    }

    /// Reserves `bytes` now if the budget has them.
    pub fn try_reserve(&self, bytes: usize) -> Option<ReadCharge> {
        Arc::clone(&self.permits)
            .try_acquire_many_owned(self.permits(bytes))
            .ok()
            .map(|p| ReadCharge(Some(p)))
    }

    /// Reserves `bytes`, waiting (first come, first served) while the budget is spent.
    pub async fn reserve(&self, bytes: usize) -> ReadCharge {
        match Arc::clone(&self.permits)
            .acquire_many_owned(self.permits(bytes))
            .await
        {
            Ok(p) => ReadCharge(Some(p)),
            // The semaphore is never closed; should it be, reading goes on uncharged.
            Err(_) => ReadCharge(None),
        }
    }

    /// [`ReadBudget::reserve`], unless `shutdown` fires first: then `None`.
    pub async fn reserve_until(
        &self,
        bytes: usize,
        shutdown: &mut crate::shutdown::ShutdownToken,
    ) -> Option<ReadCharge> {
        if let Some(c) = self.try_reserve(bytes) {
            return Some(c);
        }
        tokio::select! {
            c = self.reserve(bytes) => Some(c),
            () = shutdown.cancelled() => None,
        }
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        self.limit - self.permits.available_permits().min(self.limit)
    }

    /// The budget, bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Adjusts `charge` to `bytes` once a read is done: gives back what was not used, or, for
    /// a message larger than the reservation, charges the rest (waiting for it).
    pub async fn settle(&self, charge: &mut ReadCharge, bytes: usize) {
        let want = if bytes == 0 {
            0
        } else {
            self.permits(bytes) as usize
        };
        let held = charge.bytes();
        if want < held {
            if let Some(p) = charge.0.as_mut() {
                drop(p.split(held - want));
            }
        } else if want > held {
            let more = self.reserve(want - held).await;
            charge.merge(more);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reserve_waits_while_spent_and_release_frees() {
        let b = ReadBudget::new(1000);
        let a = b.reserve(600).await;
        assert_eq!(b.in_use(), 600);
        assert!(b.try_reserve(500).is_none(), "only 400 left");
        let c = b.try_reserve(400).expect("exactly what is left");
        assert_eq!(b.in_use(), 1000);
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.reserve(300).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(a);
        let d = waiting.await.unwrap();
        assert_eq!(b.in_use(), 700);
        drop((c, d));
        assert_eq!(b.in_use(), 0);
    }

    #[tokio::test]
    async fn settle_gives_back_or_charges_the_rest() {
        let b = ReadBudget::new(1000);
        let mut c = b.reserve(256).await;
        b.settle(&mut c, 100).await;
        assert_eq!(b.in_use(), 100);
        b.settle(&mut c, 700).await;
        assert_eq!(b.in_use(), 700);
        // More than the budget is charged as the whole budget.
        b.settle(&mut c, 5000).await;
        assert_eq!(b.in_use(), 1000);
        c.shrink_to(300);
        assert_eq!((c.bytes(), b.in_use()), (300, 300));
        c.shrink_to(400);
        assert_eq!(c.bytes(), 300, "shrinking never grows");
        c.merge(b.reserve(200).await);
        assert_eq!((c.bytes(), b.in_use()), (500, 500));
        drop(c);
        assert_eq!(b.in_use(), 0);
    }
}
