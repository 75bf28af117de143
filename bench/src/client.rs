//! One bench WebSocket connection: URL handling, TCP connect, the HTTP upgrade handshake and
//! the split into a read half and a write half.
//!
//! The halves live in separate tasks (fastwebsockets' read is not cancel-safe, so one task
//! cannot `select!` between reading and a send timer). Control frames the read half owes
//! the peer (pongs, the close echo) travel to the write half over a small channel. This module
//! knows nothing about rooms or statistics and only ever connects to the address it is given.

use std::convert::Infallible;
use std::future::Future;
use std::io::Cursor;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::Bytes;
use common::{ErrorCode, Retry};
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocketError, WebSocketRead, WebSocketWrite};
use http_body_util::Empty;
use hyper::header::{CONNECTION, HOST, UPGRADE};
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, Chain};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// Where the node (or router) is: resolved once, reused by every connection.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written in the URL, for the `Host` header.
    pub authority: String,
    /// Path of the WebSocket endpoint (`/ws` unless the URL names one).
    pub ws_path: String,
}

impl Target {
    /// Parses `ws://host:port[/path]` and resolves the host. `wss` is not supported.
    pub async fn resolve(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("invalid URL {url:?}"))?;
        match uri.scheme_str() {
            Some("ws") | Some("http") => {}
            Some(other) => bail!("unsupported URL scheme {other:?}; use ws://host:port"),
            None => bail!("URL {url:?} has no scheme; use ws://host:port"),
        }
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("URL {url:?} has no host"))?;
        let host = authority.host();
        let port = authority.port_u16().unwrap_or(80);
        let ws_path = match uri.path() {
            "" | "/" => "/ws".to_owned(),
            p => p.to_owned(),
        };
        if uri.query().is_some() {
            bail!("URL {url:?} must not carry a query; the bench adds room and user");
        }
        // Bracketed IPv6 literals resolve once the brackets are removed.
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addr = tokio::net::lookup_host((bare, port))
            .await
            .with_context(|| format!("cannot resolve {host}"))?
            .next()
            .ok_or_else(|| anyhow!("{host} resolved to no address"))?;
        Ok(Target {
            addr,
            authority: format!("{host}:{port}"),
            ws_path,
        })
    }
}

pub type WsRead = WebSocketRead<Chain<Cursor<Bytes>, OwnedReadHalf>>;
pub type WsWrite = WebSocketWrite<OwnedWriteHalf>;
/// Control frames the read half owes the peer, forwarded to the write half.
pub type ControlRx = mpsc::Receiver<Frame<'static>>;

/// Runs hyper's connection driver for the upgrade request on the tokio runtime.
struct SpawnExecutor;

impl<Fut> hyper::rt::Executor<Fut> for SpawnExecutor
where
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    fn execute(&self, fut: Fut) {
        tokio::task::spawn(fut);
    }
}

/// Opens a WebSocket to `target` joined (through the query) to `room` as `user`, within
/// `timeout`. Both names must already be valid ids (they are placed in the URL unescaped).
pub async fn connect(
    target: &Target,
    room: &str,
    user: &str,
    timeout: Duration,
) -> anyhow::Result<(WsRead, WsWrite)> {
    let opts = ConnectOptions {
        credentials: format!("user={user}"),
        ..Default::default()
    };
    connect_as(target, room, &opts, timeout).await
}

/// How one connection is made beyond its room: who it is and where it comes from.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// The upgrade query's credentials, `user=U` or `token=JWT` (see [`crate::auth`]).
    pub credentials: String,
    /// Bind the socket to this local address (port 0) before connecting: each source
    /// address has its own ephemeral ports, which lifts the one-address limit (~28,000
    /// connections) on loopback.
    pub source: Option<IpAddr>,
    /// `SO_RCVBUF` in bytes, set before connecting.
    pub recv_buffer: Option<u32>,
}

/// Opens a WebSocket to `target` joined (through the query) to `room`, as `opts` says,
/// within `timeout`. `room` must already be a valid id (it is placed in the URL unescaped).
pub async fn connect_as(
    target: &Target,
    room: &str,
    opts: &ConnectOptions,
    timeout: Duration,
) -> anyhow::Result<(WsRead, WsWrite)> {
    let query = format!("room={room}&{}", opts.credentials);
    tokio::time::timeout(timeout, connect_inner(target, &query, opts))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
}

