//! Start-up: every segment and journal of every address is read and checked.
//!
//! - A bad record at the end of an address's last segment (or of its journal) with nothing
//!   valid after it is a write cut short by a crash: the file is truncated at the last valid
//!   record and the bytes cut are logged.
//! - A bad record with valid records after it, or in a closed segment (closed segments were
//!   fsynced before the next one began), is corruption: start-up stops with the address, the
//!   sequence, the file and the byte offset, unless `--repair` is given; `--repair` keeps what
//!   precedes the bad record and removes the rest of the address's log.

use std::{
    fs::{self, OpenOptions},
    path::{Path, PathBuf},
    time::SystemTime,
};

use tokio::time::Instant;

use crate::engine::memory::{ColdIndex, ColdMessage, Loc};

use super::{
    files::{Segment, JOURNAL_FILE, NAME_FILE, SEGMENT_EXT},
    record::{self, GroupEvent},
};

/// One address as found on disk.
#[derive(Debug)]
pub struct Recovered {
    /// The address.
    pub name: String,
    /// Its directory.
    pub dir: PathBuf,
    /// Its messages as the sparse index's runs (no entry per message, so start-up memory does
    /// not grow with the number of messages on disk).
    pub(crate) runs: ColdIndex,
    /// Messages read.
    pub messages: u64,
    /// The dedup ids of messages sent with one: (id, sequence, sent_at), in sequence order.
    pub ids: Vec<(String, u64, SystemTime)>,
    /// The sequence the next message gets.
    pub next_seq: u64,
    /// Its segments, oldest first.
    pub segments: Vec<Segment>,
    /// Its journal's events, in order.
    pub events: Vec<GroupEvent>,
    /// Bytes of valid journal.
    pub journal_len: u64,
    /// Bytes cut from torn tails.
    pub cut: u64,
}

fn cut_to(path: &Path, len: u64) -> Result<(), String> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| {
            f.set_len(len)?;
            f.sync_all()
        })
        .map_err(|e| format!("{}: cannot truncate: {e}", path.display()))
}

/// A segment file read in chunks (64 KiB, or one whole record when larger), so checking a
/// segment holds one chunk in memory, not the file.
struct Chunks {
    file: fs::File,
    len: u64,
    /// File offset of `buf[0]`.
    base: u64,
    buf: Vec<u8>,
    /// How far into `buf` has been checked.
    pos: usize,
    /// Where the checked records end, once a bad record stopped the scan.
    cut_at: Option<u64>,
}

impl Chunks {
    const CHUNK: usize = 64 * 1024;

    fn open(path: &Path) -> std::io::Result<Self> {
        let file = fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            len,
            base: 0,
            buf: Vec::new(),
            pos: 0,
            cut_at: None,
        })
    }

    /// The file offset of the next record.
    fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    fn at_end(&self) -> bool {
        self.offset() >= self.len
    }

    /// Reads on so the record at `pos` can be whole; false when the file has no more bytes.
    fn more(&mut self) -> std::io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let loaded = self.base + self.buf.len() as u64;
        if loaded >= self.len {
            return Ok(false);
        }
        self.buf.drain(..self.pos);
        self.base += self.pos as u64;
        self.pos = 0;
        let want = match self.buf.get(..record::FRAME_BYTES) {
            Some(h) => {
                let body = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
                (record::FRAME_BYTES + body.min(record::MAX_BODY_BYTES)).max(Self::CHUNK)
            }
            None => Self::CHUNK,
        };
        let left =
            usize::try_from(self.len - (self.base + self.buf.len() as u64)).unwrap_or(usize::MAX);
        let have = self.buf.len();
        let grow = want.saturating_sub(have).max(1).min(left);
        self.buf.resize(have + grow, 0);
        self.file
            .read_exact_at(&mut self.buf[have..], self.base + have as u64)?;
        Ok(true)
    }

    /// Everything from the next record to the end of the file.
    fn rest(&mut self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let at = self.offset();
        self.cut_at = Some(at);
        let n = usize::try_from(self.len - at).unwrap_or(usize::MAX);
        let mut rest = vec![0u8; n];
        self.file.read_exact_at(&mut rest, at)?;
        Ok(rest)
    }

    /// Bytes of valid records: up to the bad record, or the whole file.
    fn valid_len(&self) -> u64 {
        self.cut_at.unwrap_or_else(|| self.offset().min(self.len))
    }
}

