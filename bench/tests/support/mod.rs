//! Test harness for running the real `chat-bench` binary against a real `chat-node`
//! process: the node on port 0 with the real CQL store (`CHAT_CQL_NODES`) and membership in
//! the real Redis (`CHAT_REDIS_URL`), its address read from its JSON log, readiness polled
//! with a deadline. Missing servers fail the test loudly; children are killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Upper bound for anything a test waits for; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(60);

/// The real Redis, from `CHAT_REDIS_URL`. Missing means the suite was started the wrong
/// way: fail loudly, never skip.
pub fn redis_url() -> String {
    match std::env::var("CHAT_REDIS_URL") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "CHAT_REDIS_URL is not set: this test needs the real Redis. Export the servers' \
             environment first: eval \"$(deploy/local/servers.sh env)\""
        ),
    }
}

/// The real CQL server's contact points, from `CHAT_CQL_NODES`.
pub fn cql_nodes() -> String {
    match std::env::var("CHAT_CQL_NODES") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "CHAT_CQL_NODES is not set: this test needs the real CQL server. Export the \
             servers' environment first: eval \"$(deploy/local/servers.sh env)\""
        ),
    }
}

/// One keyspace for every node the bench tests start; rooms are unique per run.
pub const KEYSPACE: &str = "t_chat_bench";

/// A name no other test or earlier run uses.
pub fn unique(what: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The chat-node binary beside ours, built into the same target directory once per test
/// binary (`cargo test -p chat-bench` builds only this package's binaries).
pub fn node_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let bench = Path::new(env!("CARGO_BIN_EXE_chat-bench"));
        let dir = bench.parent().expect("the bench binary has a directory");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let target_dir = dir.parent().expect("profile directory has a parent");
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "chat-node", "--bin", "chat-node"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace)
            .status()
            .expect("run cargo build for chat-node");
        assert!(status.success(), "building chat-node failed");
        let bin = dir.join("chat-node");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
}

/// A chat-node process, killed when dropped.
pub struct NodeProc {
    pub addr: SocketAddr,
    child: Child,
}

impl NodeProc {
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes start one at a time, so the first one in a fresh keyspace creates the schema alone.
static SPAWN: Mutex<()> = Mutex::new(());

/// Starts a chat-node on port 0 with `auth` flags (`--insecure-dev-auth`, or
/// `--jwt-secret S`) against the real CQL store and Redis (its own membership prefix, so
/// it owns every room), and waits until `/readyz` answers 200.
pub fn spawn_node(auth: &[&str]) -> NodeProc {
    let bin = node_bin();
    let _one_at_a_time = SPAWN.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(auth)
        .args(["--cql-nodes", &cql_nodes(), "--cql-keyspace", KEYSPACE])
        .env("CHAT_REDIS_URL", redis_url())
        .env("CHAT_REDIS_PREFIX", unique("bench-test"))
        .env("CHAT_MEMBERSHIP_TTL", "2s")
        .env_remove("CHAT_LISTEN")
        .env_remove("CHAT_INSECURE_DEV_AUTH")
        .env_remove("CHAT_JWT_SECRET")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-node");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = v["fields"]["addr"]
                .as_str()
                .and_then(|a| a.parse::<SocketAddr>().ok())
            {
                let _ = tx.send(addr);
                break;
            }
        }
        // Keep draining the log so the node never blocks on a full pipe.
        for _ in lines {}
    });
    let addr = match rx.recv_timeout(WAIT) {
        Ok(a) => a,
        Err(_) => {
            let _ = child.kill();
            panic!("chat-node did not log its address within {WAIT:?}");
        }
    };
    let node = NodeProc { addr, child };
    let deadline = Instant::now() + WAIT;
    loop {
        if http_get(addr, "/readyz").is_some_and(|(status, _)| status == 200) {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "chat-node at {addr} not ready within {WAIT:?}: {:?}",
            http_get(addr, "/readyz")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A plain HTTP/1.0 GET: status and body, or `None` if the server did not answer.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Some((status, body))
}

/// Runs `chat-bench ARGS --json FILE` to completion (killed and failed after `WAIT`) and
/// returns its exit status and the JSON report.
pub fn run_bench(args: &[&str]) -> (ExitStatus, serde_json::Value) {
    let dir = std::env::temp_dir().join(unique("chat-bench-test"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let json = dir.join("report.json");
    let mut child = Command::new(env!("CARGO_BIN_EXE_chat-bench"))
        .args(args)
        .arg("--json")
        .arg(&json)
        .arg("--quiet")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-bench");
    let deadline = Instant::now() + WAIT * 2;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait chat-bench") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chat-bench {args:?} did not finish within {:?}", WAIT * 2);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("chat-bench {args:?} ({status}) wrote no report: {e}"));
    let _ = std::fs::remove_dir_all(&dir);
    let report = serde_json::from_str(&text).expect("the report is JSON");
    (status, report)
}
