//! Start-up: every segment and journal of every address is read and checked.
//!
//! - A record cut short at the end of an address's last segment (or of its journal) — its
//!   declared length runs past the end of the file, or only zero bytes are left — with nothing
//!   valid after it is a write cut short by a crash: the file is truncated at the last valid
//!   record and the bytes cut are logged.
//! - Any other bad record is corruption: a whole record failing its CRC or not parsing (even
//!   the very last one: it was written in full, so it may have been acknowledged), a bad record
//!   with valid records after it, or one in a closed segment (closed segments were fsynced
//!   before the next one began). Start-up stops with the address, the sequence, the file and
//!   the byte offset, unless `--repair` is given; `--repair` keeps what precedes the bad record
//!   and removes the rest of the address's log (the rest of its journal).
//! - The log must reach the address's high-water mark (`hwm.rs`: the last sequence known
//!   fsynced). If it does not (a deleted or truncated last segment, or what `--repair` just
//!   removed), acknowledged messages are gone: start-up stops naming the segment and the
//!   sequences, unless `--repair` is given. Then, since an address's retained sequences are
//!   contiguous and none may be given out twice, its remaining segments are moved to
//!   `set-aside-<next>/` in its directory (kept, not served; consumer groups count them as
//!   dropped) and the log continues at the mark + 1, in an empty segment of that name.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    time::SystemTime,
};

use tokio::time::Instant;

use crate::engine::memory::{ColdIndex, ColdMessage, Loc};

use super::{
    files::{segment_name, RecordReader, Segment, JOURNAL_FILE, NAME_FILE, SEGMENT_EXT},
    hwm::{self, HighWater, HWM_FILE},
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
    /// The high-water mark's sequence (0: none recorded).
    pub high_water: u64,
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("{}: fsync: {e}", dir.display()))
}

