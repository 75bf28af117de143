//! Test harness: real chat-node processes on the real CQL server, membership in the real
//! Redis, the router in-process on port 0, and a small WebSocket/HTTP client talking to
//! them over real sockets. No fixed ports, no sleeps for readiness: everything is polled
//! with a deadline. Children are killed by Drop guards.
#![allow(dead_code)]

#[path = "../../../node/tests/support/client.rs"]
mod client;
#[path = "../../../node/tests/support/process.rs"]
pub mod process;

pub use client::*;
pub use process::Proc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use chat_router::RouterConfig;
use chat_server::membership::{MembershipConfig, Registration};
use common::{NodeInfo, Ring, ServerFrame};

/// The real Redis, from `CHAT_REDIS_URL` (set by `deploy/local/test.sh`). Missing means
/// the suite was started the wrong way: fail loudly, never skip.
pub fn redis_url() -> String {
    match std::env::var("CHAT_REDIS_URL") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "CHAT_REDIS_URL is not set: this test needs the real Redis. \
             Run the suite with deploy/local/test.sh, which starts it."
        ),
    }
}

/// The real CQL server's contact points, from `CHAT_CQL_NODES`.
pub fn cql_nodes() -> String {
    match std::env::var("CHAT_CQL_NODES") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "CHAT_CQL_NODES is not set: this test needs the real CQL server. \
             Run the suite with deploy/local/test.sh, which starts it."
        ),
    }
}

/// One keyspace for every node this binary starts; rooms are unique per run instead of
/// dropping it (see [`unique`]).
pub const KEYSPACE: &str = "t_router";

/// A name no other test or earlier run uses: membership prefixes, rooms.
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

/// Membership settings for a test cluster under its own prefix.
pub fn membership(prefix: &str) -> MembershipConfig {
    MembershipConfig {
        redis_url: redis_url(),
        prefix: prefix.to_string(),
        ttl: Duration::from_secs(2),
        vnodes: common::ring::DEFAULT_VNODES,
        departure_wait: Duration::ZERO,
    }
}

/// The chat-node binary beside ours, built once per test binary (see
/// [`process::sibling_bin`]).
pub fn node_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| process::sibling_bin(env!("CARGO_BIN_EXE_chat-router"), "chat-node"))
}

/// A chat-node process, killed when dropped.
pub struct NodeProc {
    pub id: u16,
    pub addr: SocketAddr,
    proc: Proc,
}

