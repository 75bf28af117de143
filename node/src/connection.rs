//! One WebSocket connection after the upgrade: a reader task and a writer task.
//!
//! The reader parses client frames, enforces frame, message and body limits, the send rate
//! and the idle timeout, and turns frames into room commands. The writer drains the bounded
//! outbound queue, writing every waiting frame before one flush, and sends server pings.
//! When either side ends, the connection's token is cancelled and the other ends too; the
//! writer then sends the close frame with the recorded code. Rooms are told about the
//! departure so membership never outlives the socket.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_server::head::Prefixed;
use common::{metrics as m, ClientFrame, CloseCode, ErrorCode, MessageId, RoomId, ServerFrame};
use hyper_util::rt::TokioIo;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::auth::Principal;
use crate::cluster::Route;
use crate::frames::Out;
use crate::outbound::ConnHandle;
use crate::reader::{FrameReader, Incoming, ReadError};
use crate::registry::{RoomHandle, SendFailed};
use crate::room::{Reply, RoomCmd, Source};
use crate::state::NodeState;
use crate::writer::{FrameWriter, BATCH_BYTES, OP_PING, OP_PONG, OP_TEXT};

type Reader = FrameReader<OwnedReadHalf>;
type Writer = FrameWriter<OwnedWriteHalf>;

/// Frames written before one flush, at most.
const WRITE_BATCH: usize = 64;

/// Counts an open connection for as long as it lives, in both the gauge and the node's
/// connection limit.
pub struct ConnGuard {
    state: Arc<NodeState>,
}

impl ConnGuard {
    /// Takes a slot under the connection limit, or `None` when the node is full.
    pub fn acquire(state: &Arc<NodeState>) -> Option<ConnGuard> {
        let max = state.config.max_connections;
        let taken = state
            .open_connections
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |n| (n < max).then_some(n + 1),
            )
            .is_ok();
        if !taken {
            return None;
        }
        metrics::gauge!(m::CONNECTIONS).increment(1.0);
        metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
        Some(ConnGuard {
            state: state.clone(),
        })
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.state
            .open_connections
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

/// What the HTTP layer learned before the upgrade.
pub struct Session {
    pub principal: Principal,
    pub room: RoomId,
    pub since: Option<MessageId>,
}

/// Drives an upgraded connection to its end.
pub async fn serve(
    upgrade: fastwebsockets::upgrade::UpgradeFut,
    state: Arc<NodeState>,
    session: Session,
    guard: ConnGuard,
) {
    let conn_id = state.next_conn_id();
    // At info, so the default filter keeps it: every line a connection logs, at any level,
    // carries its node, connection id and user (and the room's span below it, if any).
    let span = tracing::info_span!(parent: None, "conn", node = state.config.node_id, conn = conn_id, user = %session.principal.user);
    async move {
        let ws = match upgrade.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => "upgrade_failed").increment(1);
                return;
            }
        };
        // Take the TCP stream back from hyper so the halves need no shared lock, keeping
        // any bytes the client sent right behind its upgrade request.
        let Ok(parts) = ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<Prefixed<TcpStream>>>()
        else {
            tracing::error!("upgraded connection is not a TCP stream");
            return;
        };
        // Bytes of the first read that hyper did not take come first, then hyper's buffer.
        let (unread, stream) = parts.io.into_inner().into_parts();
        let read_buf = if unread.is_empty() {
            parts.read_buf
        } else {
            let mut b = parts.read_buf.to_vec();
            b.extend_from_slice(&unread);
            bytes::Bytes::from(b)
        };
        let (read_io, write_io) = stream.into_split();
        let reader = FrameReader::new(read_io, read_buf, state.config.max_frame_bytes);
        let writer = FrameWriter::new(write_io);
        let cancel = state.shutdown_conns.child_token();
        let (handle, rx) = ConnHandle::new(
            conn_id,
            session.principal.user.clone(),
            state.config.outbound_queue,
            cancel,
        );
        let conn = Arc::new(handle.with_byte_budget(state.config.outbound_queue_bytes));
        state.register_conn(&conn);
        let writer_task = tokio::spawn(
            write_loop(writer, rx, conn.clone(), state.clone())
                .instrument(tracing::Span::current()),
        );
        let mut r = ReaderState {
            state: state.clone(),
            conn: conn.clone(),
            principal: session.principal,
            joined: HashMap::new(),
            bucket: TokenBucket::new(state.config.send_rate, state.config.send_burst),
            refusals: TokenBucket::new(state.config.send_rate, state.config.send_burst),
            remote: HashMap::new(),
            bridged_owners: HashSet::new(),
        };
        r.join(session.room, session.since);
        let reason = r.read_loop(reader).await;
        conn.close(reason.unwrap_or(CloseCode::Normal));
        let _ = writer_task.await;
        for (room, _) in r.joined.drain() {
            state
                .registry
                .dispatch(
                    &room,
                    RoomCmd::Leave {
                        conn_id,
                        notify: false,
                    },
                )
                .await;
        }
        if !r.bridged_owners.is_empty() {
            if let Some(bus) = state.bus.get() {
                bus.conn_ended(conn_id, &r.bridged_owners);
            }
        }
        state.unregister_conn(conn_id);
        let label = match (reason, conn.close_code()) {
            (None, _) => "client_closed",
            (_, Some(code)) => code.as_str(),
            (Some(code), None) => code.as_str(),
        };
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => label).increment(1);
        tracing::debug!(reason = label, "connection closed");
        drop(guard);
    }
    .instrument(span)
    .await
}

