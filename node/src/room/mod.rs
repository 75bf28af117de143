//! One room's owner task: the single place where the room's messages are ordered.
//!
//! The task assigns ids, dedupes retries by `(sender, cid)`, serializes each broadcast once
//! and enqueues the shared bytes to every member without awaiting any of them, hands batches
//! to the store (one batch in flight, so batches grow under load) and acks senders when the
//! store confirms. It also serves `since` joins: from its in-memory recent window when that
//! covers the gap, otherwise from the store while buffering live messages for the joiner, so
//! the seam has no gap and no duplicate. It never blocks on a client and never does network
//! I/O itself; store calls run in spawned tasks that report back on a bounded channel.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use common::id::now_ms;
use common::{
    metrics as m, ChatMessage, ClientMsgId, CloseCode, ErrorCode, MessageId, PresenceEvent, RoomId,
    ServerFrame, UserId,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant as TokioInstant;

use crate::outbound::{ConnHandle, Out};
use crate::registry::{Registry, RoomCtx};
use crate::store::{HistoryQuery, PageFrom, StoreError};

/// Messages per store read when replaying to a joiner.
const REPLAY_PAGE: usize = 500;
/// Commands handled per wake-up before the task checks its other inputs.
const COMMANDS_PER_WAKE: usize = 256;

/// Where the outcome of a send goes.
pub enum Reply {
    /// A WebSocket sender: gets an `ack` or `error` frame on its outbound queue.
    Conn(Arc<ConnHandle>),
    /// An HTTP publish waiting for its answer.
    Http(oneshot::Sender<Result<Accepted, ErrorCode>>),
}

/// A send the store has made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    pub id: MessageId,
    pub duplicate: bool,
}

#[derive(Debug, Clone, Copy)]
pub enum Source {
    Ws,
    Http,
    /// Forwarded from another node over the bus.
    Bus,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Ws => "ws",
            Source::Http => "http",
            Source::Bus => "bus",
        }
    }
}

pub enum RoomCmd {
    Join {
        conn: Arc<ConnHandle>,
        since: Option<MessageId>,
    },
    Leave {
        conn_id: u64,
        /// Answer with a `left` frame (an explicit leave, not a disconnect).
        notify: bool,
    },
    Send {
        from: UserId,
        cid: ClientMsgId,
        body: String,
        reply: Reply,
        source: Source,
    },
    /// A replay task finished reading the store for a joiner.
    ReplayDone { conn_id: u64, ok: bool },
    /// Stop accepting, flush what was accepted, then (with `close`) close every member with
    /// that code and end. Sent on a ring change (`room_moved`) and on shutdown (no close:
    /// the node closes connections itself once every room has flushed).
    Handoff {
        close: Option<CloseCode>,
        /// Where the room went, for `room_moved` answers.
        owner: Option<String>,
    },
}

impl RoomCmd {
    /// Answers a command the room could not take.
    pub fn refuse(self, room: &RoomId, code: ErrorCode, message: &str) {
        self.refuse_with_owner(room, code, message, None);
    }

    /// [`RoomCmd::refuse`] with the new owner's address for `room_moved`.
    pub fn refuse_with_owner(
        self,
        room: &RoomId,
        code: ErrorCode,
        message: &str,
        owner: Option<&str>,
    ) {
        match self {
            RoomCmd::Join { conn, .. } => {
                conn.send_frame(&ServerFrame::Error {
                    code,
                    message: message.into(),
                    cid: None,
                    room: Some(room.to_string()),
                    owner: owner.map(str::to_owned),
                });
            }
            RoomCmd::Send { reply, cid, .. } => {
                reply.error_with_owner(room, &cid, code, message, owner)
            }
            RoomCmd::Leave { .. } | RoomCmd::ReplayDone { .. } | RoomCmd::Handoff { .. } => {}
        }
    }
}

impl Reply {
    fn ack(self, room: &RoomId, cid: &ClientMsgId, accepted: Accepted) {
        match self {
            Reply::Conn(conn) => {
                conn.send_frame(&ServerFrame::Ack {
                    room: room.clone(),
                    cid: cid.clone(),
                    id: accepted.id,
                    duplicate: accepted.duplicate,
                });
            }
            Reply::Http(tx) => {
                let _ = tx.send(Ok(accepted));
            }
        }
    }

