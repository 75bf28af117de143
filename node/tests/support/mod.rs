//! Test harness: an in-process node on port 0 and a small WebSocket/HTTP client that
//! talks to it over real sockets. No fixed ports, no sleeps for readiness.
#![allow(dead_code)]

pub mod cluster;
pub mod faulty;
pub mod receiver;

use std::net::SocketAddr;
use std::time::Duration;

pub use chat_node::config::Config;
use common::{ChatMessage, ClientFrame, ServerFrame};
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

/// The real CQL server's contact points, from `CHAT_CQL_NODES` (set by
/// `deploy/local/test.sh`). Missing means the suite was started the wrong way: fail loudly.
pub fn cql_nodes() -> Vec<String> {
    match std::env::var("CHAT_CQL_NODES") {
        Ok(v) if !v.trim().is_empty() => v.split(',').map(|s| s.trim().to_string()).collect(),
        _ => panic!(
            "CHAT_CQL_NODES is not set: this test needs the real CQL server. \
             Run the suite with deploy/local/test.sh, which starts it."
        ),
    }
}

/// This test binary's keyspace. Rooms are distinct per test within a binary; the keyspace
/// is dropped once per run so a re-run starts empty.
pub fn keyspace() -> String {
    format!("t_{}", env!("CARGO_CRATE_NAME"))
}

/// A node config on the real CQL store, with test defaults (dev auth, port 0).
pub fn config() -> Config {
    let mut c = Config::for_tests();
    c.store = chat_node::config::StoreKind::Scylla;
    c.cql_nodes = cql_nodes();
    c.cql_keyspace = keyspace();
    c
}

static FRESH_KEYSPACE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();

/// Drops this binary's keyspace once per process, before the first node uses it.
pub async fn fresh_keyspace() {
    FRESH_KEYSPACE
        .get_or_init(|| async {
            let session = scylla::client::session_builder::SessionBuilder::new()
                .known_nodes(cql_nodes())
                .build()
                .await
                .expect("connect to the CQL server named by CHAT_CQL_NODES");
            session
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", keyspace()), ())
                .await
                .expect("drop the test keyspace");
        })
        .await;
}

