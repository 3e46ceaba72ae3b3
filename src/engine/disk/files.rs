//! The files of one address: its segments (the message log) and its group journal.
//!
//! ```text
//! <data-dir>/addresses/<sha256(address) hex>/
//!     address                         the address's name (UTF-8)
//!     00000000000000000001.seg        messages from sequence 1, append-only
//!     00000000000000052311.seg        the next segment, opened when the last passed
//!                                     --segment-bytes (the previous one fsynced first)
//!     groups.journal                  GroupEvent records, compacted at every start
//!     high-water                      the last sequence known durable (see `hwm.rs`)
//! ```
//!
//! Only the flusher thread writes (appends, fsyncs, truncates after a failed write); retention
//! and deletion remove whole segments. A closed segment (every one but the last) has been
//! fsynced, so only the last segment and the journal can have a torn tail after a crash.
//!
//! A failed write (a full disk writes part of a record, then fails) or fsync is cut back with
//! [`AddressFiles::rollback`]: the last segment and the journal are truncated to their lengths
//! at the [`Mark`] taken before the round, whatever was or was not counted since, and the
//! truncation is fsynced. If that fails, the files are *unusable*: every later write is refused,
//! with the reason, until [`AddressFiles::reopen_if_poisoned`] has cut them back and verified
//! them, so nothing is ever appended after bytes the index does not know about.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use parking_lot::Mutex;

use super::{
    hwm::{self, HighWater, HWM_FILE, HWM_FILE_BYTES},
    record::{decode_message, read_frame, Bad, StoredMessage, FRAME_BYTES, MAX_BODY_BYTES},
};

/// The name of the file that holds the address's name.
pub const NAME_FILE: &str = "address";
/// The name of the group journal.
pub const JOURNAL_FILE: &str = "groups.journal";
/// The extension of segment files.
pub const SEGMENT_EXT: &str = "seg";

/// One segment file.
#[derive(Debug)]
pub struct Segment {
    /// Its first sequence (its file name).
    pub first: u64,
    /// Its last sequence; `first - 1` while empty.
    pub last: u64,
    /// Its path.
    pub path: PathBuf,
    /// Its length in bytes.
    pub len: u64,
}

/// The segment file name for a segment starting at `first`.
pub fn segment_name(first: u64) -> String {
    format!("{first:020}.{SEGMENT_EXT}")
}

/// Where the files were before a flush round, to cut back to if it fails.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    /// The last segment then, by its first sequence (retention may drop older segments
    /// meanwhile, so not by position); `None`: there was none.
    active: Option<u64>,
    active_len: u64,
    active_last: u64,
    journal_len: u64,
}

#[derive(Debug, Default)]
struct Writer {
    segments: VecDeque<Segment>,
    active: Option<File>,
    journal: Option<File>,
    journal_len: u64,
    dir_made: bool,
    removed: bool,
    dirty_segment: bool,
    dirty_journal: bool,
    /// The high-water mark file, once opened.
    hwm: Option<File>,
    /// The last sequence the mark holds (or was recovered with).
    hwm_last: u64,
    /// The slot the next mark is written to.
    hwm_slot: u64,
    /// A segment was started since the last sync: that sync fsyncs the mark too.
    rolled: bool,
    /// Why the files must be cut back and verified before the next write (a failed fsync, or a
    /// failed write that could not be cut back), while `poisoned` is set.
    broken: Option<String>,
    /// Segment files a rollback could not remove: removed before the next write.
    leftovers: Vec<PathBuf>,
}

