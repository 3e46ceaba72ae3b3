//! A real `redis-server` for tests, on a free loopback port, ended (by its PID) when dropped.
//! A test that starts one begins with `if !require(&REDIS_SERVER) { return; }` (`prereq`).

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU64, Ordering},
};

use switchboard::engine::redis::RedisConfig;

/// A running `redis-server`.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` with no persistence.
    pub fn start() -> Self {
        Self::start_with(&["--save", "", "--appendonly", "no"])
    }

    /// Starts `redis-server` with `args` (after its port and directory), and waits until it
    /// says it accepts connections.
    pub fn start_with(args: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sb-redis-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("redis dir");
        Self::start_in(dir, None, args)
    }

    /// Starts `redis-server` in `dir` on `port` (a free one when `None`).
    pub fn start_in(dir: PathBuf, port: Option<u16>, args: &[&str]) -> Self {
        let port = port.unwrap_or_else(free_port);
        let mut child = Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect(
                "redis-server on PATH (a test that starts it begins with `require(&REDIS_SERVER)`)",
            );
        let stdout = child.stdout.take().expect("redis stdout");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("Ready to accept connections") => break,
                Some(Ok(_)) => {}
                _ => panic!("redis-server on port {port} exited before it was ready"),
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Self { port, child, dir }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Kills it with SIGKILL and waits for it to be gone.
    pub fn kill(mut self) -> (PathBuf, u16) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let out = (self.dir.clone(), self.port);
        std::mem::forget(self);
        out
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A port free now on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A namespace no other server of this process uses.
pub fn namespace() -> String {
    format!(
        "t{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn config(url: &str, namespace: &str) -> RedisConfig {
    RedisConfig {
        urls: vec![url.to_string()],
        cluster: false,
        namespace: namespace.to_string(),
        ca_cert: None,
    }
}