struct ReaderState {
    state: Arc<NodeState>,
    conn: Arc<ConnHandle>,
    principal: Principal,
    joined: HashMap<RoomId, RoomHandle>,
    /// Sends, joins and leaves the connection may make.
    bucket: TokenBucket,
    /// What refused requests it may still make: each refusal takes one, at the same rate
    /// and burst; a refusal with none left closes the connection with 4029.
    refusals: TokenBucket,
    /// Rooms joined on other nodes through the bus, with their owner.
    remote: HashMap<RoomId, u16>,
    /// Every node this connection joined a room through (each is told when it ends).
    bridged_owners: HashSet<u16>,
}

impl ReaderState {
    /// Reads until the peer goes, misbehaves or the connection is cancelled. Returns the
    /// close code to send, or `None` when the client closed or vanished.
    async fn read_loop(&mut self, mut reader: Reader) -> Option<CloseCode> {
        let idle = self.state.config.idle_timeout;
        let expiry = self.principal.expires_at.map(|exp| {
            let now = common::id::now_ms() / 1000;
            tokio::time::Instant::now() + Duration::from_secs(exp.saturating_sub(now))
        });
        loop {
            // `FrameReader::next` is cancel-safe: bytes read so far stay buffered.
            let incoming = tokio::select! {
                biased;
                _ = self.conn.cancelled() => return self.conn.close_code(),
                _ = async { tokio::time::sleep_until(expiry.unwrap_or_else(tokio::time::Instant::now)).await }, if expiry.is_some() => {
                    return Some(CloseCode::Unauthorized);
                }
                r = tokio::time::timeout(idle, reader.next()) => r,
            };
            let incoming = match incoming {
                Err(_) => return Some(CloseCode::IdleTimeout),
                Ok(Ok(incoming)) => incoming,
                Ok(Err(ReadError::TooLarge)) => {
                    metrics::counter!(m::BAD_INPUT, "kind" => ErrorCode::FrameTooLarge.as_str())
                        .increment(1);
                    return Some(CloseCode::FrameTooLarge);
                }
                Ok(Err(ReadError::Eof | ReadError::Io(_))) => return None,
                Ok(Err(e @ ReadError::Protocol(_))) => {
                    tracing::debug!(error = %e, "protocol error");
                    metrics::counter!(m::BAD_INPUT, "kind" => "protocol_error").increment(1);
                    return Some(CloseCode::ProtocolError);
                }
            };
            match incoming {
                Incoming::Text(bytes) => self.on_text(&bytes),
                Incoming::Ping(payload) => {
                    self.conn.deliver(Out::Pong(payload));
                }
                Incoming::Pong => {}
                // The client closed: answer with 1000 and end.
                Incoming::Close(_) => return None,
                Incoming::Binary => self.bad_input(
                    ServerFrame::error(
                        ErrorCode::BadJson,
                        "binary frames are not supported; send JSON text frames",
                    ),
                    ErrorCode::BadJson,
                ),
            }
        }
    }

