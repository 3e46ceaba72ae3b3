//! The process's open-file limit (`RLIMIT_NOFILE`).
//!
//! Every connection, on the gRPC port and on the HTTP listener, is a file descriptor, and so is
//! every segment and journal file the disk engine holds open. Many systems start processes
//! with a soft limit of 1,024 under a much higher hard limit; at the soft limit `accept` fails
//! (new clients are locked out) and the disk engine's writes fail with "Too many open files".
//! So `switchboard serve` raises the soft limit to the hard limit at start ([`raise`]), logs
//! both, and warns when the connection limits do not fit under it ([`shortfall`]).
//!
//! Only on Linux with glibc (where `libc` is a dependency); elsewhere [`raise`] reports
//! nothing and changes nothing.

/// File descriptors set aside besides the connection limits when checking them against the
/// open-file limit: the listeners, the data directory's lock, Redis connections, and the disk
/// engine's segment and journal files (each address with data holds up to three).
pub const FD_RESERVE: u64 = 1_024;

/// The open-file limit after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit in force now.
    pub soft: u64,
    /// The hard limit (the most the soft limit may be raised to without privileges).
    pub hard: u64,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (to `fs.nr_open` when the hard limit is
/// unlimited). `Ok(None)` on platforms where this is not done.
///
/// # Errors
/// The system error when the limit cannot be read or raised.
pub fn raise() -> std::io::Result<Option<FdLimit>> {
    imp::raise()
}

/// When `max_connections` plus `http_max_connections` (the HTTP listener's limit, if it is on)
/// plus [`FD_RESERVE`] exceed the soft limit: a warning naming the flags, the figures and the
/// fix; `None` when they fit.
pub fn shortfall(
    limit: &FdLimit,
    max_connections: usize,
    http_max_connections: Option<usize>,
) -> Option<String> {
    let as_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    let http = http_max_connections.map_or(0, as_u64);
    let needed = as_u64(max_connections)
        .saturating_add(http)
        .saturating_add(FD_RESERVE);
    if needed <= limit.soft {
        return None;
    }
    let http_part = http_max_connections
        .map(|n| format!(" + --http-max-connections ({n})"))
        .unwrap_or_default();
    Some(format!(
        "--max-connections ({max_connections}){http_part} + {FD_RESERVE} for listeners and files \
         = {needed} file descriptors, above the open-file limit of {soft} (hard limit {hard}): \
         before the connection limits are reached, new connections fail to be accepted and the \
         disk engine fails with \"Too many open files\"; raise the hard limit (`ulimit -Hn`, \
         systemd LimitNOFILE=, docker --ulimit nofile=) or lower --max-connections",
        soft = limit.soft,
        hard = limit.hard,
    ))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::FdLimit;

    #[allow(
        clippy::useless_conversion,
        reason = "rlim_t is u64 on 64-bit glibc, u32 on 32-bit"
    )]
    fn to_u64(v: libc::rlim_t) -> u64 {
        u64::from(v)
    }

    fn get() -> std::io::Result<libc::rlimit> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one `rlimit` through a pointer to a live, owned struct.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(lim)
    }

    fn set(soft: libc::rlim_t, hard: libc::rlim_t) -> std::io::Result<()> {
        let lim = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one `rlimit` through a pointer to a live struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The kernel's ceiling for the limit (`fs.nr_open`).
    fn nr_open() -> Option<libc::rlim_t> {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub(super) fn raise() -> std::io::Result<Option<FdLimit>> {
        let lim = get()?;
        let before = lim.rlim_cur;
        if lim.rlim_cur != lim.rlim_max {
            let target = if lim.rlim_max == libc::RLIM_INFINITY {
                nr_open().unwrap_or(lim.rlim_max)
            } else {
                lim.rlim_max
            };
            if target > lim.rlim_cur {
                set(target, lim.rlim_max)?;
            }
        }
        let now = get()?;
        Ok(Some(FdLimit {
            before: to_u64(before),
            soft: to_u64(now.rlim_cur),
            hard: to_u64(now.rlim_max),
        }))
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn raise() -> std::io::Result<Option<super::FdLimit>> {
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortfall_names_the_flags_and_figures() {
        let limit = FdLimit {
            before: 1_024,
            soft: 1_024,
            hard: 1_024,
        };
        let w = shortfall(&limit, 65_536, Some(256)).unwrap();
        assert!(w.contains("--max-connections (65536)"), "{w}");
        assert!(w.contains("--http-max-connections (256)"), "{w}");
        assert!(w.contains("66816"), "{w}");
        assert!(w.contains("open-file limit of 1024"), "{w}");
        let roomy = FdLimit {
            soft: 1 << 20,
            ..limit
        };
        assert_eq!(shortfall(&roomy, 65_536, Some(256)), None);
        assert_eq!(
            shortfall(&limit, 1_024 - usize::try_from(FD_RESERVE).unwrap(), None),
            None,
            "exactly at the limit fits"
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn raise_leaves_the_soft_limit_at_the_hard_one() {
        let l = raise().unwrap().unwrap();
        assert!(l.soft >= l.before);
        assert!(l.soft <= l.hard);
    }
}
