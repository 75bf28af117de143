//! Real processes for cluster tests: chat-node and chat-router binaries started with
//! `--listen 127.0.0.1:0`, their address read from their JSON log, the real Redis for
//! membership and the real CQL server for storage. Every process is killed when dropped.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use super::process::sibling_bin;
use super::*;

pub const NODE_BIN: &str = env!("CARGO_BIN_EXE_chat-node");
/// Short, so a killed node drops out quickly.
pub const TTL: &str = "1s";

/// The chat-router binary beside ours, built once per test binary (see [`sibling_bin`]).
pub fn router_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| sibling_bin(NODE_BIN, "chat-router"))
        .clone()
}

pub fn redis_url() -> String {
    std::env::var("CHAT_REDIS_URL").unwrap_or_else(|_| {
        panic!("CHAT_REDIS_URL is not set: cluster tests need the real Redis; run deploy/local/test.sh")
    })
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
            c.routers.push(Proc::spawn(&mut cmd, "chat-router"));
        }
        c.wait_ring_size(usize::from(nodes)).await;
        c
    }

    pub fn add_node(&mut self, id: u16) {
        self.add_node_at(id, "127.0.0.1:0");
    }

    /// [`Cluster::add_node`] listening on `addr` (a restart in place, as a supervisor does).
    pub fn add_node_at(&mut self, id: u16, addr: &str) {
        let mut cmd = node_command();
        cmd.args(["--listen", addr, "--insecure-dev-auth"])
            .args(["--node-id", &id.to_string(), "--redis-url", &redis_url()])
            .args(["--redis-prefix", &self.prefix, "--membership-ttl", TTL])
            // A crashed owner's rooms are taken over a store timeout after its key is gone:
            // short, so the tests of crashes are.
            .args(["--store-timeout", "2s"])
            // Slow shutdown pacing (one client per 100 ms), so a test can tell the paced
            // `going_away` closes from anything faster.
            .args(["--shutdown-close-rate", "10"])
            .args(&self.node_args);
        self.nodes
            .insert(id, Proc::spawn(&mut cmd, &format!("chat-node {id}")));
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