    fn bad_input(&self, frame: ServerFrame, code: ErrorCode) {
        metrics::counter!(m::BAD_INPUT, "kind" => code.as_str()).increment(1);
        self.conn.send_frame(&frame);
    }

    fn on_text(&mut self, bytes: &[u8]) {
        match ClientFrame::parse(bytes, self.state.config.max_body_bytes) {
            Err(e) => {
                let code = e.code;
                self.bad_input(e.into(), code);
            }
            // Answered at once, with no rate token: it costs what a bad frame costs, and a
            // rate-limited client must still be able to tell that its connection is alive.
            Ok(ClientFrame::Ping) => {
                self.conn.send_frame(&ServerFrame::Pong);
            }
            Ok(ClientFrame::Join { room, since }) => {
                if self.take_token(&room, None) {
                    self.join(room, since);
                }
            }
            Ok(ClientFrame::Leave { room }) => {
                if !self.take_token(&room, None) {
                    return;
                }
                if let Some(owner) = self.remote.remove(&room) {
                    if let Some(bus) = self.state.bus.get() {
                        bus.leave(&self.conn, owner, room);
                    }
                    return;
                }
                if self.joined.remove(&room).is_none() {
                    self.error(
                        ErrorCode::NotJoined,
                        "not joined to this room",
                        None,
                        Some(&room),
                    );
                    return;
                }
                let cmd = RoomCmd::Leave {
                    conn_id: self.conn.id,
                    notify: true,
                };
                let state = self.state.clone();
                // A leave must reach the room even when its inbox is momentarily full.
                tokio::spawn(async move { state.registry.dispatch(&room, cmd).await });
            }
            Ok(ClientFrame::Send { room, cid, body }) => {
                tracing::debug!(%room, %cid, bytes = body.len(), "send received");
                if let Some(&owner) = self.remote.get(&room) {
                    if !self.take_token(&room, Some(&cid)) {
                        return;
                    }
                    if let Some(bus) = self.state.bus.get() {
                        bus.send(&self.conn, owner, room, cid, body);
                    }
                    return;
                }
                let Some(handle) = self.joined.get(&room).cloned() else {
                    self.error(
                        ErrorCode::NotJoined,
                        "join the room before sending to it",
                        Some(cid.as_str()),
                        Some(&room),
                    );
                    return;
                };
                if !self.take_token(&room, Some(&cid)) {
                    return;
                }
                let cmd = RoomCmd::Send {
                    from: self.conn.user.clone(),
                    cid,
                    body,
                    reply: Reply::Conn(self.conn.clone()),
                    source: Source::Ws,
                };
                let result = match handle.try_send(cmd) {
                    Ok(()) => Ok(()),
                    Err(SendFailed::Full(cmd)) => {
                        metrics::counter!(m::ROOM_INBOX_FULL).increment(1);
                        Err(cmd)
                    }
                    Err(SendFailed::Closed(cmd)) => self.state.registry.try_dispatch(&room, cmd),
                };
                if let Err(cmd) = result {
                    cmd.refuse(
                        &room,
                        ErrorCode::Overloaded,
                        "room is overloaded; retry later with the same cid",
                    );
                }
            }
        }
    }

