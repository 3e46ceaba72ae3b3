//! The disk engine's sparse index of retained messages that left memory: the oldest part of an
//! address's window, kept as *runs* instead of one entry per message.
//!
//! A run is up to [`RUN_MESSAGES`] consecutive messages (at most [`RUN_BYTES`] charged bytes)
//! whose records follow each other in one segment: its first sequence, its count, where its
//! first record starts, the bytes charged for it and the time of its newest message. That is
//! about 64 bytes per run, under half a byte per 128-byte message, in place of the ~200 bytes an
//! in-memory entry costs; so a disk-mode broker's memory follows `--cache-bytes` and the number
//! of runs, not the number of retained messages (Kafka's sparse offset index, one entry per
//! 4 KiB of log, is the same idea).
//!
//! Readers scan the segment from the run's first record (`AddressFiles::scan_messages`).
//! Retention trims the front one message at a time: the front run's records are read once
//! (without payloads) to learn each message's size and time, and the run shrinks from the front.
//!
//! Messages enter at the back, in sequence order, when they leave the cache (the cache evicts
//! oldest first, so the hollowed messages are a prefix of the in-memory window) or at start-up.
//! A message joins the last run only if its append time and `sent_at` moved on by the same
//! amount (within [`CLOCK_SLACK`]): each message's append time, which the age bound uses, is
//! then rebuilt from its `sent_at` relative to the run's newest, and a wall-clock step starts a
//! new run.

use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use crate::engine::{
    disk::{record, AddressFiles},
    memory::log::Loc,
};

/// Most messages in one run.
pub(crate) const RUN_MESSAGES: u32 = 256;
/// Most charged bytes (payload + headers + 128 per message) in one run: a run is read whole
/// when retention trims it, so this bounds that read.
pub(crate) const RUN_BYTES: usize = 1024 * 1024;

/// Consecutive messages with consecutive records in one segment.
#[derive(Debug, Clone)]
struct Run {
    first: u64,
    count: u32,
    segment: u64,
    /// Byte offset of the record of `first`.
    offset: u64,
    /// Bytes charged for the run's messages.
    bytes: usize,
    /// When its newest message was appended (monotonic): a run older than the age bound goes
    /// whole, without being read.
    newest_appended: Instant,
    /// `sent_at` of its newest message: where a replay from a time starts.
    newest_sent: SystemTime,
}

/// What retention needs of one message of the front run, read from its record.
#[derive(Debug, Clone, Copy)]
struct Detail {
    size: usize,
    appended: Instant,
    /// Offset of the next record (the run's new start once this message is trimmed).
    next_offset: u64,
}

/// See the module docs.
#[derive(Debug, Default)]
pub(crate) struct ColdIndex {
    runs: VecDeque<Run>,
    count: u64,
    /// The front run's messages (in order) once read for trimming; empty until then. A run
    /// whose details are loaded takes no new messages.
    front: VecDeque<Detail>,
}

/// A message entering the cold index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ColdMessage {
    pub(crate) sequence: u64,
    pub(crate) size: usize,
    pub(crate) appended: Instant,
    pub(crate) sent_at: SystemTime,
    pub(crate) loc: Loc,
}

/// How far the monotonic and wall clocks may drift apart within one run: a message's append
/// time is rebuilt from its `sent_at` relative to the run's newest, so within this much.
const CLOCK_SLACK: Duration = Duration::from_millis(10);

/// Whether `m` was appended as long after the run's newest message as its `sent_at` says (no
/// wall-clock step between them), so its append time can be rebuilt from its `sent_at`.
fn clocks_agree(r: &Run, m: &ColdMessage) -> bool {
    let mono = m.appended.saturating_duration_since(r.newest_appended);
    m.sent_at
        .duration_since(r.newest_sent)
        .is_ok_and(|wall| mono.abs_diff(wall) <= CLOCK_SLACK)
}

impl ColdIndex {
    /// Messages in the index.
    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    /// Whether it holds no message.
    pub(crate) fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Runs held (each costs about 64 bytes).
    #[cfg(test)]
    pub(crate) fn runs(&self) -> usize {
        self.runs.len()
    }

    /// Bytes charged for the messages held.
    pub(crate) fn bytes(&self) -> usize {
        self.runs.iter().map(|r| r.bytes).sum()
    }

    /// The oldest sequence held.
    pub(crate) fn first(&self) -> Option<u64> {
        self.runs.front().map(|r| r.first)
    }