    pub fn error(self, room: &RoomId, cid: &ClientMsgId, code: ErrorCode, message: &str) {
        self.error_with_owner(room, cid, code, message, None);
    }

    pub fn error_with_owner(
        self,
        room: &RoomId,
        cid: &ClientMsgId,
        code: ErrorCode,
        message: &str,
        owner: Option<&str>,
    ) {
        match self {
            Reply::Conn(conn) => {
                conn.send_frame(&ServerFrame::Error {
                    code,
                    message: message.into(),
                    cid: Some(cid.to_string()),
                    room: Some(room.to_string()),
                    owner: owner.map(str::to_owned),
                });
            }
            Reply::Http(tx) => {
                let _ = tx.send(Err(code));
            }
        }
    }
}

enum MemberState {
    Live,
    /// Waiting for a store replay; live frames wait here, in order, until it is done.
    CatchingUp(Vec<Bytes>),
}

struct Member {
    conn: Arc<ConnHandle>,
    state: MemberState,
}

enum DedupeState {
    Pending(Vec<Reply>),
    Durable,
    /// The store refused it; a retry with the same cid re-persists this message (same id)
    /// without delivering it again. Boxed: most entries are `Durable`, and the map's slots
    /// are as large as the largest variant.
    Failed(Box<ChatMessage>),
}

struct DedupeEntry {
    id: MessageId,
    accepted: Instant,
    state: DedupeState,
}

/// A 128-bit digest of (sender, cid) rather than the two strings: one allocation-free key
/// per remembered message, for windows of up to `--dedupe-max-per-room` entries. Two
/// different pairs in one room's window share a digest with probability about n²/2¹²⁹.
type DedupeKey = u128;

fn dedupe_key(from: &UserId, cid: &ClientMsgId) -> DedupeKey {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(from.as_str().as_bytes());
    // Both parts are from a charset without NUL, so the separator keeps pairs distinct.
    h.update(&[0]);
    h.update(cid.as_str().as_bytes());
    h.digest128()
}

struct Recent {
    id: MessageId,
    bytes: Bytes,
    /// The store has answered for it (either way); unsettled entries are never evicted, so
    /// the window always holds everything the store may not have yet.
    settled: bool,
}

struct Persisted {
    batch: Vec<ChatMessage>,
    result: Result<(), StoreError>,
}

struct Room {
    id: RoomId,
    ctx: Arc<RoomCtx>,
    members: HashMap<u64, Member>,
    users: HashMap<UserId, u32>,
    head: MessageId,
    recent: VecDeque<Recent>,
    /// Every message with an id above this is in `recent`.
    recent_floor: MessageId,
    dedupe: HashMap<DedupeKey, DedupeEntry>,
    dedupe_order: VecDeque<(Instant, DedupeKey)>,
    unpersisted: Vec<ChatMessage>,
    inflight: usize,
    persist_tx: mpsc::Sender<Persisted>,
    self_tx: mpsc::WeakSender<RoomCmd>,
    broadcasts: u64,
    handoff: Option<Handoff>,
}

/// A room being handed over: it accepts nothing new and ends once flushed.
struct Handoff {
    close: Option<CloseCode>,
    owner: Option<String>,
}

impl Handoff {
    fn code(&self) -> ErrorCode {
        if self.close == Some(CloseCode::RoomMoved) {
            ErrorCode::RoomMoved
        } else {
            ErrorCode::GoingAway
        }
    }

    fn message(&self) -> &'static str {
        if self.close == Some(CloseCode::RoomMoved) {
            "the room moved to another node; reconnect through the router and resume"
        } else {
            "the node is shutting down; reconnect and resume"
        }
    }
}

