//! Per-connection accounting of long-lived streams (Subscribe, SendStream), so that one client
//! connection cannot hold an unbounded number of them (`--max-streams-per-connection`).
//!
//! A connection is known by its peer address (unique per TCP connection). HTTP/2's own
//! `SETTINGS_MAX_CONCURRENT_STREAMS` is set above this limit: a client past it gets our clear
//! `RESOURCE_EXHAUSTED` instead of being queued by its HTTP/2 stack.

use std::{net::SocketAddr, sync::Arc};

use dashmap::DashMap;

use crate::error::BrokerError;

/// Counts open streams per connection. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamLimiter {
    open: Arc<DashMap<SocketAddr, usize>>,
    max: usize,
}

/// One open stream; dropping it frees its place.
#[derive(Debug)]
pub struct StreamPermit {
    open: Arc<DashMap<SocketAddr, usize>>,
    peer: SocketAddr,
}

impl StreamLimiter {
    /// At most `max` streams per connection.
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(DashMap::new()),
            max,
        }
    }

    /// Takes a place for a new stream from `peer`; `None` (no limit) when the peer is unknown.
    ///
    /// # Errors
    /// [`BrokerError::LimitReached`] when the connection already holds the maximum.
    pub fn acquire(&self, peer: Option<SocketAddr>) -> Result<Option<StreamPermit>, BrokerError> {
        let Some(peer) = peer else {
            return Ok(None);
        };
        let mut n = self.open.entry(peer).or_insert(0);
        if *n >= self.max {
            return Err(BrokerError::LimitReached {
                what: "streams open on this connection",
                limit: self.max,
                flag: "--max-streams-per-connection",
            });
        }
        *n += 1;
        Ok(Some(StreamPermit {
            open: Arc::clone(&self.open),
            peer,
        }))
    }

    /// Streams open from `peer` now.
    pub fn open_streams(&self, peer: SocketAddr) -> usize {
        self.open.get(&peer).map_or(0, |n| *n)
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.open.remove_if_mut(&self.peer, |_, n| {
            *n = n.saturating_sub(1);
            *n == 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_per_peer_and_freed() {
        let limiter = StreamLimiter::new(2);
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let p1 = limiter.acquire(Some(a)).unwrap();
        let _p2 = limiter.acquire(Some(a)).unwrap();
        let e = limiter.acquire(Some(a)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.to_string().contains("--max-streams-per-connection"));
        assert!(
            limiter.acquire(Some(b)).unwrap().is_some(),
            "other connections unaffected"
        );
        drop(p1);
        assert_eq!(limiter.open_streams(a), 1);
        assert!(limiter.acquire(Some(a)).is_ok());
        assert!(limiter.acquire(None).unwrap().is_none());
    }
}