/// Reads and checks one address's directory. `Ok(None)`: the directory holds no address (a crash
/// while it was being created); the caller removes it.
///
/// # Errors
/// Corruption in the middle of a log (without `repair`), or an I/O error, as a message naming the
/// address, the sequence, the file and the offset.
pub fn recover_address(dir: &Path, repair: bool) -> Result<Option<Recovered>, String> {
    let name = match fs::read_to_string(dir.join(NAME_FILE)) {
        Ok(n) if !n.is_empty() => n,
        _ => return Ok(None),
    };
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) != Some(SEGMENT_EXT) {
            continue;
        }
        let first = p
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| format!("{}: not a segment file name", p.display()))?;
        files.push((first, p));
    }
    files.sort();
    let mut r = Recovered {
        name,
        dir: dir.to_path_buf(),
        runs: ColdIndex::default(),
        messages: 0,
        ids: Vec::new(),
        next_seq: files.first().map_or(1, |f| f.0.max(1)),
        segments: Vec::new(),
        events: Vec::new(),
        journal_len: 0,
        cut: 0,
    };
    let count = files.len();
    // Append times are rebuilt from `sent_at` against one reading of both clocks.
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut stop_after = None;
    for (i, (first, path)) in files.iter().enumerate() {
        if stop_after.is_some() {
            // --repair: what follows a corrupt record goes.
            let _ = fs::remove_file(path);
            continue;
        }
        let last_segment = i + 1 == count;
        let io_err = |e: std::io::Error| format!("{}: {e}", path.display());
        let mut reader = Chunks::open(path).map_err(io_err)?;
        let mut expected = if i == 0 { *first } else { r.next_seq };
        if *first != expected {
            return Err(format!(
                "address {:?}: segment {} starts at sequence {first}, {expected} expected",
                r.name,
                path.display()
            ));
        }
        loop {
            if reader.at_end() {
                break;
            }
            let parsed = record::read_frame(&reader.buf, reader.pos).and_then(|(body, next)| {
                let m = record::decode_message_index(body)?;
                if m.sequence == expected {
                    Ok((m, next))
                } else {
                    Err(record::Bad::Malformed)
                }
            });
            let pos = reader.offset();
            match parsed {
                Ok((m, next)) => {
                    let age = wall.duration_since(m.sent_at).unwrap_or_default();
                    r.runs.push(ColdMessage {
                        sequence: m.sequence,
                        size: m.size,
                        appended: now.checked_sub(age).unwrap_or(now),
                        sent_at: m.sent_at,
                        loc: Loc {
                            segment: *first,
                            offset: pos,
                        },
                    });
                    r.messages += 1;
                    if let Some(id) = m.message_id {
                        r.ids.push((id, m.sequence, m.sent_at));
                    }
                    expected += 1;
                    reader.pos = next;
                }
                Err(record::Bad::Short) if reader.more().map_err(io_err)? => {}
                Err(bad) => {
                    // A bad record: whether anything valid follows decides torn tail or
                    // corruption, so the rest of the file is read (only on this path).
                    let rest = reader.rest().map_err(io_err)?;
                    let tail =
                        last_segment && !record::good_message_after(&rest, 0, expected..u64::MAX);
                    if tail {
                        let cut = rest.len() as u64;
                        tracing::warn!(address = %r.name, file = %path.display(), bytes = cut, reason = bad.describe(), "storage: torn tail truncated at the last valid record");
                        r.cut += cut;
                    } else if repair {
                        tracing::error!(address = %r.name, sequence = expected, file = %path.display(), offset = pos, reason = bad.describe(), "storage: --repair: corrupt record; keeping what precedes it and removing the rest of this address's log");
                        stop_after = Some(i);
                    } else {
                        return Err(format!(
                            "address {:?}: corrupt record at sequence {expected} in {} (byte {pos}: {}); start with --repair to keep the messages before it and remove the rest",
                            r.name,
                            path.display(),
                            bad.describe()
                        ));
                    }
                    cut_to(path, pos)?;
                    break;
                }
            }
        }
        r.next_seq = expected;
        r.segments.push(Segment {
            first: *first,
            last: expected - 1,
            path: path.clone(),
            len: reader.valid_len(),
        });
    }
    let journal = dir.join(JOURNAL_FILE);
    if let Ok(buf) = fs::read(&journal) {
        let mut pos = 0;
        while pos < buf.len() {
            match record::read_frame(&buf, pos)
                .and_then(|(body, next)| Ok((GroupEvent::decode(body)?, next)))
            {
                Ok((e, next)) => {
                    r.events.push(e);
                    pos = next;
                }
                Err(bad) => {
                    if record::good_event_after(&buf, pos) && !repair {
                        return Err(format!(
                            "address {:?}: corrupt group journal record in {} (byte {pos}: {}); start with --repair to keep the records before it",
                            r.name,
                            journal.display(),
                            bad.describe()
                        ));
                    }
                    let cut = (buf.len() - pos) as u64;
                    tracing::warn!(address = %r.name, file = %journal.display(), bytes = cut, reason = bad.describe(), "storage: group journal truncated at the last valid record");
                    r.cut += cut;
                    cut_to(&journal, pos as u64)?;
                    break;
                }
            }
        }
        r.journal_len = pos as u64;
    }
    Ok(Some(r))
}