impl NodeProc {
    pub fn info(&self) -> NodeInfo {
        NodeInfo {
            id: self.id,
            addr: self.addr.to_string(),
            started_at_ms: common::id::now_ms(),
            incarnation: 0,
        }
    }

    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// Node processes start one at a time, so the first one in a fresh keyspace creates the
/// schema alone (concurrent schema changes are what Cassandra handles worst).
static SPAWN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts chat-node `id` on port 0 against the real CQL store and reads the bound address
/// from its JSON log. Its membership settings (from the environment: the inherited
/// `CHAT_REDIS_URL`, the prefix given here) are the test cluster's, so a node that
/// registers itself joins the same ring the test builds.
pub async fn spawn_node(id: u16, prefix: &str) -> NodeProc {
    spawn_node_with(id, prefix, &[]).await
}

/// As [`spawn_node`], with extra environment (`CHAT_*` settings) for the node.
pub async fn spawn_node_with(id: u16, prefix: &str, env: &[(&str, &str)]) -> NodeProc {
    let _one_at_a_time = SPAWN.lock().await;
    let mut cmd = Command::new(node_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--insecure-dev-auth", "--cql-nodes", &cql_nodes()])
        .args(["--cql-keyspace", KEYSPACE, "--node-id", &id.to_string()])
        .env("CHAT_REDIS_URL", redis_url())
        .env("CHAT_REDIS_PREFIX", prefix)
        .env("CHAT_MEMBERSHIP_TTL", "2s")
        .env_remove("CHAT_LISTEN")
        .envs(env.iter().copied());
    // Reading the log blocks this thread: off the runtime, so other tasks go on meanwhile.
    let what = format!("chat-node {id}");
    let proc = tokio::task::spawn_blocking(move || Proc::spawn(&mut cmd, &what))
        .await
        .expect("spawn the node");
    NodeProc {
        id,
        addr: proc.addr,
        proc,
    }
}

/// Registers a member the way a node does, for tests of the router alone (no node process
/// behind the member). Node processes register themselves under the prefix they are given.
pub async fn register(prefix: &str, node: NodeInfo) -> Registration {
    chat_server::membership::register(&membership(prefix), node)
        .await
        .expect("register the member in the real Redis")
}

/// The ring every router and node should build for `nodes`.
pub fn expected_ring(nodes: &[NodeInfo]) -> Ring {
    Ring::new(nodes.iter().cloned(), common::ring::DEFAULT_VNODES)
}

/// A router running in this process on port 0; shut down (not awaited) when dropped.
pub struct TestRouter(Served);

impl std::ops::Deref for TestRouter {
    type Target = Served;

    fn deref(&self) -> &Served {
        &self.0
    }
}

impl TestRouter {
    pub fn config(prefix: &str) -> RouterConfig {
        RouterConfig::for_tests(&redis_url(), prefix)
    }

    pub async fn start(config: RouterConfig) -> TestRouter {
        TestRouter(
            Served::spawn(|listener, shutdown| chat_router::run(config, listener, shutdown)).await,
        )
    }

    /// Waits until `/readyz` reports a ring of `n` nodes.
    pub async fn wait_ring(&self, n: usize) {
        let addr = self.addr;
        eventually(&format!("router ring of {n} nodes"), || async move {
            let r = http(addr, "GET", "/readyz", None).await;
            r.status == 200 && r.json()["ring_size"] == n
        })
        .await;
    }

    /// Cancels the router and waits for `run` to return.
    pub async fn stop(mut self) {
        self.0.halt().await;
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.0.shutdown.cancel();
    }
}

impl Client {
    /// Connects to `room` through `addr` and waits for `joined`, retrying while the
    /// cluster still settles (a node whose ring view lags answers `room_moved`; a
    /// router without the node yet answers 502/503), as a real client would.
    pub async fn join(addr: SocketAddr, room: &str, user: &str) -> Client {
        let path = format!("/ws?room={room}&user={user}");
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut retry = tokio::time::interval(Duration::from_millis(50));
        loop {
            retry.tick().await;
            match Client::connect(addr, &path).await {
                Ok(mut c) => loop {
                    match c.next().await {
                        Event::Frame(ServerFrame::Joined { .. }) => return c,
                        Event::Frame(ServerFrame::Presence { .. }) => continue,
                        Event::Frame(ServerFrame::Error {
                            code: common::ErrorCode::RoomMoved,
                            ..
                        }) => break,
                        Event::Close(code)
                            if common::CloseCode::from_code(code).is_some_and(|c| {
                                c.retry() == common::Retry::ReconnectAndResume
                            }) =>
                        {
                            break
                        }
                        other => panic!("expected joined in {room}, got {other:?}"),
                    }
                },
                Err((421 | 502 | 503, _)) => {}
                Err((status, body)) => panic!("{path}: {status} {body}"),
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "could not join {room} within the wait"
            );
        }
    }
}

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`), with a JSON
/// `Content-Type`; [`request`] sends other headers.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Answer {
    request(
        addr,
        method,
        path,
        body,
        &[("Content-Type", "application/json")],
    )
    .await
}

/// A room (with `stem` in its name) that `ring` places on node `id`.
pub fn room_owned_by(ring: &Ring, id: u16, stem: &str) -> String {
    let base = unique(stem);
    (0..10_000)
        .map(|i| format!("{base}-{i}"))
        .find(|r| ring.owner_id(r) == Some(id))
        .expect("some room lands on every node")
}