/// Runs a room until it is idle (no members, nothing to persist) past the idle timeout.
pub(crate) async fn run(
    id: RoomId,
    generation: u64,
    registry: Arc<Registry>,
    mut rx: mpsc::Receiver<RoomCmd>,
    self_tx: mpsc::WeakSender<RoomCmd>,
) {
    let ctx = registry.ctx().clone();
    let _active = crate::registry::ActiveRoomGuard::new();
    let (persist_tx, mut persist_rx) = mpsc::channel(1);
    let mut room = match Room::activate(id.clone(), ctx.clone(), persist_tx, self_tx).await {
        Ok(room) => room,
        Err(e) => {
            metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
            tracing::warn!(room = %id, error = %e, "room activation failed");
            registry.remove_if(&id, generation, || true);
            rx.close();
            while let Ok(cmd) = rx.try_recv() {
                cmd.refuse(
                    &id,
                    ErrorCode::StoreUnavailable,
                    "store unavailable; join again later",
                );
            }
            return;
        }
    };
    let mut idle_since: Option<TokioInstant> = None;
    loop {
        let idle = room.is_idle();
        if idle && idle_since.is_none() {
            idle_since = Some(TokioInstant::now());
        } else if !idle {
            idle_since = None;
        }
        let idle_deadline = idle_since.map(|t| {
            if ctx.shutdown.is_cancelled() {
                t
            } else {
                t + ctx.config.room_idle_timeout
            }
        });
        tokio::select! {
            biased;
            Some(p) = persist_rx.recv() => room.on_persisted(p),
            cmd = rx.recv() => {
                let Some(cmd) = cmd else { break };
                room.handle(cmd);
                for _ in 1..COMMANDS_PER_WAKE {
                    match rx.try_recv() {
                        Ok(cmd) => room.handle(cmd),
                        Err(_) => break,
                    }
                }
            }
            _ = async { tokio::time::sleep_until(idle_deadline.unwrap_or_else(TokioInstant::now)).await },
                if idle_deadline.is_some() =>
            {
                // Exit only if nobody can have queued a command for us: checked under the
                // registry lock, so a concurrent lookup either sees us gone or sees a
                // non-empty inbox.
                if registry.remove_if(&room.id, generation, || rx.is_empty()) {
                    rx.close();
                    let mut leftovers = Vec::new();
                    while let Ok(cmd) = rx.try_recv() {
                        leftovers.push(cmd);
                    }
                    for cmd in leftovers {
                        registry.dispatch(&room.id, cmd).await;
                    }
                    break;
                }
                idle_since = None;
            }
            _ = ctx.shutdown.cancelled(), if idle_since.is_some() && !ctx.shutdown.is_cancelled() => {
                // Re-evaluate the idle deadline with shutdown's zero timeout.
            }
        }
        room.maybe_persist();
        if room.handed_over() {
            room.close_members();
            registry.remove_if(&room.id, generation, || true);
            rx.close();
            while let Ok(cmd) = rx.try_recv() {
                room.refuse_handoff(cmd);
            }
            break;
        }
    }
    tracing::debug!(room = %room.id, "room closed");
}

impl Room {
    async fn activate(
        id: RoomId,
        ctx: Arc<RoomCtx>,
        persist_tx: mpsc::Sender<Persisted>,
        self_tx: mpsc::WeakSender<RoomCmd>,
    ) -> Result<Room, StoreError> {
        let cfg = &ctx.config;
        let timeout = cfg.store_timeout;
        let read = |q: HistoryQuery| {
            let ctx = ctx.clone();
            let id = id.clone();
            async move {
                match tokio::time::timeout(timeout, ctx.store.read(&id, q)).await {
                    Ok(r) => r,
                    Err(_) => Err(StoreError::Timeout),
                }
            }
        };
        // The newest messages: the room's head and its recent window.
        let newest = read(HistoryQuery {
            after: None,
            before: None,
            limit: cfg.recent_per_room,
            from: PageFrom::Newest,
        })
        .await?;
        let head = newest.last().map_or(MessageId(0), |m| m.id);
        let recent_floor = match newest.first() {
            Some(first) if newest.len() >= cfg.recent_per_room => MessageId(first.id.0 - 1),
            _ => MessageId(0),
        };
        // Client message ids of the dedupe window that the recent window does not cover,
        // so retries after an owner change or restart are still recognised.
        let window_start =
            MessageId::first_at(now_ms().saturating_sub(cfg.dedupe_window.as_millis() as u64));
        let mut older = Vec::new();
        if let Some(first) = newest.first() {
            if newest.len() >= cfg.recent_per_room && first.id > window_start {
                older = read(HistoryQuery {
                    after: Some(MessageId(window_start.0.saturating_sub(1))),
                    before: Some(first.id),
                    limit: cfg.dedupe_max_per_room,
                    from: PageFrom::Newest,
                })
                .await?;
            }
        }
        let mut room = Room {
            id,
            ctx: ctx.clone(),
            members: HashMap::new(),
            users: HashMap::new(),
            head,
            recent: VecDeque::new(),
            recent_floor,
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            unpersisted: Vec::new(),
            inflight: 0,
            persist_tx,
            self_tx,
            broadcasts: 0,
            handoff: None,
        };
        let now = Instant::now();
        for msg in older.iter().chain(newest.iter()) {
            room.remember(
                dedupe_key(&msg.from, &msg.cid),
                DedupeEntry {
                    id: msg.id,
                    accepted: now,
                    state: DedupeState::Durable,
                },
                now,
            );
        }
        for msg in newest {
            room.recent.push_back(Recent {
                id: msg.id,
                bytes: Bytes::from(ServerFrame::encode_message(&msg)),
                settled: true,
            });
        }
        Ok(room)
    }