/// See the module docs.
#[derive(Debug)]
pub struct AddressFiles {
    dir: PathBuf,
    name: String,
    writer: Mutex<Writer>,
    /// Bytes on disk (segments and journal).
    bytes: AtomicU64,
    /// Last sequence of the oldest closed segment, `u64::MAX` when there is none: retention
    /// checks it without the writer lock.
    oldest_end: AtomicU64,
    /// Set when an fsync failed or a failed write could not be cut back (the reason is in the
    /// writer): before the next write, the files are cut back, reopened and verified, and no
    /// write is made until that succeeds.
    poisoned: AtomicBool,
    /// Where [`AddressFiles::remove`] moved the files, until [`AddressFiles::purge`].
    trashed: Mutex<Option<PathBuf>>,
    /// The segment last read back (messages out of the cache), kept open for the next read.
    reader: Mutex<Option<(u64, Arc<File>)>>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Truncates `path` to `len` bytes and fsyncs it; the error names the file and the length.
pub(super) fn cut_back(path: &Path, len: u64) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(len)?;
            f.sync_all()
        })
        .map_err(|e| {
            format!(
                "{} could not be cut back to byte {len}: {e}",
                path.display()
            )
        })
}

fn open_append(path: &Path, create_new: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.append(true);
    if create_new {
        o.create_new(true);
    } else {
        o.create(true);
    }
    o.open(path)
}

impl AddressFiles {
    /// The files of a new address (nothing is created until the first write).
    pub fn new(dir: PathBuf, name: &str) -> Self {
        Self {
            dir,
            name: name.to_string(),
            writer: Mutex::new(Writer::default()),
            bytes: AtomicU64::new(0),
            oldest_end: AtomicU64::new(u64::MAX),
            poisoned: AtomicBool::new(false),
            trashed: Mutex::new(None),
            reader: Mutex::new(None),
        }
    }

    /// The files of an address found at start: `segments` in order (the last one is appended
    /// to), a journal of `journal_len` bytes, and the high-water mark's sequence.
    pub fn recovered(
        dir: PathBuf,
        name: &str,
        segments: Vec<Segment>,
        journal_len: u64,
        high_water: u64,
    ) -> Self {
        let bytes = segments.iter().map(|s| s.len).sum::<u64>() + journal_len;
        let f = Self::new(dir, name);
        f.bytes.store(bytes, Ordering::Relaxed);
        {
            let mut w = f.writer.lock();
            w.segments = segments.into();
            w.journal_len = journal_len;
            w.hwm_last = high_water;
            w.dir_made = true;
        }
        f.update_oldest(&f.writer.lock());
        f
    }