/// `--repair` when the log ends before the high-water mark: moves `r`'s segments into a new
/// `set-aside-<next>` directory and continues the log at `next` in an empty segment (whose
/// name carries `next` across restarts). Returns the directory.
fn set_aside(r: &mut Recovered, next: u64) -> Result<PathBuf, String> {
    let mut aside = r.dir.join(format!("set-aside-{next}"));
    let mut k = 1;
    while aside.exists() {
        aside = r.dir.join(format!("set-aside-{next}-{k}"));
        k += 1;
    }
    fs::create_dir(&aside).map_err(|e| format!("{}: cannot create: {e}", aside.display()))?;
    for s in r.segments.drain(..) {
        let to = aside.join(segment_name(s.first));
        fs::rename(&s.path, &to)
            .map_err(|e| format!("cannot move {} to {}: {e}", s.path.display(), to.display()))?;
    }
    sync_dir(&aside)?;
    let path = r.dir.join(segment_name(next));
    File::create(&path)
        .and_then(|f| f.sync_all())
        .map_err(|e| format!("{}: cannot create: {e}", path.display()))?;
    sync_dir(&r.dir)?;
    r.segments.push(Segment {
        first: next,
        last: next - 1,
        path,
        len: 0,
    });
    r.runs = ColdIndex::default();
    r.messages = 0;
    r.ids.clear();
    r.next_seq = next;
    Ok(aside)
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
    let hwm_path = dir.join(HWM_FILE);
    let high = match fs::read(&hwm_path) {
        Ok(bytes) => hwm::parse(&bytes).unwrap_or_else(|| {
            if bytes.iter().any(|&b| b != 0) {
                tracing::warn!(file = %hwm_path.display(), "storage: the high-water mark holds no valid slot; the log's end is not checked against it");
            }
            HighWater::default()
        }),
        // A directory written before marks existed, or an address that never wrote a message.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HighWater::default(),
        Err(e) => return Err(format!("{}: {e}", hwm_path.display())),
    };
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
        high_water: high.last,
    };
    let count = files.len();
    // Append times are rebuilt from `sent_at` against one reading of both clocks.
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut stop_after = None;
    // The last segment's torn tail: (file, where it starts, bytes, why).
    let mut torn = None;
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
                    // A bad record: what it is and whether anything valid follows decide torn
                    // tail or corruption, so the rest of the file is read (only on this path).
                    let rest = reader.rest(pos).map_err(io_err)?;
                    let tail = last_segment
                        && record::torn_tail(&rest, bad)
                        && !record::good_message_after(&rest, 0, expected..u64::MAX);
                    if tail {
                        // Cut once the log is known to reach the high-water mark.
                        torn = Some((path.clone(), pos, rest.len() as u64, bad));
                        break pos;
                    } else if repair {
                        tracing::error!(address = %r.name, sequence = expected, file = %path.display(), offset = pos, reason = bad.describe(), "storage: --repair: corrupt record; keeping what precedes it and removing the rest of this address's log");
                        stop_after = Some(i);
                    } else {
                        let repair_does = if high.last >= expected {
                            format!(
                                "sequences up to {} were written (high-water mark in {}), so start with --repair to continue from sequence {} and set this address's remaining messages aside in its directory",
                                high.last,
                                hwm_path.display(),
                                high.last.saturating_add(1)
                            )
                        } else {
                            "start with --repair to keep the messages before it and remove the rest"
                                .to_string()
                        };
                        return Err(format!(
                            "address {:?}: corrupt record at sequence {expected} in {} (byte {pos}: {}); {repair_does}",
                            r.name,
                            path.display(),
                            bad.describe()
                        ));
                    }
                    super::files::cut_back(path, pos)?;
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
    let last = r.next_seq - 1;
    if high.last > last {
        let segment = dir.join(segment_name(high.segment));
        let state = if segment.exists() {
            "ends early (truncated?)".to_string()
        } else {
            "is missing (deleted?)".to_string()
        };
        if !repair {
            return Err(format!(
                "address {:?}: the high-water mark in {} says sequence {} was written, in segment {}, which {state}; the log ends at sequence {last}, so messages {} to {} are gone. Start with --repair to continue from sequence {} (this address's remaining messages are then set aside in its directory, not served)",
                r.name,
                hwm_path.display(),
                high.last,
                segment.display(),
                last + 1,
                high.last,
                high.last.saturating_add(1)
            ));
        }
        let kept = r.messages;
        let aside = set_aside(&mut r, high.last.saturating_add(1))?;
        tracing::error!(address = %r.name, high_water = high.last, log_ends = last, segment = %segment.display(), set_aside = %aside.display(), messages_set_aside = kept, "storage: --repair: messages up to the high-water mark are gone; continuing past it so no sequence is given out twice, with the remaining segments set aside (not served)");
    }
    if let Some((path, pos, cut, bad)) = torn {
        if path.exists() {
            tracing::warn!(address = %r.name, file = %path.display(), bytes = cut, reason = bad.describe(), "storage: torn tail truncated at the last valid record");
            r.cut += cut;
            super::files::cut_back(&path, pos)?;
        }
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
                    let rest = buf.get(pos..).unwrap_or_default();
                    let torn = record::torn_tail(rest, bad) && !record::good_event_after(&buf, pos);
                    if !torn && !repair {
                        return Err(format!(
                            "address {:?}: corrupt group journal record in {} (byte {pos}: {}); start with --repair to keep the records before it",
                            r.name,
                            journal.display(),
                            bad.describe()
                        ));
                    }
                    let cut = (buf.len() - pos) as u64;
                    if torn {
                        tracing::warn!(address = %r.name, file = %journal.display(), bytes = cut, reason = bad.describe(), "storage: group journal truncated at the last valid record");
                    } else {
                        tracing::error!(address = %r.name, file = %journal.display(), offset = pos, bytes = cut, reason = bad.describe(), "storage: --repair: corrupt group journal record; keeping the records before it");
                    }
                    r.cut += cut;
                    super::files::cut_back(&journal, pos as u64)?;
                    break;
                }
            }
        }
        r.journal_len = pos as u64;
    }
    Ok(Some(r))
}
