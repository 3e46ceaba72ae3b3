//! The files of one address: its segments (the message log) and its group journal.
//!
//! ```text
//! <data-dir>/addresses/<sha256(address) hex>/
//!     address                         the address's name (UTF-8)
//!     00000000000000000001.seg        messages from sequence 1, append-only
//!     00000000000000052311.seg        the next segment, opened when the last passed
//!                                     --segment-bytes (the previous one fsynced first)
//!     groups.journal                  GroupEvent records, compacted at every start
//! ```
//!
//! Only the flusher thread writes (appends, fsyncs, truncates after a failed write); retention
//! and deletion remove whole segments. A closed segment (every one but the last) has been
//! fsynced, so only the last segment and the journal can have a torn tail after a crash.

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

use super::record::{decode_message, read_frame, Bad, StoredMessage, FRAME_BYTES, MAX_BODY_BYTES};

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
    segments: usize,
    active_len: u64,
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
    /// Set when an fsync failed: before the next write, the files are reopened and verified.
    poisoned: AtomicBool,
    /// Where [`AddressFiles::remove`] moved the files, until [`AddressFiles::purge`].
    trashed: Mutex<Option<PathBuf>>,
    /// The segment last read back (messages out of the cache), kept open for the next read.
    reader: Mutex<Option<(u64, Arc<File>)>>,
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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
    /// to) and a journal of `journal_len` bytes.
    pub fn recovered(dir: PathBuf, name: &str, segments: Vec<Segment>, journal_len: u64) -> Self {
        let bytes = segments.iter().map(|s| s.len).sum::<u64>() + journal_len;
        let f = Self::new(dir, name);
        f.bytes.store(bytes, Ordering::Relaxed);
        {
            let mut w = f.writer.lock();
            w.segments = segments.into();
            w.journal_len = journal_len;
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
            segments: w.segments.len(),
            active_len: w.segments.back().map_or(0, |s| s.len),
            journal_len: w.journal_len,
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
            if let Some(old) = w.active.take() {
                // A closed segment is always durable: only the last can have a torn tail.
                old.sync_data()?;
            }
            let path = self.dir.join(segment_name(first));
            let file = open_append(&path, true)?;
            sync_dir(&self.dir)?;
            w.segments.push_back(Segment {
                first,
                last: first - 1,
                path,
                len: 0,
            });
            w.active = Some(file);
            self.update_oldest(&w);
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
                w.dirty_segment = false;
                w.dirty_journal = false;
                Ok(())
            }
            Err(e) => {
                self.poisoned.store(true, Ordering::Release);
                Err(e)
            }
        }
    }

    /// Cuts the files back to `mark` after a failed write or fsync: segments started since are
    /// removed, the last segment and the journal truncated.
    pub fn rollback(&self, mark: Mark) {
        // A segment may go (or come back under the same name): no stale reader.
        *self.reader.lock() = None;
        let mut w = self.writer.lock();
        if w.removed {
            return;
        }
        let mut cut = 0u64;
        while w.segments.len() > mark.segments.max(1) {
            if let Some(s) = w.segments.pop_back() {
                cut += s.len;
                let _ = fs::remove_file(&s.path);
                w.active = None;
            }
        }
        if mark.segments == 0 {
            if let Some(s) = w.segments.pop_back() {
                cut += s.len;
                let _ = fs::remove_file(&s.path);
                w.active = None;
            }
        }
        if let Some(s) = w.segments.back_mut() {
            if s.len > mark.active_len {
                cut += s.len - mark.active_len;
                s.len = mark.active_len;
                if let Err(e) = OpenOptions::new()
                    .write(true)
                    .open(&s.path)
                    .and_then(|f| f.set_len(mark.active_len))
                {
                    tracing::error!(path = %s.path.display(), error = %e, "storage: could not cut a failed write back");
                    self.poisoned.store(true, Ordering::Release);
                }
                w.active = None;
            }
        }
        if w.journal_len > mark.journal_len {
            cut += w.journal_len - mark.journal_len;
            w.journal_len = mark.journal_len;
            if let Err(e) = OpenOptions::new()
                .write(true)
                .open(self.dir.join(JOURNAL_FILE))
                .and_then(|f| f.set_len(mark.journal_len))
            {
                tracing::error!(error = %e, "storage: could not cut a failed journal write back");
                self.poisoned.store(true, Ordering::Release);
            }
            w.journal = None;
        }
        self.bytes
            .fetch_sub(cut.min(self.bytes()), Ordering::Relaxed);
        self.update_oldest(&w);
    }

    /// After a failed fsync, reopens the files and checks that what is on disk is exactly the
    /// records it is known to hold (the lengths the writer kept): a file longer than that is cut
    /// back, a shorter one fails the check. Until this succeeds no write is made.
    ///
    /// # Errors
    /// Why the files could not be verified.
    pub fn reopen_if_poisoned(&self) -> io::Result<()> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut w = self.writer.lock();
        w.active = None;
        w.journal = None;
        let check = |path: &Path, len: u64| -> io::Result<()> {
            if !path.exists() && len == 0 {
                return Ok(());
            }
            let f = OpenOptions::new().write(true).open(path)?;
            let on_disk = f.metadata()?.len();
            if on_disk < len {
                return Err(io::Error::other(format!(
                    "{} holds {on_disk} bytes, {len} expected",
                    path.display()
                )));
            }
            f.set_len(len)?;
            f.sync_all()?;
            let buf = fs::read(path)?;
            let mut pos = 0;
            while pos < buf.len() {
                match super::record::read_frame(&buf, pos) {
                    Ok((_, next)) => pos = next,
                    Err(bad) => {
                        return Err(io::Error::other(format!(
                            "{}: {} at byte {pos}",
                            path.display(),
                            bad.describe()
                        )))
                    }
                }
            }
            Ok(())
        };
        if let Some(s) = w.segments.back() {
            check(&s.path, s.len)?;
        }
        check(&self.dir.join(JOURNAL_FILE), w.journal_len)?;
        w.dirty_segment = false;
        w.dirty_journal = false;
        self.poisoned.store(false, Ordering::Release);
        tracing::warn!(dir = %self.dir.display(), "storage: files reopened and verified after a failed fsync");
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