    /// Adds the message after the newest one held (or the first).
    pub(crate) fn push(&mut self, m: ColdMessage) {
        let front_loaded = !self.front.is_empty();
        let single = self.runs.len() == 1;
        if let Some(r) = self.runs.back_mut() {
            let joins = r.segment == m.loc.segment
                && r.first + u64::from(r.count) == m.sequence
                && m.loc.offset > r.offset
                && r.count < RUN_MESSAGES
                && r.bytes + m.size <= RUN_BYTES
                && !(single && front_loaded)
                && clocks_agree(r, &m);
            if joins {
                r.count += 1;
                r.bytes += m.size;
                r.newest_appended = m.appended;
                r.newest_sent = m.sent_at;
                self.count += 1;
                return;
            }
        }
        self.runs.push_back(Run {
            first: m.sequence,
            count: 1,
            segment: m.loc.segment,
            offset: m.loc.offset,
            bytes: m.size,
            newest_appended: m.appended,
            newest_sent: m.sent_at,
        });
        self.count += 1;
    }

    /// Reads the front run's records (without payloads) so it can be trimmed one message at a
    /// time.
    fn load_front(&mut self, files: &AddressFiles) -> std::io::Result<()> {
        let Some(r) = self.runs.front() else {
            return Ok(());
        };
        let (first, count) = (r.first, r.count);
        let (newest_appended, newest_sent) = (r.newest_appended, r.newest_sent);
        let appended_at = |sent: SystemTime| {
            let before = newest_sent.duration_since(sent).unwrap_or_default();
            newest_appended
                .checked_sub(before)
                .unwrap_or(newest_appended)
        };
        let mut details = VecDeque::with_capacity(count as usize);
        let mut expect = first;
        let mut wrong = None;
        files.scan_records(r.segment, r.offset, |body, next| {
            let Ok(m) = record::decode_message_index(body) else {
                wrong = record::message_sequence(body).or(Some(0));
                return false;
            };
            if m.sequence != expect {
                wrong = Some(m.sequence);
                return false;
            }
            details.push_back(Detail {
                size: m.size,
                appended: appended_at(m.sent_at),
                next_offset: next,
            });
            expect += 1;
            expect < first + u64::from(count)
        })?;
        if let Some(found) = wrong {
            return Err(std::io::Error::other(format!(
                "expected sequence {expect} in the run's records, found {found}"
            )));
        }
        if details.len() != count as usize {
            return Err(std::io::Error::other(format!(
                "the segment ends after {} of the run's {count} records",
                details.len()
            )));
        }
        self.front = details;
        Ok(())
    }

    /// When the oldest message was appended, reading the front run if needed; `None` when
    /// empty or when its records cannot be read (logged by the caller).
    pub(crate) fn front_appended(&mut self, files: Option<&AddressFiles>) -> Option<Instant> {
        if self.front.is_empty() {
            self.load_front(files?).ok()?;
        }
        self.front.front().map(|d| d.appended)
    }

    /// When the front run's newest message was appended: once that is past the age bound, the
    /// whole run goes.
    pub(crate) fn front_run_appended(&self) -> Option<Instant> {
        self.runs.front().map(|r| r.newest_appended)
    }

    /// Removes the whole front run; returns (messages, bytes) it held.
    pub(crate) fn pop_run(&mut self) -> Option<(u64, usize)> {
        let r = self.runs.pop_front()?;
        self.front.clear();
        self.count -= u64::from(r.count);
        Some((u64::from(r.count), r.bytes))
    }

    /// Removes the oldest message; returns its charged bytes.
    ///
    /// # Errors
    /// The front run's records cannot be read: the caller drops the whole run with
    /// [`Self::pop_run`] instead (its bytes are known).
    pub(crate) fn pop_front(&mut self, files: Option<&AddressFiles>) -> Result<Option<usize>, ()> {
        if self.runs.is_empty() {
            return Ok(None);
        }
        if self.front.is_empty() {
            let Some(files) = files else { return Err(()) };
            if let Err(e) = self.load_front(files) {
                tracing::error!(error = %e, "storage: cannot read the oldest records back to trim them; dropping their run whole");
                return Err(());
            }
        }
        let (Some(d), Some(r)) = (self.front.pop_front(), self.runs.front_mut()) else {
            return Err(());
        };
        self.count -= 1;
        if r.count <= 1 {
            self.runs.pop_front();
            self.front.clear();
        } else {
            r.first += 1;
            r.count -= 1;
            r.bytes = r.bytes.saturating_sub(d.size);
            r.offset = d.next_offset;
        }
        Ok(Some(d.size))
    }

    /// Where to start reading `sequence`: (segment, offset of its run's first record); `None`
    /// when it is not held.
    pub(crate) fn locate(&self, sequence: u64) -> Option<(u64, u64)> {
        let i = self
            .runs
            .partition_point(|r| r.first + u64::from(r.count) <= sequence);
        let r = self.runs.get(i)?;
        (r.first <= sequence).then_some((r.segment, r.offset))
    }

