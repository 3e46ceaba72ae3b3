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
    files::{RecordReader, Segment, JOURNAL_FILE, NAME_FILE, SEGMENT_EXT},
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
        let mut reader = RecordReader::open(path).map_err(io_err)?;
        let mut expected = if i == 0 { *first } else { r.next_seq };
        if *first != expected {
            return Err(format!(
                "address {:?}: segment {} starts at sequence {first}, {expected} expected",
                r.name,
                path.display()
            ));
        }
        let len = loop {
            let pos = reader.offset();
            let parsed = match reader.next_record().map_err(io_err)? {
                Ok(None) => break pos,
                Ok(Some((body, _))) => record::decode_message_index(body).and_then(|m| {
                    if m.sequence == expected {
                        Ok(m)
                    } else {
                        Err(record::Bad::Malformed)
                    }
                }),
                Err(bad) => Err(bad),
            };
            match parsed {
                Ok(m) => {
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
                }
                Err(bad) => {
                    // A bad record: whether anything valid follows decides torn tail or
                    // corruption, so the rest of the file is read (only on this path).
                    let rest = reader.rest(pos).map_err(io_err)?;
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
                    break pos;
                }
            }
        };
        r.next_seq = expected;
        r.segments.push(Segment {
            first: *first,
            last: expected - 1,
            path: path.clone(),
            len,
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
