//! Tests that need something outside Rust (tests/common/prereq.rs): on a machine without it
//! they say that they were skipped, one line each and a summary, and
//! `SWITCHBOARD_TEST_REQUIRE_ALL=1` turns the skip into a failure.
//!
//! The check runs this test binary again, with `PATH` stripped of `redis-server`, on the one
//! test below that needs it.

mod common;

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Command, Output},
};

use common::{
    prereq::{require, REDIS_SERVER, REQUIRE_ALL, SKIPS_DIR},
    redis::RedisServer,
};

/// The harness's `redis-server` starts on a free port and answers PING. Needs redis-server.
#[test]
fn redis_server_starts_and_answers_ping() {
    if !require(&REDIS_SERVER) {
        return;
    }
    let redis = RedisServer::start();
    let mut conn = TcpStream::connect(("127.0.0.1", redis.port)).expect("connect to redis");
    conn.write_all(b"PING\r\n").unwrap();
    let mut reply = [0u8; 7];
    conn.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"+PONG\r\n");
}

/// Runs `redis_server_starts_and_answers_ping` alone in a new process of this binary, with no
/// `redis-server` on `PATH` and skip files under `skips`.
fn run_without_redis(skips: &Path, require_all: bool) -> Output {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(
        std::env::split_paths(&path).filter(|dir| !dir.join("redis-server").exists()),
    )
    .unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "redis_server_starts_and_answers_ping"])
        .env("PATH", path)
        .env(SKIPS_DIR, skips)
        .env_remove(REQUIRE_ALL);
    if require_all {
        child.env(REQUIRE_ALL, "1");
    }
    child.output().expect("run this test binary again")
}

#[test]
fn a_missing_redis_server_is_a_reported_skip_and_a_failure_under_require_all() {
    let skips = tempfile::tempdir().unwrap();
    let line = "SKIPPED prerequisites::redis_server_starts_and_answers_ping: \
                needs redis-server on PATH (apt-get install redis-server)";

    let out = run_without_redis(skips.path(), false);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "a skip passes: {out:?}");
    assert!(stdout.contains("1 passed"), "{stdout}");
    // The line, once, and after libtest's result line the count and the reason.
    assert_eq!(stderr.matches(line).count(), 1, "{stderr}");
    let summary = "SKIPPED 1 test(s) of prerequisites (counted as passed above): \
                   needs redis-server on PATH (apt-get install redis-server); list: ";
    assert!(stderr.contains(summary), "{stderr}");
    let file = skips.path().join("prerequisites.txt");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), format!("{line}\n"));

    let out = run_without_redis(skips.path(), true);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        !out.status.success(),
        "under {REQUIRE_ALL}=1 it fails: {out:?}"
    );
    assert!(stdout.contains("1 failed"), "{stdout}");
    let failure = format!("{line}; {REQUIRE_ALL}=1 makes a skip a failure");
    assert!(
        stdout.contains(&failure) || stderr.contains(&failure),
        "the failure names the reason: {stdout}{stderr}"
    );
    assert!(!stderr.contains("SKIPPED 1 test(s)"), "{stderr}");
    // Nothing was skipped, so the earlier run's list is gone.
    assert!(!file.exists(), "{} is stale", file.display());
}