/// Like [`connect`], with the whole query given (`room=R&user=U&since=ID`): for clients
/// that resume. Every value must already be URL-safe (valid ids are).
pub async fn connect_query(
    target: &Target,
    query: &str,
    timeout: Duration,
) -> anyhow::Result<(WsRead, WsWrite)> {
    let opts = ConnectOptions::default();
    tokio::time::timeout(timeout, connect_inner(target, query, &opts))
        .await
        .map_err(|_| anyhow!("connect timed out"))?
}

async fn connect_inner(
    target: &Target,
    query: &str,
    opts: &ConnectOptions,
) -> anyhow::Result<(WsRead, WsWrite)> {
    let stream = if opts.recv_buffer.is_none() && opts.source.is_none() {
        TcpStream::connect(target.addr).await?
    } else {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(size) = opts.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        if let Some(ip) = opts.source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("bind {ip}"))?;
        }
        socket.connect(target.addr).await?
    };
    // Each send is one small frame; Nagle would add up to 40 ms to the latency we measure.
    stream.set_nodelay(true)?;
    let req = Request::builder()
        .method("GET")
        .uri(format!("{}?{query}", target.ws_path))
        .header(HOST, &target.authority)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "upgrade")
        .header(
            "Sec-WebSocket-Key",
            fastwebsockets::handshake::generate_key(),
        )
        .header("Sec-WebSocket-Version", "13")
        .body(Empty::<Bytes>::new())?;
    let (ws, _response) = fastwebsockets::handshake::client(&SpawnExecutor, req, stream)
        .await
        .map_err(|e| match e {
            WebSocketError::InvalidStatusCode(s) => anyhow!("upgrade refused: HTTP {s}"),
            other => anyhow!("handshake: {other}"),
        })?;
    // Get the TcpStream back so the halves are split without a lock (tokio::io::split would
    // take one on every read and write). Bytes hyper read past the 101 response (the
    // server's first frames) are kept and read first.
    let upgraded = ws.into_inner().into_inner();
    let parts = upgraded
        .downcast::<TokioIo<TcpStream>>()
        .map_err(|_| anyhow!("upgraded connection is not a TcpStream"))?;
    let (rd, wr) = parts.io.into_inner().into_split();
    let rd = Cursor::new(parts.read_buf).chain(rd);
    Ok(fastwebsockets::after_handshake_split(rd, wr, Role::Client))
}

/// What the read half produced.
pub enum Incoming {
    /// A complete text or binary message (sharing the read buffer, not copied).
    Data(Bytes),
    /// The peer's close frame with its code (1005 when it carried none).
    Close(u16),
    /// Part of a fragmented message: the bench does not reassemble them (the node sends
    /// each frame whole), so the caller counts it as undecodable.
    Fragment,
    /// A pong or other control frame the bench does not use.
    Other,
}

/// The read half plus the channel that carries owed control frames to the writer.
pub struct Reader {
    ws: WsRead,
    control: mpsc::Sender<Frame<'static>>,
}

/// Splits `ws` reading into a [`Reader`] and the receiver the writer must drain.
pub fn reader(ws: WsRead) -> (Reader, ControlRx) {
    let (control, rx) = mpsc::channel(8);
    (Reader { ws, control }, rx)
}

impl Reader {
    /// Reads the next frame. Pings are answered (through the writer) without surfacing here.
    pub async fn next(&mut self) -> Result<Incoming, WebSocketError> {
        let control = &self.control;
        let mut owe = |f: Frame<'static>| {
            // A full or closed channel means the writer is gone or stuck; dropping a pong
            // then is harmless: the connection is ending anyway.
            let _ = control.try_send(f);
            std::future::ready(Ok::<(), Infallible>(()))
        };
        let frame = self.ws.read_frame(&mut owe).await?;
        Ok(match frame.opcode {
            OpCode::Text | OpCode::Binary if frame.fin => Incoming::Data(match frame.payload {
                Payload::Bytes(b) => b.freeze(),
                other => Bytes::copy_from_slice(&other),
            }),
            OpCode::Close => {
                let code = match frame.payload.get(..2) {
                    Some(b) => u16::from_be_bytes([b[0], b[1]]),
                    None => 1005,
                };
                Incoming::Close(code)
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => Incoming::Fragment,
            _ => Incoming::Other,
        })
    }
}

