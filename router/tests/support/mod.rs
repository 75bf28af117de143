//! Test harness: real chat-node processes on the real CQL server, membership in the real
//! Redis, the router in-process on port 0, and a small WebSocket/HTTP client talking to
//! them over real sockets. No fixed ports, no sleeps for readiness: everything is polled
//! with a deadline. Children are killed by Drop guards.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use chat_router::RouterConfig;
use chat_server::membership::{MembershipConfig, Registration};
use common::{ChatMessage, ClientFrame, NodeInfo, Ring, ServerFrame};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous upper bound for anything a test waits for; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(30);

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

/// The chat-node binary beside ours. `cargo test -p chat-router` builds only this
/// package's binaries, so it is built here once per test binary (a no-op after
/// `cargo test --workspace`, which built it already).
pub fn node_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let router = Path::new(env!("CARGO_BIN_EXE_chat-router"));
        let dir = router.parent().expect("the router binary has a directory");
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
    pub id: u16,
    pub addr: SocketAddr,
    child: Child,
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
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
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
    let bin = node_bin();
    let _one_at_a_time = SPAWN.lock().await;
    let mut child = Command::new(bin)
        .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--insecure-dev-auth", "--cql-nodes", &cql_nodes()])
        .args(["--cql-keyspace", KEYSPACE, "--node-id", &id.to_string()])
        .env("CHAT_REDIS_URL", redis_url())
        .env("CHAT_REDIS_PREFIX", prefix)
        .env("CHAT_MEMBERSHIP_TTL", "2s")
        .env_remove("CHAT_LISTEN")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn chat-node");
    let stdout = child.stdout.take().expect("stdout");
    let mut proc = NodeProc {
        id,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        child,
    };
    let read = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                return None;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if let Some(addr) = v["fields"]["addr"].as_str().and_then(|a| a.parse().ok()) {
                break addr;
            }
        };
        // Keep draining the log so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Some(addr)
    });
    match tokio::time::timeout(WAIT, read).await {
        Ok(Ok(Some(addr))) => proc.addr = addr,
        Ok(_) => panic!("chat-node {id} exited before logging its address"),
        Err(_) => {
            proc.kill();
            panic!("chat-node {id} did not log its address within {WAIT:?}");
        }
    }
    proc
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
pub struct TestRouter {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestRouter {
    pub fn config(prefix: &str) -> RouterConfig {
        RouterConfig::for_tests(&redis_url(), prefix)
    }

    pub async fn start(config: RouterConfig) -> TestRouter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chat_router::run(config, listener, shutdown.clone()));
        TestRouter {
            addr,
            shutdown,
            task: Some(task),
        }
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
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        tokio::time::timeout(WAIT, task)
            .await
            .expect("router stops within the wait")
            .expect("router task")
            .expect("router run");
    }
}

impl Drop for TestRouter {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: std::future::Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::spawn(fut);
    }
}

pub struct Client {
    pub ws: WebSocket<TokioIo<Upgraded>>,
}

/// What a read from the server produced.
#[derive(Debug)]
pub enum Event {
    Frame(ServerFrame),
    Close(u16),
}

impl Client {
    /// Opens a WebSocket to `path_and_query`; an HTTP refusal is `Err((status, body))`.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Result<Client, (u16, String)> {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        let req = hyper::Request::builder()
            .method("GET")
            .uri(format!("http://{addr}{path_and_query}"))
            .header("Host", addr.to_string())
            .header(hyper::header::UPGRADE, "websocket")
            .header(hyper::header::CONNECTION, "upgrade")
            .header(
                "Sec-WebSocket-Key",
                fastwebsockets::handshake::generate_key(),
            )
            .header("Sec-WebSocket-Version", "13")
            .body(Empty::<bytes::Bytes>::new())
            .expect("request");
        let handshake = fastwebsockets::handshake::client(&SpawnExecutor, req, stream);
        match tokio::time::timeout(WAIT, handshake)
            .await
            .expect("handshake answered within the wait")
        {
            Ok((mut ws, _)) => {
                ws.set_auto_close(false);
                ws.set_auto_pong(true);
                Ok(Client { ws })
            }
            Err(fastwebsockets::WebSocketError::InvalidStatusCode(status)) => {
                // The handshake helper drops the body; ask again over plain HTTP for it.
                let r = http(addr, "GET", path_and_query, None).await;
                Err((status, r.body))
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    }

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

    pub async fn send_text(&mut self, room: &str, cid: &str, body: &str) {
        let frame = ClientFrame::Send {
            room: common::RoomId::new(room).expect("room"),
            cid: common::ClientMsgId::new(cid).expect("cid"),
            body: body.into(),
        };
        let bytes = serde_json::to_vec(&frame).expect("ser");
        self.ws
            .write_frame(Frame::text(Payload::Owned(bytes)))
            .await
            .expect("write");
    }

    /// The next frame or close, failing the test after [`WAIT`].
    pub async fn next(&mut self) -> Event {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.read_frame())
                .await
                .expect("server answered within the wait")
                .expect("read frame");
            match frame.opcode {
                OpCode::Text => {
                    let f: ServerFrame = serde_json::from_slice(&frame.payload)
                        .unwrap_or_else(|e| panic!("bad server frame: {e}"));
                    return Event::Frame(f);
                }
                OpCode::Close => {
                    let code = if frame.payload.len() >= 2 {
                        u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                    } else {
                        1005
                    };
                    return Event::Close(code);
                }
                _ => continue,
            }
        }
    }

    /// The next chat message, skipping presence and acks.
    pub async fn message(&mut self) -> ChatMessage {
        loop {
            match self.next().await {
                Event::Frame(ServerFrame::Message(m)) => return m,
                Event::Frame(ServerFrame::Presence { .. } | ServerFrame::Ack { .. }) => continue,
                other => panic!("expected a message, got {other:?}"),
            }
        }
    }

    /// The next ack, skipping presence and messages.
    pub async fn ack(&mut self) -> (String, common::MessageId) {
        loop {
            match self.next().await {
                Event::Frame(ServerFrame::Ack { cid, id, .. }) => return (cid.to_string(), id),
                Event::Frame(ServerFrame::Presence { .. } | ServerFrame::Message(_)) => continue,
                other => panic!("expected an ack, got {other:?}"),
            }
        }
    }
}

/// An HTTP answer read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
}

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Answer {
    http_with(
        addr,
        method,
        path,
        body,
        &[("Content-Type", "application/json")],
    )
    .await
}

/// As [`http`], with the given headers instead of a JSON `Content-Type`.
pub async fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or("");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         {extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("http answer within the wait")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("bad response: {text}"));
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {text}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Reads `/metrics` and sums the samples whose line starts with `prefix`.
pub async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let r = http(addr, "GET", "/metrics", None).await;
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Polls `cond` until it holds, failing the test after [`WAIT`].
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        poll.tick().await;
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
    }
}

/// A room (with `stem` in its name) that `ring` places on node `id`.
pub fn room_owned_by(ring: &Ring, id: u16, stem: &str) -> String {
    let base = unique(stem);
    (0..10_000)
        .map(|i| format!("{base}-{i}"))
        .find(|r| ring.owner_id(r) == Some(id))
        .expect("some room lands on every node")
}
