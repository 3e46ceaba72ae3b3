//! CPU time of the broker process and of this one (the bench's publisher and subscribers), read
//! from Linux's `/proc/<pid>/stat` (user + system time of all threads, in clock ticks of
//! usually 10 ms). Elsewhere, or when the file cannot be read, there is no figure.

use crate::Server;

/// CPU ticks used so far by the broker and by the bench process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Usage {
    broker: u64,
    bench: u64,
}

impl Usage {
    /// Now, for `server`'s broker and this process; `None` if either cannot be read.
    pub(crate) fn of(server: &Server) -> Option<Self> {
        Some(Self {
            broker: ticks(server.child.id()?)?,
            bench: ticks(std::process::id())?,
        })
    }

    /// µs of CPU per message between `before` and `self` for `messages` messages: (broker,
    /// bench process).
    pub(crate) fn since(
        this: Option<Self>,
        before: Option<Self>,
        messages: u64,
    ) -> Option<(f64, f64)> {
        let (now, before) = (this?, before?);
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if per_second <= 0 || messages == 0 {
            return None;
        }
        let us = |ticks: u64| ticks as f64 * 1e6 / per_second as f64 / messages as f64;
        Some((
            us(now.broker.saturating_sub(before.broker)),
            us(now.bench.saturating_sub(before.bench)),
        ))
    }
}

/// utime + stime of process `pid` (fields 14 and 15 of `/proc/<pid>/stat`, counted after the
/// command name, which may contain spaces but ends at the last `)`).
fn ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}