    fn is_idle(&self) -> bool {
        self.members.is_empty() && self.unpersisted.is_empty() && self.inflight == 0
    }

    fn pending(&self) -> usize {
        self.unpersisted.len() + self.inflight
    }

    fn handle(&mut self, cmd: RoomCmd) {
        match cmd {
            RoomCmd::Join { conn, since } => self.join(conn, since),
            RoomCmd::Leave { conn_id, notify } => self.leave(conn_id, notify),
            RoomCmd::Send {
                from,
                cid,
                body,
                reply,
                source,
            } => self.send(from, cid, body, reply, source),
            RoomCmd::ReplayDone { conn_id, ok } => self.replay_done(conn_id, ok),
            RoomCmd::Handoff { close, owner } => {
                tracing::debug!(room = %self.id, ?close, "handing the room over");
                self.handoff = Some(Handoff { close, owner });
            }
        }
    }

    /// True once a handoff that closes members has flushed: the room can end.
    fn handed_over(&self) -> bool {
        matches!(&self.handoff, Some(h) if h.close.is_some())
            && self.unpersisted.is_empty()
            && self.inflight == 0
    }

    /// Closes every member with the handoff's code (after the flush, so a client that
    /// reconnects elsewhere and retries finds its acked messages in the store).
    fn close_members(&mut self) {
        let Some(code) = self.handoff.as_ref().and_then(|h| h.close) else {
            return;
        };
        for (_, member) in self.members.drain() {
            member.conn.close(code);
        }
        self.users.clear();
    }

    fn refuse_handoff(&self, cmd: RoomCmd) {
        if let Some(h) = &self.handoff {
            cmd.refuse_with_owner(&self.id, h.code(), h.message(), h.owner.as_deref());
        }
    }

    fn join(&mut self, conn: Arc<ConnHandle>, since: Option<MessageId>) {
        if self.handoff.is_some() {
            self.refuse_handoff(RoomCmd::Join { conn, since });
            return;
        }
        let rejoin = self.members.remove(&conn.id).is_some();
        let head = (self.head.0 != 0).then_some(self.head);
        if !conn.send_frame(&ServerFrame::Joined {
            room: self.id.clone(),
            head,
        }) {
            if rejoin {
                self.forget_user(&conn.user);
            }
            return;
        }
        if !rejoin {
            let n = self.users.entry(conn.user.clone()).or_insert(0);
            *n += 1;
            if *n == 1 {
                self.presence(&conn.user, PresenceEvent::Join);
            }
        }
        let state = match since {
            None => MemberState::Live,
            Some(since) if since >= self.head => MemberState::Live,
            Some(since) if since >= self.recent_floor => {
                let frames: Vec<Bytes> = self
                    .recent
                    .iter()
                    .filter(|r| r.id > since)
                    .map(|r| r.bytes.clone())
                    .collect();
                metrics::counter!(m::MESSAGES_REPLAYED).increment(frames.len() as u64);
                if !frames.is_empty() && !conn.deliver(Out::Frames(frames)) {
                    self.forget_user(&conn.user);
                    return;
                }
                MemberState::Live
            }
            Some(since) => {
                // Older than the recent window: the store serves (since, recent_floor], the
                // window and live messages wait in the member's buffer until it is done.
                let buffered: Vec<Bytes> = self.recent.iter().map(|r| r.bytes.clone()).collect();
                self.spawn_replay(conn.clone(), since, self.recent_floor);
                MemberState::CatchingUp(buffered)
            }
        };
        self.members.insert(conn.id, Member { conn, state });
    }

