//! Prerequisites outside Rust: a test that needs one starts with
//! `if !require(&REDIS_SERVER) { return; }`.
//!
//! A fresh machine with only Rust installed runs `cargo test` green: when a prerequisite is
//! missing the test says so on stderr, one line, and returns —
//! `SKIPPED redis::fan_out_...: needs redis-server on PATH (apt-get install redis-server)`.
//! When the binary exits it repeats the count and the reasons after libtest's own result line
//! (which counts a skipped test as passed), and writes this run's skips to
//! `target/test-skips/<binary>.txt` (removed when the binary's run skipped nothing), so
//! `cat target/test-skips/*` lists every skip of the latest run of each binary.
//!
//! With `SWITCHBOARD_TEST_REQUIRE_ALL=1` (set by `.ci/run`) a missing prerequisite fails the
//! test instead, so CI runs everything. Nothing else may skip.

use std::{
    io::Write,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Mutex, OnceLock},
};

/// Turns every skip into a failure (CI).
pub const REQUIRE_ALL: &str = "SWITCHBOARD_TEST_REQUIRE_ALL";
/// Where the skip files go (default `target/test-skips`); `tests/prerequisites.rs` points a
/// child run elsewhere.
pub const SKIPS_DIR: &str = "SWITCHBOARD_TEST_SKIPS_DIR";

/// Something a test needs that `cargo` does not provide.
pub struct Prerequisite {
    /// What is missing, as the skip line says it: "needs {need}".
    pub need: &'static str,
    present: fn() -> bool,
    cached: OnceLock<bool>,
}

/// `redis-server` (the Redis engine's tests start their own on free loopback ports).
pub static REDIS_SERVER: Prerequisite = Prerequisite {
    need: "redis-server on PATH (apt-get install redis-server)",
    present: || runs("redis-server"),
    cached: OnceLock::new(),
};

/// `redis-cli` (it joins the masters of the cluster test; Debian's redis-server package brings
/// it).
pub static REDIS_CLI: Prerequisite = Prerequisite {
    need: "redis-cli on PATH (apt-get install redis-server)",
    present: || runs("redis-cli"),
    cached: OnceLock::new(),
};

/// The right to mount a small tmpfs (the disk-full tests): `CAP_SYS_ADMIN`, which root has
/// outside an unprivileged container.
pub static MOUNT_TMPFS: Prerequisite = Prerequisite {
    need: "root with CAP_SYS_ADMIN to mount a small tmpfs (run as root, as CI does)",
    present: || effective_capabilities().is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0),
    cached: OnceLock::new(),
};

/// A hard open-file limit above 256 (the test lowers the soft limit to 256 and checks that the
/// broker raises it to the hard one).
pub static OPEN_FILES_ABOVE_256: Prerequisite = Prerequisite {
    need: "a hard open-file limit above 256 (ulimit -Hn)",
    present: || hard_open_files().is_some_and(|hard| hard > 256),
    cached: OnceLock::new(),
};

/// `CAP_SYS_ADMIN`'s bit (linux/capability.h).
const CAP_SYS_ADMIN: u32 = 21;

/// True when `what` is present. Otherwise the test is skipped (one line on stderr, and it is
/// counted for the summary) and the caller returns; with `SWITCHBOARD_TEST_REQUIRE_ALL=1`
/// it panics with the same reason.
pub fn require(what: &Prerequisite) -> bool {
    forget_earlier_skips();
    if *what.cached.get_or_init(what.present) {
        return true;
    }
    let line = format!("SKIPPED {}: needs {}", test_name(), what.need);
    if std::env::var_os(REQUIRE_ALL).is_some_and(|v| v == "1") {
        panic!("{line}; {REQUIRE_ALL}=1 makes a skip a failure");
    }
    // Straight to the process's stderr: libtest captures what a passing test writes with
    // eprintln!, and a skip must not be silent.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
    let mut skipped = SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if skipped.is_empty() {
        // SAFETY: atexit only stores the pointer. `summary` is a plain `extern "C" fn()` that
        // touches nothing torn down at exit (a static Mutex, stderr, the file system).
        unsafe { atexit(summary) };
    }
    skipped.push(line);
    false
}

/// This run's skip lines, in order.
static SKIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());

unsafe extern "C" {
    /// C's `atexit`: libtest has no end-of-run hook, but after its result line the process ends
    /// through C's `exit` (`main` returns, or `process::exit(101)` on a failure), which runs
    /// these.
    fn atexit(f: extern "C" fn()) -> std::ffi::c_int;
}

/// After libtest's result line: how many of the "passed" tests were skipped, and why; the
/// same lines into `target/test-skips/<binary>.txt`.
extern "C" fn summary() {
    let skipped = SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut reasons: Vec<&str> = skipped
        .iter()
        .filter_map(|l| l.split_once(": needs ").map(|(_, why)| why))
        .collect();
    reasons.sort_unstable();
    reasons.dedup();
    let _ = writeln!(
        std::io::stderr().lock(),
        "SKIPPED {} test(s) of {} (counted as passed above): needs {}; list: {}",
        skipped.len(),
        binary(),
        reasons.join("; needs "),
        skip_file().display()
    );
    let file = skip_file();
    if let Some(dir) = file.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = std::fs::write(
        &file,
        skipped.iter().map(|l| format!("{l}\n")).collect::<String>(),
    );
}

/// Removes this binary's skip file from an earlier run: called by every test that checks a
/// prerequisite, so a run that skips nothing leaves no stale list behind.
fn forget_earlier_skips() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = std::fs::remove_file(skip_file());
    });
}

/// `target/test-skips/<binary>.txt`, or under `SWITCHBOARD_TEST_SKIPS_DIR`.
fn skip_file() -> PathBuf {
    let dir = std::env::var_os(SKIPS_DIR).map_or_else(
        || {
            // CARGO_TARGET_TMPDIR is target/tmp; its parent is target/.
            let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            tmp.parent().unwrap_or(&tmp).join("test-skips")
        },
        PathBuf::from,
    );
    dir.join(format!("{}.txt", binary()))
}

/// The test binary's name without cargo's hash: `redis` for `target/debug/deps/redis-0a1b…`.
fn binary() -> String {
    let exe = std::env::current_exe().ok();
    let stem = exe
        .as_deref()
        .and_then(|p| p.file_stem())
        .and_then(|s| s.to_str())
        .unwrap_or("tests");
    stem.rsplit_once('-')
        .map_or(stem, |(name, _)| name)
        .to_string()
}

/// `redis::fan_out_...`: libtest runs each test on a thread named after it, and
/// `#[tokio::test]` runs the test's body on that thread (`block_on`).
fn test_name() -> String {
    let thread = std::thread::current();
    format!(
        "{}::{}",
        binary(),
        thread.name().unwrap_or("<unnamed test thread>")
    )
}

/// True when `program --version` runs and exits 0.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `CapEff` of this process, from /proc/self/status.
fn effective_capabilities() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

/// The hard "Max open files" of this process, from /proc/self/limits.
fn hard_open_files() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let hard = line["Max open files".len()..].split_whitespace().nth(1)?;
    Some(hard.parse().unwrap_or(u64::MAX))
}