    /// The address's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn update_oldest(&self, w: &Writer) {
        let end = if w.segments.len() > 1 {
            w.segments.front().map_or(u64::MAX, |s| s.last)
        } else {
            u64::MAX
        };
        self.oldest_end.store(end, Ordering::Release);
    }

    fn make_dir(&self, w: &mut Writer) -> io::Result<()> {
        if w.removed {
            return Err(io::Error::other("the address was deleted"));
        }
        if w.dir_made {
            return Ok(());
        }
        fs::create_dir_all(&self.dir)?;
        let mut f = File::create(self.dir.join(NAME_FILE))?;
        f.write_all(self.name.as_bytes())?;
        f.sync_all()?;
        // Allocated now, so updating the mark later needs no space.
        let mut h = File::create(self.dir.join(HWM_FILE))?;
        h.write_all(&[0u8; HWM_FILE_BYTES])?;
        h.sync_all()?;
        w.hwm = Some(h);
        sync_dir(&self.dir)?;
        if let Some(parent) = self.dir.parent() {
            sync_dir(parent)?;
        }
        w.dir_made = true;
        Ok(())
    }

    /// Bytes of the group journal.
    pub fn journal_len(&self) -> u64 {
        self.writer.lock().journal_len
    }

    /// Replaces the group journal with `records` (compaction): written to a temporary file,
    /// fsynced, renamed over the journal, directory fsynced. A crash at any point leaves either
    /// the old journal or the new one.
    ///
    /// # Errors
    /// The I/O error; the old journal stays in use.
    pub fn replace_journal(&self, records: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock();
        self.make_dir(&mut w)?;
        super::replace_journal(&self.dir, records)?;
        let old = w.journal_len;
        w.journal = None;
        w.journal_len = records.len() as u64;
        w.dirty_journal = false;
        self.bytes
            .fetch_sub(old.min(self.bytes()), Ordering::Relaxed);
        self.bytes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Where the files are now.
    pub fn mark(&self) -> Mark {
        let w = self.writer.lock();
        Mark {
            active: w.segments.back().map(|s| s.first),
            active_len: w.segments.back().map_or(0, |s| s.len),
            active_last: w.segments.back().map_or(0, |s| s.last),
            journal_len: w.journal_len,
        }
    }

    /// Records `last` (in the segment beginning at `segment`) as the high-water mark, fsynced
    /// when `durable`. Only called by [`Self::sync`] once everything written is fsynced, so the
    /// mark never names a record a rollback can take back. A failure is logged and the mark
    /// stays lower (still a true lower bound); the next sync tries again.
    fn set_high_water(&self, w: &mut Writer, last: u64, segment: u64, durable: bool) {
        use std::os::unix::fs::FileExt;
        if last <= w.hwm_last {
            return;
        }
        let path = self.dir.join(HWM_FILE);
        let r = (|| {
            if w.hwm.is_none() {
                // A directory written before marks existed: the file is made once.
                let existed = path.exists();
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)?;
                if f.metadata()?.len() < HWM_FILE_BYTES as u64 {
                    f.set_len(0)?;
                    f.write_all_at(&[0u8; HWM_FILE_BYTES], 0)?;
                }
                if !existed {
                    f.sync_all()?;
                    sync_dir(&self.dir)?;
                }
                w.hwm = Some(f);
            }
            let Some(f) = w.hwm.as_ref() else {
                return Err(io::Error::other("not open"));
            };
            hwm::write(f, w.hwm_slot, HighWater { last, segment })?;
            if durable {
                f.sync_data()?;
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                w.hwm_last = last;
                w.hwm_slot += 1;
            }
            Err(e) => {
                w.hwm = None;
                tracing::error!(path = %path.display(), sequence = last, error = %e, "storage: could not update the high-water mark; it stays lower until the next fsync updates it");
            }
        }
    }

    /// Appends encoded message records for sequences `first..=last`, starting a new segment
    /// first when the last one holds `segment_bytes` or more.
    ///
    /// # Errors
    /// The I/O error; the caller cuts back to its [`Mark`].
    pub fn append_messages(
        &self,
        records: &[u8],
        first: u64,
        last: u64,
        segment_bytes: u64,
    ) -> io::Result<(u64, u64)> {
        let mut w = self.writer.lock();
        self.make_dir(&mut w)?;
        let roll = match w.segments.back() {
            None => true,
            Some(s) => s.len >= segment_bytes && s.len > 0,
        };
        if roll {
            // A closed segment is always durable: only the last can have a torn tail.
            if let Some(old) = w.active.take() {
                old.sync_data()?;
            } else if let Some(s) = w.segments.back().filter(|s| s.len > 0) {
                // Not written since start: what recovery found may not be fsynced yet.
                File::open(&s.path)?.sync_data()?;
            }
            // The next sync fsyncs the mark too, so it covers every closed segment. Not here: a
            // later job of this round may fail and cut back what this one wrote.
            w.rolled = true;
            let path = self.dir.join(segment_name(first));
            let file = open_append(&path, true)?;
            // In the list before anything else can fail, so a rollback removes it.
            w.segments.push_back(Segment {
                first,
                last: first - 1,
                path,
                len: 0,
            });
            w.active = Some(file);
            self.update_oldest(&w);
            sync_dir(&self.dir)?;
        }
        if w.active.is_none() {
            let path = w
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            w.active = Some(open_append(&path, false)?);
        }
        let Writer {
            active, segments, ..
        } = &mut *w;
        let (Some(file), Some(seg)) = (active.as_mut(), segments.back_mut()) else {
            return Err(io::Error::other("no segment to write to"));
        };
        let at = (seg.first, seg.len);
        file.write_all(records)?;
        seg.len += records.len() as u64;
        seg.last = last;
        w.dirty_segment = true;
        self.bytes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(at)
    }

    /// Reads back the message whose record starts at `offset` in the segment beginning at
    /// `segment` (a message that left the cache). Needs no lock: records are never rewritten,
    /// and a segment is removed only once its messages are no longer retained.
    ///
    /// # Errors
    /// The I/O error, or a record that fails its CRC or does not parse.
    pub fn read_message(&self, segment: u64, offset: u64) -> io::Result<StoredMessage> {
        use std::os::unix::fs::FileExt;
        let f = self.reader(segment)?;
        let mut head = [0u8; FRAME_BYTES];
        f.read_exact_at(&mut head, offset)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len > MAX_BODY_BYTES {
            return Err(io::Error::other("record length out of range"));
        }
        let mut frame = vec![0u8; FRAME_BYTES + len];
        f.read_exact_at(&mut frame, offset)?;
        let bad = |b: Bad| io::Error::other(b.describe());
        let (body, _) = read_frame(&frame, 0).map_err(bad)?;
        decode_message(body).map_err(bad)
    }

    /// The segment beginning at `segment`, opened for reading (the last one read is kept open).
    fn reader(&self, segment: u64) -> io::Result<Arc<File>> {
        let mut reader = self.reader.lock();
        match &*reader {
            Some((s, f)) if *s == segment => Ok(Arc::clone(f)),
            _ => {
                let f = Arc::new(File::open(self.dir.join(segment_name(segment)))?);
                *reader = Some((segment, Arc::clone(&f)));
                Ok(f)
            }
        }
    }

    /// Reads the records of the segment beginning at `segment` in order from byte `offset`,
    /// calling `each(body, next record's offset)` with each verified record body until it
    /// returns false or the segment ends (decode the body with [`super::record`]); a record cut
    /// short by the end of the file ends the scan. Reads with a [`RecordReader`]. Needs no
    /// lock, as [`Self::read_message`].
    ///
    /// # Errors
    /// The I/O error, or a record that fails its CRC.
    pub fn scan_records(
        &self,
        segment: u64,
        offset: u64,
        mut each: impl FnMut(&[u8], u64) -> bool,
    ) -> io::Result<()> {
        let mut reader = RecordReader::new(self.reader(segment)?, offset)?;
        loop {
            match reader.next_record()? {
                Ok(Some((body, next))) => {
                    if !each(body, next) {
                        return Ok(());
                    }
                }
                Ok(None) | Err(Bad::Short) => return Ok(()),
                Err(b) => return Err(io::Error::other(b.describe())),
            }
        }
    }

    /// Appends encoded journal records.
    ///
    /// # Errors
    /// The I/O error; the caller cuts back to its [`Mark`].
    pub fn append_journal(&self, records: &[u8]) -> io::Result<()> {
        let mut w = self.writer.lock();
        self.make_dir(&mut w)?;
        if w.journal.is_none() {
            let path = self.dir.join(JOURNAL_FILE);
            let existed = path.exists();
            w.journal = Some(open_append(&path, false)?);
            if !existed {
                sync_dir(&self.dir)?;
            }
        }
        if let Some(j) = w.journal.as_mut() {
            j.write_all(records)?;
        }
        w.journal_len += records.len() as u64;
        w.dirty_journal = true;
        self.bytes
            .fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// fdatasyncs what was written since the last sync.
    ///
    /// # Errors
    /// The I/O error: the data may not be on disk, and the page cache may have dropped it, so
    /// the files are marked for reopening ([`AddressFiles::reopen_if_poisoned`]).
    pub fn sync(&self) -> io::Result<()> {
        let mut w = self.writer.lock();
        let r = (|| {
            if w.dirty_segment {
                if let Some(f) = &w.active {
                    f.sync_data()?;
                }
            }
            if w.dirty_journal {
                if let Some(f) = &w.journal {
                    f.sync_data()?;
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) => {
                // After a failed cut-back nothing may have been fsynced (the file is not open).
                let synced = w.dirty_segment && !self.poisoned.load(Ordering::Acquire);
                w.dirty_segment = false;
                w.dirty_journal = false;
                // The messages just fsynced raise the mark: one pwrite, and an fsync only when
                // a segment was started (about once per --segment-bytes).
                if let Some((last, segment)) = w
                    .segments
                    .back()
                    .filter(|_| synced)
                    .map(|s| (s.last, s.first))
                {
                    let durable = std::mem::take(&mut w.rolled);
                    self.set_high_water(&mut w, last, segment, durable);
                }
                Ok(())
            }
            Err(e) => {
                w.broken = Some(format!("an fsync in {} failed: {e}", self.dir.display()));
                self.poisoned.store(true, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Cuts the files back to `mark` after a failed write or fsync: segments started since are
    /// removed, and the last segment and the journal are truncated to their lengths at the
    /// mark and fsynced. Always, whatever the lengths counted since say: a write that failed
    /// half-way (a full disk) counted nothing but left bytes behind. If any of it fails, the
    /// files are unusable until [`Self::reopen_if_poisoned`] succeeds.
    pub fn rollback(&self, mark: Mark) {
        // A segment may go (or come back under the same name): no stale reader.
        *self.reader.lock() = None;
        let mut w = self.writer.lock();
        if w.removed {
            return;
        }
        let mut cut = 0u64;
        let mut failed = Vec::new();
        let mut removed = false;
        w.active = None;
        // Segments started since the mark go.
        while w
            .segments
            .back()
            .is_some_and(|s| mark.active.is_none_or(|f| s.first > f))
        {
            let Some(s) = w.segments.pop_back() else {
                break;
            };
            cut += s.len;
            match fs::remove_file(&s.path) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed.push(format!("{} could not be removed: {e}", s.path.display()));
                    w.leftovers.push(s.path);
                }
            }
        }
        if removed {
            if let Err(e) = sync_dir(&self.dir) {
                failed.push(format!("{}: fsync: {e}", self.dir.display()));
            }
        }
        // The segment that was last at the mark goes back to its length then.
        if let Some(s) = w
            .segments
            .back_mut()
            .filter(|s| Some(s.first) == mark.active)
        {
            cut += s.len.saturating_sub(mark.active_len);
            s.len = mark.active_len;
            s.last = mark.active_last;
            if let Err(e) = cut_back(&s.path, mark.active_len) {
                failed.push(e);
            }
        }
        cut += w.journal_len.saturating_sub(mark.journal_len);
        w.journal_len = mark.journal_len;
        w.journal = None;
        let journal = self.dir.join(JOURNAL_FILE);
        if mark.journal_len > 0 || journal.exists() {
            if let Err(e) = cut_back(&journal, mark.journal_len) {
                failed.push(e);
            }
        }
        self.bytes
            .fetch_sub(cut.min(self.bytes()), Ordering::Relaxed);
        self.update_oldest(&w);
        if !failed.is_empty() {
            let why = format!("a failed write could not be undone: {}", failed.join("; "));
            tracing::error!(dir = %self.dir.display(), error = %why, "storage: no write is made to this address until its files are cut back and verified");
            w.broken = Some(why);
            self.poisoned.store(true, Ordering::Release);
        }
    }

    /// Before a write, when the files are unusable (a failed fsync, or a failed write that
    /// could not be cut back): removes segments a rollback left, reopens the last segment and
    /// the journal, cuts each to the length the writer knows (fsynced) and checks that what is
    /// left is exactly whole records. A file shorter than that fails the check. Until this
    /// succeeds no write is made; the next write tries again.
    ///
    /// # Errors
    /// Why the files are unusable and why they still are, naming the file.
    pub fn reopen_if_poisoned(&self) -> io::Result<()> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut w = self.writer.lock();
        w.active = None;
        w.journal = None;
        let check = |path: &Path, len: u64| -> Result<(), String> {
            if !path.exists() && len == 0 {
                return Ok(());
            }
            let on_disk = fs::metadata(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
            if on_disk < len {
                return Err(format!(
                    "{} holds {on_disk} bytes, {len} expected",
                    path.display()
                ));
            }
            cut_back(path, len)?;
            let buf = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mut pos = 0;
            while pos < buf.len() {
                match super::record::read_frame(&buf, pos) {
                    Ok((_, next)) => pos = next,
                    Err(bad) => {
                        return Err(format!(
                            "{}: {} at byte {pos}",
                            path.display(),
                            bad.describe()
                        ))
                    }
                }
            }
            Ok(())
        };
        let r = (|| {
            while let Some(path) = w.leftovers.pop() {
                match fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        let msg = format!("{} could not be removed: {e}", path.display());
                        w.leftovers.push(path);
                        return Err(msg);
                    }
                }
                sync_dir(&self.dir).map_err(|e| format!("{}: fsync: {e}", self.dir.display()))?;
            }
            if let Some(s) = w.segments.back() {
                check(&s.path, s.len)?;
            }
            check(&self.dir.join(JOURNAL_FILE), w.journal_len)
        })();
        if let Err(still) = r {
            let why = w.broken.as_deref().unwrap_or("an earlier write failed");
            return Err(io::Error::other(format!("{why}; still unusable: {still}")));
        }
        w.dirty_segment = false;
        w.dirty_journal = false;
        w.broken = None;
        self.poisoned.store(false, Ordering::Release);
        tracing::warn!(dir = %self.dir.display(), "storage: files cut back, reopened and verified after a failed fsync (or a failed write that could not be cut back)");
        Ok(())
    }

    /// Removes closed segments whose messages are all below `first` (evicted by retention).
    pub fn drop_below(&self, first: u64) {
        if self.oldest_end.load(Ordering::Acquire) >= first {
            return;
        }
        *self.reader.lock() = None;
        let mut w = self.writer.lock();
        while w.segments.len() > 1 && w.segments.front().is_some_and(|s| s.last < first) {
            if let Some(s) = w.segments.pop_front() {
                match fs::remove_file(&s.path) {
                    Ok(()) => {
                        self.bytes
                            .fetch_sub(s.len.min(self.bytes()), Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(path = %s.path.display(), error = %e, "storage: could not remove an evicted segment");
                    }
                }
            }
        }
        self.update_oldest(&w);
    }

    /// Removes the address's files (DeleteAddress, idle reclaim): the directory is renamed
    /// into `trash` at once (so a new address of the same name starts clean), then deleted by
    /// [`AddressFiles::purge`] once the caller holds no lock.
    pub fn remove(&self, trash: &Path) {
        // A segment may go (or come back under the same name): no stale reader.
        *self.reader.lock() = None;
        let mut w = self.writer.lock();
        w.removed = true;
        w.active = None;
        w.journal = None;
        w.hwm = None;
        if !w.dir_made {
            return;
        }
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let to = trash.join(format!("{name}-{nanos}"));
        let moved = fs::rename(&self.dir, &to).and_then(|()| {
            if let Some(parent) = self.dir.parent() {
                sync_dir(parent)?;
            }
            Ok(())
        });
        match moved {
            Ok(()) => *self.trashed.lock() = Some(to),
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "storage: could not remove a deleted address's files");
            }
        }
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Deletes the files [`AddressFiles::remove`] moved to the trash (call it outside locks:
    /// a large address takes a while). What is left is removed at the next start.
    pub fn purge(&self) {
        if let Some(path) = self.trashed.lock().take() {
            if let Err(e) = fs::remove_dir_all(&path) {
                tracing::warn!(path = %path.display(), error = %e, "storage: could not remove a deleted address's files");
            }
        }
    }
}

/// What [`RecordReader::next_record`] found: a verified body and the offset after it, the end
/// of the file, or a bad record.
pub type NextRecord<'a> = Result<Option<(&'a [u8], u64)>, Bad>;

/// Reads a segment's records in order from an offset, in chunks of 64 KiB (or one whole record
/// when larger), so reading a segment holds one chunk in memory, not the file. Used by reads
/// of messages out of the cache and by start-up recovery.
#[derive(Debug)]
pub struct RecordReader {
    file: Arc<File>,
    /// The file's length when opened.
    len: u64,
    /// File offset of `buf[0]`.
    base: u64,
    buf: Vec<u8>,
    /// How far into `buf` has been read.
    pos: usize,
}

impl RecordReader {
    const CHUNK: usize = 64 * 1024;

    /// A reader of `file` from byte `offset`.
    ///
    /// # Errors
    /// The file's length cannot be read.
    pub fn new(file: Arc<File>, offset: u64) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            base: offset,
            buf: Vec::new(),
            pos: 0,
        })
    }

    /// Opens `path` and reads it from the start.
    ///
    /// # Errors
    /// The I/O error.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::new(Arc::new(File::open(path)?), 0)
    }

    /// The file offset of the next record.
    pub fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// The next record's verified body and the offset after it: `Ok(None)` at the end of the
    /// file, `Err(bad)` for a bad record ([`Bad::Short`]: cut short by the end of the file);
    /// the offset stays at a bad record.
    ///
    /// # Errors
    /// The I/O error.
    pub fn next_record(&mut self) -> io::Result<NextRecord<'_>> {
        loop {
            if self.offset() >= self.len {
                return Ok(Ok(None));
            }
            let frame =
                read_frame(&self.buf, self.pos).map(|(body, next)| (next - body.len(), next));
            match frame {
                Ok((start, next)) => {
                    self.pos = next;
                    let at = self.offset();
                    return Ok(Ok(self.buf.get(start..next).map(|body| (body, at))));
                }
                Err(Bad::Short) if self.more()? => {}
                Err(b) => return Ok(Err(b)),
            }
        }
    }

    /// Reads on so the record at `pos` can be whole; false when the file has no more bytes.
    fn more(&mut self) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let loaded = self.base + self.buf.len() as u64;
        if loaded >= self.len {
            return Ok(false);
        }
        self.buf.drain(..self.pos);
        self.base += self.pos as u64;
        self.pos = 0;
        let want = match self.buf.get(..FRAME_BYTES) {
            Some(h) => {
                let body = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                (FRAME_BYTES + body.min(MAX_BODY_BYTES)).max(Self::CHUNK)
            }
            None => Self::CHUNK,
        };
        let left = usize::try_from(self.len - loaded).unwrap_or(usize::MAX);
        let have = self.buf.len();
        let grow = want.saturating_sub(have).max(1).min(left);
        self.buf.resize(have + grow, 0);
        self.file
            .read_exact_at(&mut self.buf[have..], self.base + have as u64)?;
        Ok(true)
    }

    /// Everything from file offset `at` to the end of the file (recovery, to tell a torn tail
    /// from corruption).
    ///
    /// # Errors
    /// The I/O error.
    pub fn rest(&self, at: u64) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let n = usize::try_from(self.len.saturating_sub(at)).unwrap_or(usize::MAX);
        let mut rest = vec![0u8; n];
        self.file.read_exact_at(&mut rest, at)?;
        Ok(rest)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Write,
        sync::Arc,
        time::{Duration, UNIX_EPOCH},
    };

    use bytes::Bytes;

    use super::*;
    use crate::{engine::disk::record::encode_message, message::Message, validate::Headers};

    fn records(first: u64, last: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        for sequence in first..=last {
            let m = Message {
                address: Arc::from("a"),
                sequence,
                payload: Bytes::from(format!("m{sequence}")),
                headers: Headers::new(),
                sent_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                size: 0,
            };
            encode_message(&mut buf, &m, None);
        }
        buf
    }

    fn len(path: &Path) -> u64 {
        fs::metadata(path).unwrap().len()
    }

    /// Appends bytes the writer does not count: what a write that failed half-way leaves.
    fn leave_partial(path: &Path, n: usize) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(&vec![0xAB; n]).unwrap();
    }

    #[test]
    fn a_write_that_failed_half_way_is_cut_back_though_nothing_was_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let files = AddressFiles::new(tmp.path().join("a"), "a");
        files
            .append_messages(&records(1, 3), 1, 3, 1 << 20)
            .unwrap();
        files.append_journal(&[]).unwrap();
        files.sync().unwrap();
        let seg = tmp.path().join("a").join(segment_name(1));
        let journal = tmp.path().join("a").join(JOURNAL_FILE);
        let (seg_len, journal_len) = (len(&seg), len(&journal));
        let mark = files.mark();
        leave_partial(&seg, 43_965);
        leave_partial(&journal, 100);
        files.rollback(mark);
        assert_eq!(len(&seg), seg_len, "segment cut back to the mark");
        assert_eq!(len(&journal), journal_len, "journal cut back to the mark");
        // The next record lands where the index says it does.
        let (segment, at) = files
            .append_messages(&records(4, 4), 4, 4, 1 << 20)
            .unwrap();
        assert_eq!((segment, at), (1, seg_len));
        assert_eq!(files.read_message(1, at).unwrap().sequence, 4);
    }

    #[test]
    fn a_cut_back_that_fails_refuses_writes_until_it_succeeds() {
        let tmp = tempfile::tempdir().unwrap();
        let files = AddressFiles::new(tmp.path().join("a"), "a");
        files
            .append_messages(&records(1, 3), 1, 3, 1 << 20)
            .unwrap();
        files.sync().unwrap();
        let seg = tmp.path().join("a").join(segment_name(1));
        let good = len(&seg);
        let mark = files.mark();
        leave_partial(&seg, 500);
        // The segment cannot be opened for writing (a directory in its place): no cut back.
        let away = tmp.path().join("away");
        fs::rename(&seg, &away).unwrap();
        fs::create_dir(&seg).unwrap();
        files.rollback(mark);
        let e = files.reopen_if_poisoned().unwrap_err().to_string();
        assert!(
            e.contains("a failed write could not be undone")
                && e.contains(&format!(
                    "{} could not be cut back to byte {good}",
                    seg.display()
                )),
            "{e}"
        );
        // Still refused on the next try while it cannot be cut back.
        assert!(files.reopen_if_poisoned().is_err());
        // Once it can, the partial bytes go and writes resume at the right offset.
        fs::remove_dir(&seg).unwrap();
        fs::rename(&away, &seg).unwrap();
        files.reopen_if_poisoned().unwrap();
        assert_eq!(len(&seg), good);
        let (_, at) = files
            .append_messages(&records(4, 4), 4, 4, 1 << 20)
            .unwrap();
        assert_eq!(at, good);
    }

    #[test]
    fn a_segment_dropped_by_retention_meanwhile_does_not_move_the_mark() {
        let tmp = tempfile::tempdir().unwrap();
        let files = AddressFiles::new(tmp.path().join("a"), "a");
        // Segments 1 (1-3) and 4 (4); the round starts there, rolls to 5, and retention drops
        // segment 1 before the round fails.
        files.append_messages(&records(1, 3), 1, 3, 1).unwrap();
        files.append_messages(&records(4, 4), 4, 4, 1).unwrap();
        files.sync().unwrap();
        let four = tmp.path().join("a").join(segment_name(4));
        let four_len = len(&four);
        let mark = files.mark();
        files.append_messages(&records(5, 5), 5, 5, 1).unwrap();
        files.drop_below(4);
        files.rollback(mark);
        assert!(!tmp.path().join("a").join(segment_name(5)).exists());
        assert_eq!(len(&four), four_len);
        let (segment, at) = files.append_messages(&records(5, 5), 5, 5, 1).unwrap();
        assert_eq!(
            (segment, at),
            (5, 0),
            "segment 4 is full: 5 starts a new one"
        );
    }

    #[test]
    fn the_high_water_mark_follows_fsynced_messages_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a");
        let files = AddressFiles::new(dir.clone(), "a");
        let mark_now = || hwm::parse(&fs::read(dir.join(HWM_FILE)).unwrap());
        files.append_messages(&records(1, 3), 1, 3, 1).unwrap();
        assert_eq!(mark_now(), None, "written, not fsynced");
        files.sync().unwrap();
        assert_eq!(
            mark_now(),
            Some(HighWater {
                last: 3,
                segment: 1
            })
        );
        // A round that fails is cut back and never reaches the mark.
        let mark = files.mark();
        files.append_messages(&records(4, 5), 4, 5, 1).unwrap();
        files.rollback(mark);
        files.sync().unwrap();
        assert_eq!(mark_now().map(|h| h.last), Some(3));
        files.append_messages(&records(4, 4), 4, 4, 1).unwrap();
        files.sync().unwrap();
        assert_eq!(
            mark_now(),
            Some(HighWater {
                last: 4,
                segment: 4
            })
        );
    }
}