    fn join(&mut self, room: RoomId, since: Option<MessageId>) {
        if !self.may_join(&room) {
            return;
        }
        match self.state.cluster.route(&room) {
            Route::Local => {}
            Route::Elsewhere(owner) => {
                if self.state.bus.get().is_some() {
                    self.join_remote(room, since, owner.id);
                    return;
                }
                self.conn.send_frame(&ServerFrame::Error {
                    code: ErrorCode::RoomMoved,
                    message:
                        "another node owns this room; join it through a connection to that node"
                            .into(),
                    cid: None,
                    room: Some(room.to_string()),
                    owner: Some(owner.addr),
                });
                return;
            }
            Route::Unavailable => {
                self.error(
                    ErrorCode::RoomUnavailable,
                    "this node holds no lease for the room right now; join again shortly",
                    None,
                    Some(&room),
                );
                return;
            }
        }
        let cmd = RoomCmd::Join {
            conn: self.conn.clone(),
            since,
        };
        let handle = self.state.registry.handle(&room);
        let result = match handle.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(SendFailed::Full(cmd)) => Err(cmd),
            Err(SendFailed::Closed(cmd)) => self.state.registry.try_dispatch(&room, cmd),
        };
        match result {
            Ok(()) => {
                self.joined.insert(room, handle);
            }
            Err(cmd) => cmd.refuse(
                &room,
                ErrorCode::Overloaded,
                "room is overloaded; join again later",
            ),
        }
    }

    /// Spends one request (a send, join or leave) from the rate budget, or answers
    /// `rate_limited`; a client whose refused requests outrun the budget too (more than a
    /// burst of them not yet paid back at the rate) is closed with 4029.
    fn take_token(&mut self, room: &RoomId, cid: Option<&common::ClientMsgId>) -> bool {
        if self.bucket.take() {
            return true;
        }
        metrics::counter!(m::BAD_INPUT, "kind" => ErrorCode::RateLimited.as_str()).increment(1);
        self.error(
            ErrorCode::RateLimited,
            match cid {
                Some(_) => "send rate exceeded; retry later with the same cid",
                None => "request rate exceeded; retry the join or leave later",
            },
            cid.map(|c| c.as_str()),
            Some(room),
        );
        if !self.refusals.take() {
            self.conn.close(CloseCode::RateLimited);
        }
        false
    }

    /// The checks every join passes, local or bridged: the token allows the room, and the
    /// connection is under its joined-room limit (local and remote rooms together).
    fn may_join(&self, room: &RoomId) -> bool {
        if !self.principal.may_use(room) {
            self.error(
                ErrorCode::Forbidden,
                "the token does not allow this room",
                None,
                Some(room),
            );
            return false;
        }
        let already = self.joined.contains_key(room) || self.remote.contains_key(room);
        if !already
            && self.joined.len() + self.remote.len() >= self.state.config.max_rooms_per_connection
        {
            self.error(
                ErrorCode::Overloaded,
                "joined-room limit reached for this connection; leave a room first",
                None,
                Some(room),
            );
            return false;
        }
        true
    }

    /// Joins a room owned by another node through the bus (see `bus/bridge.rs`).
    fn join_remote(&mut self, room: RoomId, since: Option<MessageId>, owner: u16) {
        let Some(bus) = self.state.bus.get() else {
            return;
        };
        self.bridged_owners.insert(owner);
        if bus.join(&self.conn, owner, room.clone(), since) {
            self.remote.insert(room, owner);
        }
    }

    fn error(&self, code: ErrorCode, message: &str, cid: Option<&str>, room: Option<&RoomId>) {
        if matches!(code, ErrorCode::NotJoined | ErrorCode::Forbidden) {
            metrics::counter!(m::BAD_INPUT, "kind" => code.as_str()).increment(1);
        }
        self.conn.send_frame(&ServerFrame::Error {
            code,
            message: message.into(),
            cid: cid.map(str::to_owned),
            room: room.map(|r| r.to_string()),
            owner: None,
        });
    }
}

