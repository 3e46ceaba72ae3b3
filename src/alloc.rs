//! Giving freed memory back to the operating system once the broker goes idle.
//!
//! glibc's malloc keeps freed memory in its arenas for reuse, so after a burst (a flood of
//! messages that were then evicted, many connections that closed) the process's RSS stays at
//! its peak although the broker holds little. Once the broker has been idle (no message sent or
//! delivered) for a maintenance period, [`IdleTrim`] calls glibc's `malloc_trim(0)` once, which
//! returns the free pages of every arena. It runs off the request path, at most once per idle
//! spell, because it walks the arenas under their locks.
//!
//! An allocator swap (jemalloc, mimalloc) would return memory by itself but changes the cost of
//! every allocation on the hot paths; this keeps the allocator and only trims when nothing
//! happens. On targets other than Linux with glibc it does nothing.

/// Decides when the broker has gone idle and trims then. See the module docs.
#[derive(Debug, Default)]
pub struct IdleTrim {
    last_activity: u64,
    quiet_ticks: u32,
    trimmed: bool,
}

impl IdleTrim {
    /// Called once per maintenance tick with a figure that moves with activity (messages sent
    /// and delivered, addresses held, bytes retained). True after two quiet ticks in a row, once per idle spell: the caller
    /// then drops its own spare capacity and calls [`release_free_memory`].
    pub fn tick(&mut self, activity: u64) -> bool {
        if activity != self.last_activity {
            self.last_activity = activity;
            self.quiet_ticks = 0;
            self.trimmed = false;
            return false;
        }
        self.quiet_ticks = self.quiet_ticks.saturating_add(1);
        if self.quiet_ticks < 2 || self.trimmed {
            return false;
        }
        self.trimmed = true;
        true
    }
}

/// Returns the allocator's free memory to the operating system (glibc `malloc_trim(0)`).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only inspects and releases glibc's own free lists; it takes the arena
    // locks itself and has no preconditions on the caller.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_per_idle_spell_after_two_quiet_ticks() {
        let mut t = IdleTrim::default();
        assert!(!t.tick(5), "activity");
        assert!(!t.tick(5), "one quiet tick");
        assert!(t.tick(5), "two: trim");
        assert!(!t.tick(5), "once per spell");
        assert!(!t.tick(9), "activity again");
        assert!(!t.tick(9));
        assert!(t.tick(9));
    }
}