pub struct TestNode {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl TestNode {
    pub async fn start(config: Config) -> TestNode {
        if config.store == chat_node::config::StoreKind::Scylla {
            fresh_keyspace().await;
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(chat_node::run(config, listener, shutdown.clone()));
        TestNode {
            addr,
            shutdown,
            task,
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("node stops within the wait")
            .expect("node task")
            .expect("node run");
    }

    pub async fn connect(&self, room: &str, user: &str) -> Client {
        Client::connect(self.addr, &format!("/ws?room={room}&user={user}"))
            .await
            .expect("connect")
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
    /// Connects to `path_and_query`; an HTTP refusal is returned as `Err((status, body))`.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Result<Client, (u16, String)> {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self::connect_stream(stream, addr, path_and_query).await
    }

    pub async fn connect_stream(
        stream: TcpStream,
        addr: SocketAddr,
        path_and_query: &str,
    ) -> Result<Client, (u16, String)> {
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
        match fastwebsockets::handshake::client(&SpawnExecutor, req, stream).await {
            Ok((mut ws, _)) => {
                ws.set_auto_close(false);
                ws.set_auto_pong(true);
                Ok(Client { ws })
            }
            Err(fastwebsockets::WebSocketError::InvalidStatusCode(status)) => {
                // The handshake helper drops the body; ask again over plain HTTP for it.
                // (Only the status is kept if the answer changed meanwhile, e.g. a router
                // that has just learned of a new owner.)
                let (s, body) = http(addr, "GET", path_and_query, None).await;
                Err((status, if s == status { body } else { String::new() }))
            }
            Err(e) => panic!("handshake failed: {e}"),
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        let bytes = serde_json::to_vec(frame).expect("ser");
        self.send_raw(&bytes).await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.ws
            .write_frame(Frame::text(Payload::Borrowed(bytes)))
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
                    let f: ServerFrame =
                        serde_json::from_slice(&frame.payload).unwrap_or_else(|e| {
                            panic!(
                                "bad server frame {e}: {:?}",
                                String::from_utf8_lossy(&frame.payload)
                            )
                        });
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

    /// [`Client::next`], with `None` when the connection ends without a close frame (reset
    /// or EOF), as when its node is killed.
    pub async fn try_next(&mut self) -> Option<Event> {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.read_frame())
                .await
                .expect("server answered within the wait")
                .ok()?;
            match frame.opcode {
                OpCode::Text => {
                    let f: ServerFrame = serde_json::from_slice(&frame.payload)
                        .unwrap_or_else(|e| panic!("bad server frame: {e}"));
                    return Some(Event::Frame(f));
                }
                OpCode::Close => {
                    let code = if frame.payload.len() >= 2 {
                        u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                    } else {
                        1005
                    };
                    return Some(Event::Close(code));
                }
                _ => continue,
            }
        }
    }

    pub async fn frame(&mut self) -> ServerFrame {
        match self.next().await {
            Event::Frame(f) => f,
            Event::Close(code) => panic!("unexpected close {code}"),
        }
    }

    /// Skips `presence` frames.
    pub async fn frame_skip_presence(&mut self) -> ServerFrame {
        loop {
            match self.frame().await {
                ServerFrame::Presence { .. } => continue,
                f => return f,
            }
        }
    }

    pub async fn expect_joined(&mut self) -> Option<common::MessageId> {
        match self.frame_skip_presence().await {
            ServerFrame::Joined { head, .. } => head,
            f => panic!("expected joined, got {f:?}"),
        }
    }

    pub async fn message(&mut self) -> ChatMessage {
        loop {
            match self.frame().await {
                ServerFrame::Message(m) => return m,
                ServerFrame::Presence { .. } | ServerFrame::Ack { .. } => continue,
                f => panic!("expected message, got {f:?}"),
            }
        }
    }

    pub async fn ack(&mut self) -> (String, common::MessageId, bool) {
        loop {
            match self.frame().await {
                ServerFrame::Ack {
                    cid, id, duplicate, ..
                } => return (cid.to_string(), id, duplicate),
                ServerFrame::Presence { .. } | ServerFrame::Message(_) => continue,
                f => panic!("expected ack, got {f:?}"),
            }
        }
    }

    pub async fn error(&mut self) -> (common::ErrorCode, Option<String>) {
        loop {
            match self.frame().await {
                ServerFrame::Error { code, cid, .. } => return (code, cid),
                ServerFrame::Presence { .. } => continue,
                f => panic!("expected error, got {f:?}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            if let Event::Close(code) = self.next().await {
                return code;
            }
        }
    }

    pub async fn send_text(&mut self, room: &str, cid: &str, body: &str) {
        self.send(&ClientFrame::Send {
            room: common::RoomId::new(room).expect("room"),
            cid: common::ClientMsgId::new(cid).expect("cid"),
            body: body.into(),
        })
        .await;
    }
}

/// Writes `request` (raw bytes: an upgrade with a chosen header, say) on a fresh connection
/// and returns the answer up to the end of its JSON body (the connection may stay open).
pub async fn raw_json_answer(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        while !answer.ends_with(b"}") {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the answer ended");
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("answered within the wait");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A minimal HTTP/1.1 request over a fresh connection; returns status and body.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    http_with_headers(addr, method, path, body, &[]).await
}

pub async fn http_with_headers(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let (status, _, body) = http_exchange(addr, method, path, body, headers).await;
    (status, body)
}

/// As [`http_with_headers`], with the answer's head too (status line and headers, as sent).
pub async fn http_exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("http answer within the wait")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status: u16 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {text}"));
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

/// A room's stored messages, oldest first, read back over the history API (at most 1000),
/// or the status and body of a refusal (a room between owners, say).
pub async fn stored_messages(
    addr: SocketAddr,
    room: &str,
) -> Result<Vec<serde_json::Value>, (u16, String)> {
    let path = format!("/v1/rooms/{room}/messages?user=reader&limit=1000");
    let (status, body) = http(addr, "GET", &path, None).await;
    if status != 200 {
        return Err((status, body));
    }
    Ok(json(&body)["messages"]
        .as_array()
        .expect("messages")
        .clone())
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Reads `/metrics` and returns the value of the first sample whose line starts with
/// `prefix` (a name, optionally with labels), or 0.
pub async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let (status, text) = http(addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    text.lines()
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
