//! The client side of every integration test, node's and router's (router's support
//! includes this file by `#[path]`): a server's `run` started in-process on port 0, a
//! WebSocket client, a minimal HTTP/1.1 client, and polling with a deadline. It knows the
//! wire protocol only (`common`), never a server crate.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use common::{ChatMessage, ClientFrame, ServerFrame};
use fastwebsockets::{Frame, OpCode, Payload, WebSocket};
use http_body_util::Empty;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Generous upper bound for anything a test waits for; reaching it fails the test.
pub const WAIT: Duration = Duration::from_secs(30);

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

/// A server's `run(listener, shutdown)` running in this process.
pub struct Served {
    pub addr: SocketAddr,
    pub shutdown: CancellationToken,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl Served {
    /// Spawns `run` on a fresh listener on port 0.
    pub async fn spawn<F>(run: impl FnOnce(TcpListener, CancellationToken) -> F) -> Served
    where
        F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind port 0");
        let addr = listener.local_addr().expect("local addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(listener, shutdown.clone()));
        Served {
            addr,
            shutdown,
            task,
        }
    }

    /// Cancels the server and waits for `run` to return `Ok`.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// [`Served::stop`] for an owner that keeps the value (one that cancels it when dropped).
    pub async fn halt(&mut self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("the server stops within the wait")
            .expect("server task")
            .expect("server run");
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

impl Event {
    /// A text frame decoded, a close frame's code (1005 when it has none); `None` for
    /// the frames a client does not look at (pings, pongs).
    fn of(frame: Frame<'_>) -> Option<Event> {
        match frame.opcode {
            OpCode::Text => Some(Event::Frame(
                serde_json::from_slice(&frame.payload).unwrap_or_else(|e| {
                    panic!(
                        "bad server frame {e}: {:?}",
                        String::from_utf8_lossy(&frame.payload)
                    )
                }),
            )),
            OpCode::Close => Some(Event::Close(match &frame.payload[..] {
                [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
                _ => 1005,
            })),
            _ => None,
        }
    }
}

impl Client {
    /// Connects to `path_and_query`; an HTTP refusal is returned as `Err((status, body))`.
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> Result<Client, (u16, String)> {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        Self::connect_stream(stream, addr, path_and_query).await
    }

    /// Connects `user` to `room` (`/ws?room=…&user=…`, dev auth) and reads its `joined`.
    pub async fn joined(addr: SocketAddr, room: &str, user: &str) -> Client {
        let mut c = Client::connect(addr, &format!("/ws?room={room}&user={user}"))
            .await
            .unwrap_or_else(|(status, body)| panic!("{user} to {room}: {status} {body}"));
        c.expect_joined().await;
        c
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
                // (Only the status is kept if the answer changed meanwhile, e.g. a router
                // that has just learned of a new owner.)
                let again = request(addr, "GET", path_and_query, None, &[]).await;
                let body = if again.status == status {
                    again.body
                } else {
                    String::new()
                };
                Err((status, body))
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

    /// Joins `room` too, over this connection (`since`: resume after that message).
    pub async fn send_join(&mut self, room: &str, since: Option<common::MessageId>) {
        self.send(&ClientFrame::Join {
            room: common::RoomId::new(room).expect("room"),
            since,
        })
        .await;
    }

    pub async fn send_text(&mut self, room: &str, cid: &str, body: &str) {
        self.send(&ClientFrame::Send {
            room: common::RoomId::new(room).expect("room"),
            cid: common::ClientMsgId::new(cid).expect("cid"),
            body: body.into(),
        })
        .await;
    }

    /// The next frame or close, failing the test after [`WAIT`].
    pub async fn next(&mut self) -> Event {
        loop {
            let frame = tokio::time::timeout(WAIT, self.ws.read_frame())
                .await
                .expect("server answered within the wait")
                .expect("read frame");
            if let Some(event) = Event::of(frame) {
                return event;
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
            if let Some(event) = Event::of(frame) {
                return Some(event);
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

    /// The next chat message, skipping presence and acks.
    pub async fn message(&mut self) -> ChatMessage {
        loop {
            match self.frame().await {
                ServerFrame::Message(m) => return m,
                ServerFrame::Presence { .. } | ServerFrame::Ack { .. } => continue,
                f => panic!("expected message, got {f:?}"),
            }
        }
    }

    /// The next ack `(cid, id, duplicate)`, skipping presence and messages.
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
}

/// An HTTP answer read off the wire.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    /// The status line and headers, as sent.
    pub head: String,
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
        json(&self.body)
    }
}

/// A minimal HTTP/1.1 request over a fresh connection (`Connection: close`), with exactly
/// the `headers` given besides `Host`, `Connection` and `Content-Length`.
pub async fn request(
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
         Content-Length: {}\r\n{extra}\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("http answer within the wait")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
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
        head: head.to_string(),
        headers,
        body: body.to_string(),
    }
}

/// Writes `request` (raw bytes: an upgrade with a chosen header, say) on a fresh connection
/// and returns the answer up to the end of its JSON body (the connection may stay open).
pub async fn raw_json_answer(addr: SocketAddr, request: &[u8]) -> String {
    raw_answer_until(addr, request, |answer| answer.ends_with(b"}")).await
}

/// Writes `request` on a fresh connection and reads until `done(what was read)` holds.
pub async fn raw_answer_until(
    addr: SocketAddr,
    request: &[u8],
    done: impl Fn(&[u8]) -> bool,
) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        while !done(&answer) {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before the answer ended");
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("answered within the wait");
    String::from_utf8_lossy(&answer).into_owned()
}

pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// Reads `/metrics` and sums the samples whose line starts with `prefix` (a name,
/// optionally with labels); 0 when there are none.
pub async fn metric(addr: SocketAddr, prefix: &str) -> f64 {
    let r = request(addr, "GET", "/metrics", None, &[]).await;
    assert_eq!(r.status, 200);
    r.body
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Asserts that [`metric`] `prefix` on `addr` is at least `min`.
pub async fn assert_metric_at_least(addr: SocketAddr, prefix: &str, min: f64) {
    let value = metric(addr, prefix).await;
    assert!(value >= min, "{prefix} is {value}, expected at least {min}");
}