/// What a client does after an error frame carrying `code`: `common`'s table decides
/// ([`common::ErrorCode::retry`]), so the bench retries, resumes or gives up exactly where
/// the protocol says a client should. A code the table does not know (a newer server's) is
/// not retried.
pub fn retry(code: &str) -> Retry {
    ErrorCode::ALL
        .into_iter()
        .find(|c| c.as_str() == code)
        .map_or(Retry::DoNotRetry, ErrorCode::retry)
}

/// An HTTP answer with `status` is worth sending again after a backoff: the table gives
/// that status to a code that says retry later or reconnect (421, 429, 500, 502, 503).
pub fn status_retried(status: u16) -> bool {
    ErrorCode::ALL
        .into_iter()
        .any(|c| c.http_status() == status && c.retry() != Retry::DoNotRetry)
}

/// An upgrade refused with HTTP `status` will be refused again: the table answers with that
/// status only codes that say do not retry (400, 401, 403, 404, 405, 410, 413).
pub fn refusal_is_final(status: u16) -> bool {
    !status_retried(status) && ErrorCode::ALL.iter().any(|c| c.http_status() == status)
}

/// Forwards the control frames the read half owes the peer until `until` resolves, with
/// its output; `None` when the reader ended or a write failed first (the connection is
/// gone).
pub async fn forward_control<T>(
    ws: &mut WsWrite,
    control: &mut ControlRx,
    until: impl Future<Output = T>,
) -> Option<T> {
    tokio::pin!(until);
    loop {
        tokio::select! {
            biased;
            c = control.recv() => {
                ws.write_frame(c?).await.ok()?;
            }
            v = &mut until => return Some(v),
        }
    }
}

/// Writes one text frame from `payload` (masked in place).
pub async fn send_text(ws: &mut WsWrite, payload: &mut [u8]) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::text(Payload::BorrowedMut(payload)))
        .await
}

/// Sends a close frame with `code`.
pub async fn send_close(ws: &mut WsWrite, code: u16, reason: &str) -> Result<(), WebSocketError> {
    ws.write_frame(Frame::close(code, reason.as_bytes())).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn target_parsing() {
        let t = Target::resolve("ws://127.0.0.1:7070")
            .await
            .expect("target");
        assert_eq!(t.ws_path, "/ws");
        assert_eq!(t.authority, "127.0.0.1:7070");
        assert_eq!(t.addr.port(), 7070);
        let t = Target::resolve("ws://127.0.0.1:7070/chat/ws")
            .await
            .expect("target");
        assert_eq!(t.ws_path, "/chat/ws");
        assert!(Target::resolve("wss://127.0.0.1:1").await.is_err());
        assert!(Target::resolve("127.0.0.1:1").await.is_err());
        assert!(Target::resolve("ws://127.0.0.1:1/ws?room=x").await.is_err());
    }

    #[test]
    fn retry_decisions_come_from_the_code_table() {
        assert_eq!(retry("rate_limited"), Retry::RetryLater);
        assert_eq!(retry("room_unavailable"), Retry::RetryLater);
        assert_eq!(retry("room_moved"), Retry::ReconnectAndResume);
        assert_eq!(retry("forbidden"), Retry::DoNotRetry);
        assert_eq!(retry("no_such_code"), Retry::DoNotRetry);
        for final_status in [400, 401, 403, 404, 405, 410, 413] {
            assert!(refusal_is_final(final_status), "{final_status}");
        }
        for retried in [421, 429, 500, 502, 503] {
            assert!(
                !refusal_is_final(retried) && status_retried(retried),
                "{retried}"
            );
        }
        assert!(!refusal_is_final(200) && !status_retried(200) && !status_retried(404));
    }
}