    /// The first run that may hold a message sent at or after `t` (runs are in `sent_at`
    /// order, clock steps aside): (its segment, first record offset, first sequence, count).
    pub(crate) fn locate_time(&self, t: SystemTime) -> Option<(u64, u64, u64, u32)> {
        let i = self.runs.partition_point(|r| r.newest_sent < t);
        self.runs
            .get(i)
            .map(|r| (r.segment, r.offset, r.first, r.count))
    }

    /// Drops spare capacity.
    pub(crate) fn shrink(&mut self) {
        self.runs.shrink_to_fit();
        self.front.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::VecDeque, sync::Arc};

    use bytes::Bytes;

    use crate::{
        config::Limits,
        engine::{
            disk::{DiskConfig, FsyncMode},
            Engine, FanoutCursor, Log, NewMessage, StartAt,
        },
        metrics::Metrics,
        validate::Address,
    };

    fn disk(limits: &Limits, dir: &std::path::Path) -> Engine {
        let config = DiskConfig {
            dir: dir.to_path_buf(),
            fsync: FsyncMode::Always,
            segment_bytes: 64 * 1024,
            repair: false,
            journal_compact_bytes: crate::engine::disk::DEFAULT_JOURNAL_COMPACT_BYTES,
            cache_bytes: 0,
        };
        Engine::disk(limits, Arc::new(Metrics::new()), &config).unwrap()
    }

    /// Message `i` (from 0): payloads of varying length, so sizes and offsets differ.
    fn payload(i: usize) -> Bytes {
        Bytes::from(format!("{i}:{}", "x".repeat(i % 37)))
    }

    fn append(e: &Engine, a: &Address, range: std::ops::Range<usize>) {
        let messages = range
            .map(|i| {
                let payload = payload(i);
                NewMessage {
                    size: payload.len() + 128,
                    payload,
                    headers: Default::default(),
                    message_id: None,
                }
            })
            .collect();
        let (_, durable) = e.append_batch(a, messages).unwrap();
        durable.wait_blocking().unwrap();
    }

    fn runs(e: &Engine, a: &str) -> usize {
        match e {
            Engine::Disk(m) | Engine::Memory(m) => m.snapshot(a, |s| s.cold_runs()),
            Engine::Redis(_) => 0,
        }
    }

    fn drain(log: &Log, cursor: &mut FanoutCursor) -> (u64, Vec<(u64, Bytes)>) {
        let mut out = VecDeque::new();
        let mut dropped = 0;
        loop {
            let before = out.len();
            dropped += log.read_fanout(cursor, (100, usize::MAX), &mut out);
            if out.len() == before {
                break;
            }
        }
        let read = out
            .iter()
            .map(|(m, _)| (m.sequence, m.payload.clone()))
            .collect();
        (dropped, read)
    }