async fn write_loop(
    mut ws: Writer,
    mut rx: mpsc::Receiver<Out>,
    conn: Arc<ConnHandle>,
    state: Arc<NodeState>,
) {
    let mut ping = tokio::time::interval(state.config.ping_interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let write_timeout = state.config.write_timeout;
    loop {
        let first = tokio::select! {
            biased;
            _ = conn.cancelled() => break,
            out = rx.recv() => match out {
                Some(out) => Some(out),
                None => break,
            },
            _ = ping.tick() => None,
        };
        match first {
            Some(out) => write_out(&mut ws, out, &conn),
            None => ws.push(OP_PING, b""),
        }
        for _ in 1..WRITE_BATCH {
            if conn.is_closed() || ws.batch_len() >= BATCH_BYTES {
                break;
            }
            match rx.try_recv() {
                Ok(out) => write_out(&mut ws, out, &conn),
                Err(_) => break,
            }
        }
        match flush(&mut ws, &conn, write_timeout).await {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                tracing::debug!("peer accepted no bytes within the write timeout");
                conn.close_slow();
                return;
            }
            Err(e) => {
                tracing::debug!(error = %e, "write failed");
                conn.cancel_silently();
                return;
            }
        }
    }
    let Some(code) = conn.close_code() else {
        return;
    };
    // What was queued before the close is written before the close frame (errors and acks
    // the client is owed), except for a slow consumer: its queue is what it could not take,
    // and it resumes with `since`.
    if code != CloseCode::SlowConsumer {
        while let Ok(out) = rx.try_recv() {
            write_out(&mut ws, out, &conn);
        }
    }
    // Free the queue (and the shared frames it holds) before the slow part.
    drop(rx);
    let started = Instant::now();
    ws.push_close(code.code(), code.as_str());
    // A client that starts reading again within the write timeout gets the close frame
    // (after whatever of its last batch was still unwritten); only one that takes no bytes
    // for that long is dropped without it.
    if ws.flush(write_timeout).await.is_err() {
        tracing::debug!(waited = ?started.elapsed(), "close frame not delivered");
    }
}

/// Flushes the batch; a close decided meanwhile (say, as a slow consumer) restarts the
/// wait, so a client that reads again within the write timeout of the close gets the
/// close frame after its batch.
async fn flush(ws: &mut Writer, conn: &ConnHandle, stall: Duration) -> std::io::Result<()> {
    if conn.is_closed() {
        return ws.flush(stall).await;
    }
    tokio::select! {
        r = ws.flush(stall) => r,
        _ = conn.cancelled() => ws.flush(stall).await,
    }
}

/// Encodes a queued item into the batch; its bytes leave the connection's budget.
fn write_out(ws: &mut Writer, out: Out, conn: &ConnHandle) {
    conn.refund(out.len());
    match out {
        Out::Frame(bytes) => ws.push(OP_TEXT, &bytes),
        Out::Frames(frames) | Out::Shared(frames) => {
            for bytes in frames {
                ws.push(OP_TEXT, &bytes);
            }
        }
        Out::Pong(payload) => ws.push(OP_PONG, &payload),
    }
}

/// A per-connection send budget: `rate` tokens a second, at most `burst` saved.
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.take_at(now)
    }

    fn take_at(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(10.0, 3.0);
        let t0 = b.last;
        assert!(b.take_at(t0));
        assert!(b.take_at(t0));
        assert!(b.take_at(t0));
        assert!(!b.take_at(t0));
        assert!(b.take_at(t0 + Duration::from_millis(100)));
        assert!(!b.take_at(t0 + Duration::from_millis(100)));
        // Saved tokens never exceed the burst.
        assert!(b.take_at(t0 + Duration::from_secs(60)));
        assert!(b.take_at(t0 + Duration::from_secs(60)));
        assert!(b.take_at(t0 + Duration::from_secs(60)));
        assert!(!b.take_at(t0 + Duration::from_secs(60)));
    }
}