    fn spawn_replay(&self, conn: Arc<ConnHandle>, since: MessageId, upto: MessageId) {
        let ctx = self.ctx.clone();
        let room = self.id.clone();
        let done = self.self_tx.clone();
        ctx.tracker.clone().spawn(async move {
            let mut after = since;
            let mut replayed = 0u64;
            let ok = loop {
                let q = HistoryQuery {
                    after: Some(after),
                    before: Some(MessageId(upto.0 + 1)),
                    limit: REPLAY_PAGE,
                    from: PageFrom::Oldest,
                };
                let page =
                    match tokio::time::timeout(ctx.config.store_timeout, ctx.store.read(&room, q))
                        .await
                    {
                        Ok(Ok(page)) => page,
                        Ok(Err(e)) => {
                            metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
                            tracing::warn!(%room, error = %e, "replay read failed");
                            break false;
                        }
                        Err(_) => {
                            metrics::counter!(m::STORE_ERRORS, "op" => "read").increment(1);
                            tracing::warn!(%room, "replay read timed out");
                            break false;
                        }
                    };
                let Some(last) = page.last() else { break true };
                after = last.id;
                let full = page.len() == REPLAY_PAGE;
                replayed += page.len() as u64;
                let frames = page
                    .iter()
                    .map(|msg| Bytes::from(ServerFrame::encode_message(msg)))
                    .collect();
                if !conn.deliver_wait(Out::Frames(frames)).await {
                    return;
                }
                if !full {
                    break true;
                }
            };
            metrics::counter!(m::MESSAGES_REPLAYED).increment(replayed);
            if let Some(tx) = done.upgrade() {
                let _ = tx
                    .send(RoomCmd::ReplayDone {
                        conn_id: conn.id,
                        ok,
                    })
                    .await;
            }
        });
    }

    fn replay_done(&mut self, conn_id: u64, ok: bool) {
        let Some(member) = self.members.get_mut(&conn_id) else {
            return;
        };
        let MemberState::CatchingUp(buffer) =
            std::mem::replace(&mut member.state, MemberState::Live)
        else {
            return;
        };
        let delivered = if ok {
            buffer.is_empty() || member.conn.deliver(Out::Frames(buffer))
        } else {
            member.conn.send_frame(&ServerFrame::Error {
                code: ErrorCode::StoreUnavailable,
                message: "could not replay history; join again with the same since".into(),
                cid: None,
                room: Some(self.id.to_string()),
                owner: None,
            });
            false
        };
        if !delivered {
            self.leave(conn_id, false);
        }
    }

    fn leave(&mut self, conn_id: u64, notify: bool) {
        let Some(member) = self.members.remove(&conn_id) else {
            return;
        };
        if notify {
            member.conn.send_frame(&ServerFrame::Left {
                room: self.id.clone(),
            });
        }
        self.forget_user(&member.conn.user);
    }

