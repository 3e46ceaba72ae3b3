//! The disk engine's storage: the classic broker log (Kafka, NATS JetStream's file store). Each
//! address is an append-only log of segment files of CRC-framed records plus a journal of its
//! consumer groups' events; one flusher thread writes and fsyncs with group commit.
//!
//! The disk engine keeps the in-memory engine's index (`memory::AddressLog`: windows, groups,
//! leases, subscribers) and adds durability under it: a message is *staged* (sequence assigned,
//! invisible) under the address lock, written and fsynced by the flusher, and only then made
//! visible to subscribers, groups and replay, and acknowledged. Group changes (CreateGroup,
//! DeleteGroup, positions after a Recv, leases, Acks) are journaled the same way before the call
//! returns. At start every address is recovered from its files (`recovery.rs`).
//!
//! ```text
//! <data-dir>/LOCK                 the PID of the broker using the directory (flock)
//! <data-dir>/addresses/<hash>/    one address's files (see `files.rs`)
//! <data-dir>/trash/               deleted addresses' files on their way out
//! ```
//!
//! Invariants: nothing is visible or acknowledged before the fsync that covers it (with
//! `--fsync always`); a sequence, once acknowledged, is never reused (each address's
//! high-water mark, `hwm.rs`, catches a log that lost its end, also under `--repair`); a failed
//! write or fsync fails its Sends and everything queued behind them on that address, and is cut
//! back before anything else is written to the file.

pub mod cache;
pub mod files;
pub mod flusher;
pub mod hwm;
pub mod record;
pub mod recovery;

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use sha2::{Digest, Sha256};

pub use cache::Cache;
pub use files::AddressFiles;
pub use flusher::{Flusher, FsyncMode, Job, Work};
pub use recovery::Recovered;

use crate::metrics::Metrics;

/// Default segment size: a new segment begins once the last one holds this many bytes.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Default message cache (bytes).
pub const DEFAULT_CACHE_BYTES: usize = 256 * 1024 * 1024;

/// Default size past which a group journal is compacted (bytes).
pub const DEFAULT_JOURNAL_COMPACT_BYTES: u64 = 16 * 1024 * 1024;

/// How the disk engine is set up (`--data-dir`, `--fsync`, `--repair`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The data directory.
    pub dir: PathBuf,
    /// When to fsync.
    pub fsync: FsyncMode,
    /// Bytes after which a new segment begins.
    pub segment_bytes: u64,
    /// Start even if a log is corrupt or ends before its high-water mark, keeping what precedes
    /// the bad record (or setting it aside when acknowledged messages were lost: see
    /// `recovery.rs`).
    pub repair: bool,
    /// Bytes past which an address's group journal is rewritten as a snapshot of its groups.
    pub journal_compact_bytes: u64,
    /// Bytes of retained messages kept in memory with their payload (see [`cache`]).
    pub cache_bytes: usize,
}

/// An open data directory: its lock and the flusher.
#[derive(Debug)]
pub struct Store {
    addresses: PathBuf,
    trash: PathBuf,
    /// The flusher thread's queue.
    pub flusher: Flusher,
    /// Which messages keep their payload in memory.
    pub cache: Cache,
    _lock: File,
}

/// One address's durability: its files and the store that writes them.
#[derive(Debug)]
pub struct DiskLog {
    /// The address's files.
    pub files: AddressFiles,
    /// The store.
    pub store: Arc<Store>,
}

fn lock_dir(dir: &Path) -> Result<File, String> {
    let path = dir.join("LOCK");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("--data-dir: cannot open {}: {e}", path.display()))?;
    if f.try_lock().is_err() {
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        return Err(format!(
            "--data-dir {}: another broker (pid {}) is using it; stop it first",
            dir.display(),
            pid.trim()
        ));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    let _ = f.sync_all();
    Ok(f)
}

impl Store {
    /// Opens (creating if needed) and locks `cfg.dir`, recovers every address in it and starts
    /// the flusher.
    ///
    /// # Errors
    /// The directory is locked by another broker, unreadable, or holds a corrupt log (without
    /// `--repair`): a message naming the address, sequence and file.
    pub fn open(cfg: &DiskConfig, metrics: Arc<Metrics>) -> Result<(Self, Vec<Recovered>), String> {
        fs::create_dir_all(&cfg.dir)
            .map_err(|e| format!("--data-dir: cannot create {}: {e}", cfg.dir.display()))?;
        let lock = lock_dir(&cfg.dir)?;
        let addresses = cfg.dir.join("addresses");
        let trash = cfg.dir.join("trash");
        for d in [&addresses, &trash] {
            fs::create_dir_all(d)
                .map_err(|e| format!("--data-dir: cannot create {}: {e}", d.display()))?;
        }
        // Files of addresses deleted just before a crash.
        if let Ok(entries) = fs::read_dir(&trash) {
            for e in entries.flatten() {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        let mut found = Vec::new();
        let entries = fs::read_dir(&addresses)
            .map_err(|e| format!("--data-dir: cannot read {}: {e}", addresses.display()))?;
        for e in entries.flatten() {
            let dir = e.path();
            match recovery::recover_address(&dir, cfg.repair)? {
                Some(r) => found.push(r),
                None => {
                    tracing::warn!(dir = %dir.display(), "storage: removing an address directory without a name (a crash while it was created)");
                    let _ = fs::remove_dir_all(&dir);
                }
            }
        }
        let flusher = Flusher::start(
            cfg.fsync,
            cfg.segment_bytes,
            cfg.journal_compact_bytes,
            metrics,
        )
        .map_err(|e| format!("cannot start the flusher thread: {e}"))?;
        Ok((
            Self {
                addresses,
                trash,
                flusher,
                cache: Cache::new(cfg.cache_bytes),
                _lock: lock,
            },
            found,
        ))
    }

    /// The directory of `address`'s files.
    pub fn address_dir(&self, address: &str) -> PathBuf {
        let digest = Sha256::digest(address.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.addresses.join(hex)
    }

    /// Where deleted addresses' files go before removal.
    pub fn trash(&self) -> &Path {
        &self.trash
    }
}

/// Replaces `dir`'s journal with `records` atomically (write, fsync, rename, fsync the
/// directory): the compaction done at every start.
///
/// # Errors
/// The I/O error.
pub fn replace_journal(dir: &Path, records: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join("groups.journal.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(records)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(files::JOURNAL_FILE))?;
    File::open(dir)?.sync_all()
}
