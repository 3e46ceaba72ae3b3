//! The flusher: one thread that writes every address's records and makes them durable, with
//! group commit.
//!
//! Senders stage their messages under the address lock (sequence assigned, not yet visible) and
//! queue a [`Job`]; the flusher takes *everything* queued, writes each address's records with
//! one `write` per job, fdatasyncs each touched address once, and only then makes the messages
//! visible (window, subscribers, groups) and answers the jobs. Whatever arrives while an fsync
//! runs goes into the next round, so concurrent Sends share fsyncs without any fixed wait
//! (PostgreSQL's and Kafka's group commit).
//!
//! Failure: if a write or fsync of an address fails, every job of that address in the round
//! fails, the files are cut back to where the round started, the staged messages are dropped
//! and the address's staging epoch moves on, so jobs queued behind them fail too (nothing after
//! a failed write is ever acknowledged). A failed fsync additionally marks the files for
//! reopening and verification before any further write (no retry of an fsync as if it had
//! worked: PostgreSQL's "fsyncgate").
//!
//! Invariant: per address, jobs are queued in sequence order (queued under the address lock)
//! and written in queue order, so a job's success implies every earlier job of its address
//! succeeded.

use std::{
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use parking_lot::{Condvar, Mutex};
use tokio::sync::oneshot;

use super::record;
use crate::{
    engine::memory::{AddressLog, Loc},
    message::Message,
    metrics::Metrics,
};

/// When the flusher fsyncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// Before a write is acknowledged or made visible (the default).
    Always,
    /// Every interval: writes are acknowledged and visible once written to the OS, and a crash
    /// of the machine (not only of the broker) can lose up to one interval of them.
    Interval(Duration),
}

/// What a job writes.
#[derive(Debug)]
pub enum Work {
    /// Messages with consecutive sequences, with their dedup ids.
    Messages(Vec<(Arc<Message>, Option<Box<str>>)>),
    /// Encoded journal records.
    Journal(Vec<u8>),
    /// Nothing: done when every earlier job of its address is (a duplicate Send of a message
    /// still being written waits for it this way).
    Marker,
}

/// One unit of work for the flusher.
#[derive(Debug)]
pub struct Job {
    /// The address.
    pub log: Arc<AddressLog>,
    /// The address's staging epoch when the job was queued.
    pub epoch: u64,
    /// What to write.
    pub work: Work,
    /// Answered once the work is durable (or failed).
    pub done: Option<oneshot::Sender<Result<(), String>>>,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: Vec<Job>,
    stop: bool,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
}

/// The handle that queues jobs; the thread stops (after the queued jobs) when it drops.
#[derive(Debug)]
pub struct Flusher {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Flusher {
    /// Starts the flusher thread.
    ///
    /// # Errors
    /// The OS refused to start a thread.
    pub fn start(
        mode: FsyncMode,
        segment_bytes: u64,
        journal_compact_bytes: u64,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        });
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("switchboard-flusher".into())
            .spawn(move || run(&s, mode, segment_bytes, journal_compact_bytes, &metrics))?;
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a job. Call it under the address lock, so jobs of one address queue in order.
    pub fn submit(&self, job: Job) {
        let mut q = self.shared.queue.lock();
        q.jobs.push(job);
        drop(q);
        self.shared.ready.notify_one();
    }

