//! Real processes for cluster tests: chat-node and chat-router binaries started with
//! `--listen 127.0.0.1:0`, their address read from their JSON log, the real Redis for
//! membership and the real CQL server for storage. Every process is killed when dropped.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::*;

pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_chat-node");
/// Short, so a killed node drops out quickly.
pub const TTL: &str = "1s";

/// The chat-router binary beside ours. `cargo test -p chat-node` builds only this
/// package's binaries, so it is built (or found fresh) here once per test binary; after
/// `cargo test --workspace` that is a no-op, and a stale router is never tested.
pub fn router_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let node = std::path::Path::new(NODE_BIN);
        let dir = node.parent().expect("the node binary has a directory");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => "dev",
            Some(other) => other,
        };
        let target_dir = dir.parent().expect("profile directory has a parent");
        let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root");
        let status = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "chat-router", "--bin", "chat-router"])
            .args(["--profile", profile])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(workspace)
            .status()
            .expect("run cargo build for chat-router");
        assert!(status.success(), "building chat-router failed");
        let bin = dir.join("chat-router");
        assert!(bin.exists(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

pub fn redis_url() -> String {
    std::env::var("CHAT_REDIS_URL").unwrap_or_else(|_| {
        panic!("CHAT_REDIS_URL is not set: cluster tests need the real Redis; run deploy/local/test.sh")
    })
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Every line it logged after its address (tests of the logs read them).
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let line = lines
                .next()
                .expect("process logs before exiting")
                .expect("log line");
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = v["fields"]["addr"].as_str() {
                break addr.parse().expect("addr");
            }
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(mut kept) = kept.lock() {
                    kept.push(line);
                }
            }
        });
        Proc { child, addr, log }
    }

    pub fn kill9(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

pub struct Cluster {
    pub prefix: String,
    pub nodes: BTreeMap<u16, Proc>,
    pub routers: Vec<Proc>,
    /// Flags every node gets besides the harness's own.
    node_args: Vec<String>,
}

impl Cluster {
    pub async fn start(tag: &str, nodes: u16, routers: usize) -> Cluster {
        Cluster::start_with(tag, nodes, routers, &[]).await
    }

    /// [`Cluster::start`] with extra flags for every node.
    pub async fn start_with(tag: &str, nodes: u16, routers: usize, node_args: &[&str]) -> Cluster {
        fresh_keyspace().await;
        let mut c = Cluster {
            prefix: format!("t-cluster-{tag}-{}", std::process::id()),
            nodes: BTreeMap::new(),
            routers: Vec::new(),
            node_args: node_args.iter().map(|a| a.to_string()).collect(),
        };
        for id in 1..=nodes {
            c.add_node(id);
        }
        for _ in 0..routers {
            let mut cmd = Command::new(router_bin());
            cmd.args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--redis-url",
                &redis_url(),
            ])
            .args(["--redis-prefix", &c.prefix, "--membership-ttl", TTL]);
            c.routers.push(Proc::spawn(cmd));
        }
        c.wait_ring_size(usize::from(nodes)).await;
        c
    }

    pub fn add_node(&mut self, id: u16) {
        self.add_node_at(id, "127.0.0.1:0");
    }

    /// [`Cluster::add_node`] listening on `addr` (a restart in place, as a supervisor does).
    pub fn add_node_at(&mut self, id: u16, addr: &str) {
        let mut cmd = Command::new(NODE_BIN);
        cmd.args([
            "--listen",
            addr,
            "--log-format",
            "json",
            "--insecure-dev-auth",
        ])
        .args(["--node-id", &id.to_string(), "--redis-url", &redis_url()])
        .args(["--redis-prefix", &self.prefix, "--membership-ttl", TTL])
        // A crashed owner's rooms are taken over a store timeout after its key is gone:
        // short, so the tests of crashes are.
        .args(["--store-timeout", "2s"])
        // Slow shutdown pacing (one client per 100 ms), so a test can tell the paced
        // `going_away` closes from anything faster.
        .args(["--shutdown-close-rate", "10"])
        .args([
            "--cql-nodes",
            &cql_nodes().join(","),
            "--cql-keyspace",
            &keyspace(),
        ])
        .args(&self.node_args);
        self.nodes.insert(id, Proc::spawn(cmd));
    }

    pub fn router(&self) -> SocketAddr {
        self.routers[0].addr
    }

    /// Waits until every router's ring has `n` nodes.
    pub async fn wait_ring_size(&self, n: usize) {
        for r in &self.routers {
            let addr = r.addr;
            eventually(&format!("router ring of {n} nodes"), || async move {
                let (status, body) = http(addr, "GET", "/readyz", None).await;
                status == 200 && json(&body)["ring_size"].as_u64() == Some(n as u64)
            })
            .await;
        }
    }

    /// A room named `<prefix>-<i>` owned by node `id`.
    pub async fn room_on(&self, prefix: &str, id: u16) -> String {
        for i in 0..500 {
            let room = format!("{prefix}-{i}");
            if self.owner(self.router(), &room).await == id {
                return room;
            }
        }
        panic!("no room of {prefix}-* on node {id}");
    }

    pub async fn owner(&self, router: SocketAddr, room: &str) -> u16 {
        let (status, body) = http(router, "GET", &format!("/v1/rooms/{room}/owner"), None).await;
        assert_eq!(status, 200, "{body}");
        json(&body)["node"]["id"].as_u64().expect("owner id") as u16
    }
}