    fn forget_user(&mut self, user: &UserId) {
        if let Some(n) = self.users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.users.remove(user);
                self.presence(user, PresenceEvent::Leave);
            }
        }
    }

    fn presence(&mut self, user: &UserId, event: PresenceEvent) {
        if !self.ctx.config.presence || self.members.is_empty() {
            return;
        }
        let frame = ServerFrame::Presence {
            room: self.id.clone(),
            user: user.clone(),
            event,
        };
        // Members that fail here are closed as slow; their own presence change is not
        // broadcast (that could cascade), their peers see it when they reconnect.
        let dead = self.fanout(Bytes::from(frame.to_json()));
        for id in dead {
            if let Some(member) = self.members.remove(&id) {
                if let Some(n) = self.users.get_mut(&member.conn.user) {
                    *n -= 1;
                    if *n == 0 {
                        self.users.remove(&member.conn.user);
                    }
                }
            }
        }
    }

    /// Enqueues `bytes` to every member; returns the members that could not take it (closed
    /// as slow consumers or already gone).
    fn fanout(&mut self, bytes: Bytes) -> Vec<u64> {
        let cap = self.ctx.config.outbound_queue * 4;
        let mut dead = Vec::new();
        let mut delivered = 0u64;
        self.broadcasts += 1;
        let sample = self.broadcasts % 16 == 0;
        let mut max_fill = 0.0f64;
        for (id, member) in &mut self.members {
            match &mut member.state {
                MemberState::Live => {
                    if sample {
                        max_fill = max_fill.max(member.conn.fill_ratio());
                    }
                    if member.conn.deliver(Out::Frame(bytes.clone())) {
                        delivered += 1;
                    } else {
                        dead.push(*id);
                    }
                }
                MemberState::CatchingUp(buffer) => {
                    if buffer.len() >= cap {
                        member.conn.close_slow();
                        dead.push(*id);
                    } else {
                        buffer.push(bytes.clone());
                        delivered += 1;
                    }
                }
            }
        }
        metrics::counter!(m::MESSAGES_DELIVERED).increment(delivered);
        if sample && !self.members.is_empty() {
            metrics::histogram!(m::QUEUE_FILL_RATIO).record(max_fill);
        }
        dead
    }

    fn send(&mut self, from: UserId, cid: ClientMsgId, body: String, reply: Reply, source: Source) {
        if self.handoff.is_some() {
            self.refuse_handoff(RoomCmd::Send {
                from,
                cid,
                body,
                reply,
                source,
            });
            return;
        }
        if let Reply::Conn(conn) = &reply {
            // The room, not the connection, is the authority on membership (a failed
            // replay removes a member the connection still lists).
            if !self.members.contains_key(&conn.id) {
                reply.error(
                    &self.id,
                    &cid,
                    ErrorCode::NotJoined,
                    "not a member of this room; join again",
                );
                return;
            }
        }
        let key = dedupe_key(&from, &cid);
        let store_ok =
            self.ctx.store_healthy() && self.pending() < self.ctx.config.max_pending_per_room;
        if let Some(entry) = self.dedupe.get_mut(&key) {
            metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
            let id = entry.id;
            match &mut entry.state {
                DedupeState::Durable => reply.ack(
                    &self.id,
                    &cid,
                    Accepted {
                        id,
                        duplicate: true,
                    },
                ),
                DedupeState::Pending(waiters) => waiters.push(reply),
                DedupeState::Failed(_) => {
                    if !store_ok {
                        reply.error(
                            &self.id,
                            &cid,
                            ErrorCode::StoreUnavailable,
                            "store unavailable; retry later with the same cid",
                        );
                        return;
                    }
                    let DedupeState::Failed(msg) =
                        std::mem::replace(&mut entry.state, DedupeState::Pending(vec![reply]))
                    else {
                        return;
                    };
                    entry.accepted = Instant::now();
                    self.unpersisted.push(*msg);
                    self.ctx.add_pending(1);
                }
            }
            return;
        }
        if !self.ctx.store_healthy() {
            reply.error(
                &self.id,
                &cid,
                ErrorCode::StoreUnavailable,
                "store unavailable; retry later with the same cid",
            );
            return;
        }
        if self.pending() >= self.ctx.config.max_pending_per_room {
            reply.error(
                &self.id,
                &cid,
                ErrorCode::StoreUnavailable,
                "store is behind; retry later with the same cid",
            );
            return;
        }
        let accepted = Instant::now();
        let id = self.ctx.ids.next_after(self.head);
        self.head = id;
        let msg = ChatMessage {
            room: self.id.clone(),
            id,
            from,
            cid,
            body,
            ts: now_ms(),
        };
        let bytes = Bytes::from(ServerFrame::encode_message(&msg));
        let dead = self.fanout(bytes.clone());
        for conn_id in dead {
            self.leave(conn_id, false);
        }
        metrics::histogram!(m::FANOUT_SECONDS).record(accepted.elapsed().as_secs_f64());
        metrics::counter!(m::MESSAGES_RECEIVED, "source" => source.label()).increment(1);
        self.recent.push_back(Recent {
            id,
            bytes,
            settled: false,
        });
        self.trim_recent();
        self.remember(
            key,
            DedupeEntry {
                id,
                accepted,
                state: DedupeState::Pending(vec![reply]),
            },
            accepted,
        );
        self.unpersisted.push(msg);
        self.ctx.add_pending(1);
    }

    fn trim_recent(&mut self) {
        while self.recent.len() > self.ctx.config.recent_per_room {
            match self.recent.front() {
                Some(r) if r.settled => {
                    self.recent_floor = r.id;
                    self.recent.pop_front();
                }
                _ => break,
            }
        }
    }

    fn remember(&mut self, key: DedupeKey, entry: DedupeEntry, now: Instant) {
        self.dedupe_order.push_back((now, key));
        self.dedupe.insert(key, entry);
        let window = self.ctx.config.dedupe_window;
        let max = self.ctx.config.dedupe_max_per_room;
        while let Some((at, key)) = self.dedupe_order.front() {
            let expired = now.duration_since(*at) > window || self.dedupe.len() > max;
            if !expired {
                break;
            }
            // Pending entries stay until the store answers; they are bounded by
            // max_pending_per_room.
            if matches!(
                self.dedupe.get(key).map(|e| &e.state),
                Some(DedupeState::Pending(_))
            ) {
                break;
            }
            self.dedupe.remove(key);
            self.dedupe_order.pop_front();
        }
    }

    fn maybe_persist(&mut self) {
        if self.inflight > 0 || self.unpersisted.is_empty() {
            return;
        }
        let n = self.unpersisted.len().min(self.ctx.config.store_batch);
        let batch: Vec<ChatMessage> = self.unpersisted.drain(..n).collect();
        self.inflight = batch.len();
        let ctx = self.ctx.clone();
        let room = self.id.clone();
        let tx = self.persist_tx.clone();
        ctx.tracker.clone().spawn(async move {
            let started = Instant::now();
            let result = match tokio::time::timeout(
                ctx.config.store_timeout,
                ctx.store.append(&room, &batch),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout),
            };
            metrics::histogram!(m::STORE_WRITE_SECONDS).record(started.elapsed().as_secs_f64());
            if let Err(e) = &result {
                metrics::counter!(m::STORE_ERRORS, "op" => "append").increment(1);
                ctx.mark_store_failed();
                tracing::warn!(%room, error = %e, messages = batch.len(), "store write failed");
            }
            let _ = tx.send(Persisted { batch, result }).await;
        });
    }

    fn on_persisted(&mut self, p: Persisted) {
        self.inflight = 0;
        self.ctx.add_pending(-(p.batch.len() as i64));
        let ok = p.result.is_ok();
        for msg in p.batch {
            if let Ok(i) = self.recent.binary_search_by_key(&msg.id, |r| r.id) {
                self.recent[i].settled = true;
            }
            let key = dedupe_key(&msg.from, &msg.cid);
            let Some(entry) = self.dedupe.get_mut(&key) else {
                continue;
            };
            let waiters = match std::mem::replace(&mut entry.state, DedupeState::Durable) {
                DedupeState::Pending(w) => w,
                other => {
                    entry.state = other;
                    continue;
                }
            };
            if ok {
                metrics::histogram!(m::ACK_SECONDS).record(entry.accepted.elapsed().as_secs_f64());
                let id = entry.id;
                for (i, w) in waiters.into_iter().enumerate() {
                    w.ack(
                        &self.id,
                        &msg.cid,
                        Accepted {
                            id,
                            duplicate: i > 0,
                        },
                    );
                }
            } else {
                for w in waiters {
                    w.error(
                        &self.id,
                        &msg.cid,
                        ErrorCode::StoreUnavailable,
                        "store did not confirm the write; retry with the same cid",
                    );
                }
                entry.state = DedupeState::Failed(Box::new(msg));
            }
        }
        self.trim_recent();
    }
}
