//! The binaries as an operator runs them, for node's and router's tests (router's support
//! includes this file by `#[path]`): a child started with `--log-format json` on port 0
//! whose bound address is read from its log, killed when dropped; the other package's
//! binary built on demand; the bad-config exit check both binaries share.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::client::WAIT;

/// A child process, killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line it logged after its address (tests of the logs read them).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd` (which must log JSON) and waits up to [`WAIT`] for the log line that
    /// carries the bound address (`fields.addr`); the rest of the log is drained so the
    /// child never blocks on a full pipe. `what` names the child in failures.
    pub fn spawn(cmd: &mut Command, what: &str) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let addr = lines.by_ref().map_while(Result::ok).find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("a log line that is not JSON ({e}): {line}"));
                v["fields"]["addr"].as_str()?.parse::<SocketAddr>().ok()
            });
            let _ = tx.send(addr);
            for line in lines.map_while(Result::ok) {
                if let Ok(mut kept) = kept.lock() {
                    kept.push(line);
                }
            }
        });
        let mut proc = Proc {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        match rx.recv_timeout(WAIT) {
            Ok(Some(addr)) => proc.addr = addr,
            Ok(None) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("{what} exited before logging its address")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{what} did not log its address within {WAIT:?}")
            }
        }
        proc
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kill -KILL`, as a crash: no shutdown path runs.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// Sends `signal` (`TERM`, `KILL`, …) with `kill(1)`, asserting it was delivered.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {}", self.child.id());
    }

    /// Waits up to [`WAIT`] for the child to exit; its exit code (`None` for a signal).
    pub async fn exit_code(mut self) -> Option<i32> {
        let waited = tokio::task::spawn_blocking(move || {
            let status = self.child.wait().expect("wait");
            (self, status)
        });
        let (_proc, status) = tokio::time::timeout(WAIT, waited)
            .await
            .expect("the process exits within the wait")
            .expect("join");
        status.code()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The binary `bin` of package `package`, beside `own_bin` (this package's binary).
/// `cargo test -p <one package>` builds only that package's binaries, so the other one is
/// built (or found fresh) here once per test binary; after `cargo test --workspace` that
/// is a no-op, and a stale binary is never tested.
pub fn sibling_bin(own_bin: &str, package: &str) -> PathBuf {
    let dir = Path::new(own_bin)
        .parent()
        .expect("the binary has a directory");
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev",
        Some(other) => other,
    };
    let target_dir = dir.parent().expect("profile directory has a parent");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", package, "--bin", package])
        .args(["--profile", profile])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(workspace)
        .status()
        .unwrap_or_else(|e| panic!("run cargo build for {package}: {e}"));
    assert!(status.success(), "building {package} failed");
    let bin = dir.join(package);
    assert!(bin.exists(), "{} missing after the build", bin.display());
    bin
}

/// Each of `cases` makes `bin` (whose messages start `<name>: `) exit with status 64 and
/// one line on stderr.
pub fn assert_bad_config_exits_64(bin: &str, name: &str, cases: &[&[&str]]) {
    for args in cases {
        let out = Command::new(bin)
            .args(*args)
            .output()
            .unwrap_or_else(|e| panic!("run {name}: {e}"));
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with(&format!("{name}: ")), "{stderr}");
    }
}