    #[test]
    fn runs_across_segments_read_back_and_trim_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            retention_messages: 1_500,
            ..Limits::default()
        };
        let e = disk(&limits, dir.path());
        let a = Address::parse("cold.a").unwrap();
        append(&e, &a, 0..1_000);
        // 1,000 messages over several 64 KiB segments, all out of the cache: a handful of
        // runs, no in-memory entry.
        let n = runs(&e, "cold.a");
        assert!((4..=12).contains(&n), "{n} runs for 1,000 messages");
        assert_eq!(e.counts("cold.a")[2], 1_000);
        // The broker-wide budget's age entries cover runs of consecutive sends too.
        let Engine::Disk(m) = &e else { unreachable!() };
        assert_eq!(m.budget.entries(), 1);

        // A replay from the start reads every message back, in order, byte for byte.
        let (log, mut cursor) = e
            .subscribe_fanout(&a, StartAt::Sequence(1), 10, || unreachable!())
            .unwrap();
        let (dropped, read) = drain(&log, &mut cursor);
        assert_eq!(dropped, 0);
        assert_eq!(read.len(), 1_000);
        for (i, (seq, p)) in read.iter().enumerate() {
            assert_eq!((*seq, p), (i as u64 + 1, &payload(i)));
        }
        log.unsubscribe_fanout(cursor);

        // A replay from a time inside the third run starts at that exact message.
        let (log, mut cursor) = e
            .subscribe_fanout(&a, StartAt::Sequence(600), 10, || unreachable!())
            .unwrap();
        let mut one = VecDeque::new();
        log.read_fanout(&mut cursor, (1, usize::MAX), &mut one);
        let sent = one[0].0.sent_at;
        log.unsubscribe_fanout(cursor);
        let (_, next, durable) = e
            .create_group(
                &a,
                "from-time",
                crate::engine::GroupSettings {
                    start: StartAt::Time(sent),
                    ack: None,
                },
            )
            .unwrap();
        durable.wait_blocking().unwrap();
        // Messages sent within the same clock tick share a time: the first of them.
        assert!(next <= 600, "{next}");
        let (_, _, batch) = e.take(&a, "from-time", 1, usize::MAX, false).unwrap();
        assert_eq!(batch.messages[0].message.sent_at, sent);

        // 1,000 more: the count bound (1,500) trims the oldest 500 from the front run by run,
        // one message at a time, and the bytes follow exactly.
        append(&e, &a, 1_000..2_000);
        let (info, _) = e.address_info("cold.a", false).unwrap();
        assert_eq!((info.first_sequence, info.retained_messages), (501, 1_500));
        let bytes: usize = (500..2_000).map(|i| payload(i).len() + 128).sum();
        assert_eq!(info.retained_bytes, bytes);
        let (log, mut cursor) = e
            .subscribe_fanout(&a, StartAt::Sequence(1), 10, || unreachable!())
            .unwrap();
        let (dropped, read) = drain(&log, &mut cursor);
        assert_eq!(dropped, 500);
        assert_eq!(read.first().map(|r| r.0), Some(501));
        assert_eq!(read.last(), Some(&(2_000, payload(1_999))));
        log.unsubscribe_fanout(cursor);

        // The same index after a restart (on a copy: the first engine keeps its lock).
        e.close();
        let copy = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", dir.path().display()))
            .arg(copy.path())
            .status()
            .unwrap();
        assert!(status.success());
        let e = disk(&limits, copy.path());
        let (info, _) = e.address_info("cold.a", false).unwrap();
        assert_eq!(
            (
                info.first_sequence,
                info.retained_messages,
                info.retained_bytes
            ),
            (501, 1_500, bytes)
        );
        let n = runs(&e, "cold.a");
        assert!((6..=20).contains(&n), "{n} runs for 1,500 messages");
        let (_, _, batch) = e.take(&a, "", 2_000, usize::MAX, false).unwrap();
        // The default group holds everything sent before anyone read it: all from disk.
        assert_eq!(batch.messages.len(), 1_500);
        for (k, t) in batch.messages.iter().enumerate() {
            assert_eq!(t.message.sequence, 501 + k as u64);
            assert_eq!(t.message.payload, payload(500 + k));
        }
        let (log, mut cursor) = e
            .subscribe_fanout(&a, StartAt::Sequence(1_234), 10, || unreachable!())
            .unwrap();
        let (_, read) = drain(&log, &mut cursor);
        assert_eq!(read.len(), 767);
        assert_eq!(read[0], (1_234, payload(1_233)));
        log.unsubscribe_fanout(cursor);
    }
}

#[cfg(test)]
mod budget_tests {
    use std::sync::Arc;

    use bytes::Bytes;

    use crate::{
        config::Limits,
        engine::{
            disk::{DiskConfig, FsyncMode},
            Engine,
        },
        metrics::Metrics,
        validate::Address,
    };

    /// Two addresses sending turn about, past the broker-wide bound: the budget holds one entry
    /// per address (not one per message), and eviction still takes the oldest broker-wide
    /// exactly, so both lose their first 100.
    #[test]
    fn interleaved_addresses_cost_one_budget_entry_each_and_evict_oldest_first() {
        const SIZE: usize = 100 + 128;
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            retention_messages: 100_000,
            retention_bytes: 400 * SIZE,
            max_retained_bytes: 400 * SIZE,
            ..Limits::default()
        };
        let config = DiskConfig {
            dir: dir.path().to_path_buf(),
            fsync: FsyncMode::Always,
            segment_bytes: 64 * 1024,
            repair: false,
            journal_compact_bytes: crate::engine::disk::DEFAULT_JOURNAL_COMPACT_BYTES,
            cache_bytes: 0,
        };
        let e = Engine::disk(&limits, Arc::new(Metrics::new()), &config).unwrap();
        let (a, b) = (
            Address::parse("turn.a").unwrap(),
            Address::parse("turn.b").unwrap(),
        );
        for _ in 0..300 {
            for address in [&a, &b] {
                let payload = Bytes::from(vec![7u8; 100]);
                let (_, durable) = e
                    .append(address, payload, Default::default(), SIZE, None)
                    .unwrap();
                durable.wait_blocking().unwrap();
            }
        }
        let Engine::Disk(m) = &e else { unreachable!() };
        assert_eq!(m.budget.entries(), 2);
        for name in ["turn.a", "turn.b"] {
            let (info, _) = e.address_info(name, false).unwrap();
            assert_eq!(
                (info.first_sequence, info.retained_messages),
                (101, 200),
                "{name}"
            );
        }
        assert_eq!(e.total_retained_bytes(), 400 * SIZE);
    }
}