    /// Stops the thread after the jobs queued so far, and waits for it.
    pub fn stop(&self) {
        self.shared.queue.lock().stop = true;
        self.shared.ready.notify_one();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The jobs of one address in a round.
struct Group {
    log: Arc<AddressLog>,
    jobs: Vec<Job>,
    last_seq: Option<u64>,
    /// Where each written message's record is, in order.
    locs: Vec<Loc>,
    mark: Option<super::files::Mark>,
    error: Option<String>,
}

fn answer(jobs: Vec<Job>, r: &Result<(), String>) {
    for mut j in jobs {
        if let Some(tx) = j.done.take() {
            let _ = tx.send(r.clone());
        }
    }
}

fn run(
    shared: &Shared,
    mode: FsyncMode,
    segment_bytes: u64,
    journal_compact_bytes: u64,
    metrics: &Metrics,
) {
    let mut buf = Vec::with_capacity(1 << 20);
    // Interval mode: addresses written since the last fsync.
    let mut dirty: Vec<Arc<AddressLog>> = Vec::new();
    let mut last_sync = Instant::now();
    loop {
        let jobs = {
            let mut q = shared.queue.lock();
            loop {
                if !q.jobs.is_empty() || q.stop {
                    break;
                }
                match mode {
                    FsyncMode::Always => shared.ready.wait(&mut q),
                    FsyncMode::Interval(every) => {
                        if !dirty.is_empty() && last_sync.elapsed() >= every {
                            break;
                        }
                        let left = every.saturating_sub(last_sync.elapsed());
                        shared
                            .ready
                            .wait_for(&mut q, left.max(Duration::from_millis(1)));
                    }
                }
            }
            if q.jobs.is_empty() && q.stop {
                break;
            }
            std::mem::take(&mut q.jobs)
        };
        // Group by address, keeping queue order within each.
        let mut groups: Vec<Group> = Vec::new();
        for job in jobs {
            match groups.iter_mut().find(|g| Arc::ptr_eq(&g.log, &job.log)) {
                Some(g) => g.jobs.push(job),
                None => groups.push(Group {
                    log: Arc::clone(&job.log),
                    jobs: vec![job],
                    last_seq: None,
                    locs: Vec::new(),
                    mark: None,
                    error: None,
                }),
            }
        }
        for g in &mut groups {
            write_group(g, &mut buf, segment_bytes);
        }
        match mode {
            FsyncMode::Always => {
                for g in groups.iter_mut().filter(|g| g.error.is_none()) {
                    let Some(files) = g.log.disk_files() else {
                        continue;
                    };
                    let t = Instant::now();
                    let r = files.sync();
                    metrics.fsync_seconds.observe(t.elapsed().as_secs_f64());
                    if let Err(e) = r {
                        tracing::error!(address = %g.log.name, error = %e, "storage: fsync failed; the address's log will be reopened and verified before its next write");
                        g.error = Some(format!("fsync failed: {e}"));
                        if let Some(mark) = g.mark {
                            files.rollback(mark);
                        }
                        g.log.rollback_staged();
                    }
                }
            }
            FsyncMode::Interval(_) => {
                for g in groups.iter().filter(|g| g.error.is_none()) {
                    if !dirty.iter().any(|d| Arc::ptr_eq(d, &g.log)) {
                        dirty.push(Arc::clone(&g.log));
                    }
                }
            }
        }
        for g in groups {
            match g.error {
                None => {
                    if let Some(last) = g.last_seq {
                        g.log.publish_through(last, &g.locs);
                    }
                    answer(g.jobs, &Ok(()));
                    compact(&g.log, journal_compact_bytes);
                }
                Some(e) => {
                    metrics.storage_errors.inc();
                    answer(g.jobs, &Err(e));
                }
            }
        }
        if let FsyncMode::Interval(every) = mode {
            if last_sync.elapsed() >= every && !dirty.is_empty() {
                for log in dirty.drain(..) {
                    if let Some(files) = log.disk_files() {
                        let t = Instant::now();
                        let r = files.sync();
                        metrics.fsync_seconds.observe(t.elapsed().as_secs_f64());
                        if let Err(e) = r {
                            metrics.storage_errors.inc();
                            tracing::error!(address = %log.name, error = %e, "storage: interval fsync failed; the address's log will be reopened and verified before its next write");
                        }
                    }
                }
                last_sync = Instant::now();
            }
        }
    }
    // Interval mode: what was written since the last fsync goes to disk before exit.
    for log in dirty {
        if let Some(files) = log.disk_files() {
            let _ = files.sync();
        }
    }
}

/// Rewrites the address's group journal as a snapshot of its groups once it passes
/// `limit` bytes. Between rounds, so no write to it is in progress; events queued before the
/// snapshot and written after it replay to the same state (see `AddressLog::journal_snapshot`).
fn compact(log: &Arc<AddressLog>, limit: u64) {
    let Some(files) = log.disk_files() else {
        return;
    };
    let before = files.journal_len();
    if before <= limit {
        return;
    }
    let snapshot = log.compacted_journal();
    match files.replace_journal(&snapshot) {
        Ok(()) => {
            tracing::debug!(address = %log.name, before, after = snapshot.len(), "storage: group journal compacted");
        }
        Err(e) => {
            tracing::warn!(address = %log.name, error = %e, "storage: group journal compaction failed; the journal keeps growing until it succeeds");
        }
    }
}

/// Writes one address's jobs; on failure cuts its files back and fails all of them.
fn write_group(g: &mut Group, buf: &mut Vec<u8>, segment_bytes: u64) {
    let Some(files) = g.log.disk_files() else {
        g.error = Some("the address has no files".into());
        return;
    };
    if let Err(e) = files.reopen_if_poisoned() {
        tracing::error!(address = %g.log.name, error = %e, "storage: could not cut back, reopen and verify the address's log");
        g.error = Some(format!(
            "the address's files are unusable, so nothing is written to them: {e}"
        ));
        g.log.rollback_staged();
        return;
    }
    let epoch = g.log.staging_epoch();
    let mark = files.mark();
    g.mark = Some(mark);
    for job in &g.jobs {
        if job.epoch != epoch {
            g.error = Some("an earlier write to this address failed; retry".into());
            break;
        }
        let r = match &job.work {
            Work::Messages(ms) => {
                let (Some(first), Some(last)) = (ms.first(), ms.last()) else {
                    continue;
                };
                buf.clear();
                let mut offsets = Vec::with_capacity(ms.len());
                for (m, id) in ms {
                    offsets.push(buf.len() as u64);
                    record::encode_message(buf, m, id.as_deref());
                }
                let r =
                    files.append_messages(buf, first.0.sequence, last.0.sequence, segment_bytes);
                r.map(|(segment, start)| {
                    g.last_seq = Some(last.0.sequence);
                    g.locs.extend(offsets.iter().map(|o| Loc {
                        segment,
                        offset: start + o,
                    }));
                })
            }
            Work::Journal(bytes) => files.append_journal(bytes),
            Work::Marker => Ok(()),
        };
        if let Err(e) = r {
            tracing::error!(address = %g.log.name, error = %e, "storage: write failed; Sends to this address get UNAVAILABLE until writes succeed again");
            g.error = Some(format!("write failed: {e}"));
            break;
        }
    }
    if buf.capacity() > 8 << 20 {
        *buf = Vec::with_capacity(1 << 20);
    }
    if g.error.is_some() {
        files.rollback(mark);
        g.log.rollback_staged();
        g.last_seq = None;
        g.locs.clear();
    }
}
