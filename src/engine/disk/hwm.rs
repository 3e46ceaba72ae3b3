//! An address's high-water mark: the last sequence known to have been written *and fsynced*,
//! kept in a small file beside its segments so that a deleted or truncated last segment is
//! noticed at start instead of its sequences being given out again.
//!
//! ```text
//! <address dir>/high-water     1,024 bytes: two slots, at bytes 0 and 512
//! slot: magic "SBHW" | last sequence u64 LE | first sequence of its segment u64 LE | CRC-32 u32 LE
//! ```
//!
//! The flusher rewrites one slot (alternating) after each fsync that made new messages durable
//! (`AddressFiles::sync`, after every write of the round succeeded): one `pwrite` of 24 bytes
//! into an allocated page, no fsync of its own. After a segment rolled (its predecessor was
//! fsynced first) that sync also fsyncs the mark, so after a power cut it covers at least every
//! closed segment. Each slot is only ever a value that was durable when written, so any valid
//! slot is a lower bound of what the log must hold; a slot torn by a power cut fails its CRC and
//! the other one counts. The mark is `max` of the valid slots.
//!
//! Invariant: `high-water.last <= ` the last sequence in the address's segments, unless files
//! were lost or damaged; recovery (`recovery.rs`) refuses to start otherwise.

use std::{fs::File, io, os::unix::fs::FileExt};

/// The file's name, in the address's directory.
pub const HWM_FILE: &str = "high-water";

/// Bytes of the file (two slots in separate 512-byte sectors, so a torn write spoils one).
pub const HWM_FILE_BYTES: usize = 1024;

const SLOT_STRIDE: u64 = 512;
const SLOT_BYTES: usize = 24;
const MAGIC: [u8; 4] = *b"SBHW";

/// What the mark records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HighWater {
    /// The last sequence written and fsynced.
    pub last: u64,
    /// The first sequence of the segment that holds it (its file name).
    pub segment: u64,
}

fn encode(hw: HighWater) -> [u8; SLOT_BYTES] {
    let mut b = [0u8; SLOT_BYTES];
    b[..4].copy_from_slice(&MAGIC);
    b[4..12].copy_from_slice(&hw.last.to_le_bytes());
    b[12..20].copy_from_slice(&hw.segment.to_le_bytes());
    let crc = crc32fast::hash(&b[..20]);
    b[20..].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode(b: &[u8]) -> Option<HighWater> {
    let b: &[u8; SLOT_BYTES] = b.get(..SLOT_BYTES)?.try_into().ok()?;
    let crc = u32::from_le_bytes([b[20], b[21], b[22], b[23]]);
    if b[..4] != MAGIC || crc32fast::hash(&b[..20]) != crc {
        return None;
    }
    let u = |s: &[u8]| u64::from_le_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
    Some(HighWater {
        last: u(&b[4..12]),
        segment: u(&b[12..20]),
    })
}

/// The mark in `bytes` (a whole file): the higher valid slot; `None` when no slot is valid
/// (never written, or both damaged).
pub fn parse(bytes: &[u8]) -> Option<HighWater> {
    (0..2)
        .filter_map(|i| {
            let at = usize::try_from(i * SLOT_STRIDE).ok()?;
            decode(bytes.get(at..)?)
        })
        .max_by_key(|hw| hw.last)
}

/// Writes `hw` into slot `slot` (0 or 1) of `file` (not fsynced).
///
/// # Errors
/// The I/O error.
pub fn write(file: &File, slot: u64, hw: HighWater) -> io::Result<()> {
    file.write_all_at(&encode(hw), (slot % 2) * SLOT_STRIDE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_higher_valid_slot_counts_and_a_torn_one_is_ignored() {
        let mut file = vec![0u8; HWM_FILE_BYTES];
        assert_eq!(parse(&file), None, "never written");
        let a = HighWater {
            last: 41,
            segment: 1,
        };
        let b = HighWater {
            last: 97,
            segment: 60,
        };
        file[..SLOT_BYTES].copy_from_slice(&encode(a));
        assert_eq!(parse(&file), Some(a));
        file[512..512 + SLOT_BYTES].copy_from_slice(&encode(b));
        assert_eq!(parse(&file), Some(b));
        // Slot 1 torn (its CRC fails): slot 0 still counts, a lower bound.
        file[512 + 6] ^= 0x10;
        assert_eq!(parse(&file), Some(a));
        // A short file: the slot that is whole counts.
        assert_eq!(parse(&file[..100]), Some(a));
        assert_eq!(parse(&[]), None);
    }
}
