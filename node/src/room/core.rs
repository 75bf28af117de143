//! The room as a state machine: the one place where a room's messages are ordered, and
//! where it is decided whether this node may still order them.
//!
//! [`RoomCore`] takes a command or an event together with the current time and decides. It
//! assigns ids, dedupes retries by `(sender, cid)`, serializes each broadcast once and
//! enqueues the shared bytes to every member's bounded queue without waiting (a member that
//! cannot take it is closed as slow), acks senders once the store has confirmed, and serves
//! `since` joins from its recent window or by asking for a store replay while it buffers live
//! messages for the joiner, so the seam has no gap and no duplicate. Store work is handed to
//! the driver as [`Action`]s ([`RoomCore::poll_action`]) and its results come back through
//! [`RoomCore::on_persisted`] and [`RoomCore::on_replay_done`].
//!
//! Every entry point first checks the room's [`Grant`] at the instant it is given. The first
//! time the grant is not valid the room is *fenced*, for good: it assigns no id, delivers
//! nothing new and acks nothing; what it accepted but did not store is dropped with
//! `room_moved`; a write already in flight is waited for and not acked even if it succeeded
//! (only the next owner may answer the retry, since this node cannot know whether that owner
//! loaded the room before or after the write); members are closed with `room_moved` (4001);
//! and the room ends once nothing is in flight.
//!
//! It must not await, spawn, read a clock to decide anything, or touch the store, Redis or
//! the registry: the driver in `room/mod.rs` does all of that. Answers to members and senders
//! go through [`ConnHandle`] and [`Reply`], which are non-blocking in-memory queues.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::id::now_ms;
use common::protocol::JOINED_USERS_MAX;
use common::{
    metrics as m, ChatMessage, ClientMsgId, CloseCode, ErrorCode, MessageId, PresenceEvent, RoomId,
    ServerFrame, UserId,
};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::cmd::{Accepted, Reply, RoomCmd, RoomPresence, Source, StateChange, PRESENCE_LIST_MAX};
use super::ctx::RoomCtx;
use super::dedupe::{self, State};
use crate::bus::link::Link;
use crate::bus::wire::Item;
use crate::frames::Out;
use crate::outbound::ConnHandle;
use crate::ownership::Grant;
use crate::store::RoomState;

/// The answer to senders whose message this room will never store.
const FENCED_SEND: &str =
    "not stored: this node no longer holds the room; reconnect through the router and resend with the same cid";
/// The answer to senders whose write this room will not confirm (it may or may not be in
/// the store; the next owner knows, and dedupes the retry).
const FENCED_ACK: &str =
    "not acknowledged: this node lost the room before it could confirm the write; reconnect through the router and resend with the same cid";
const ROOM_ENDED: &str =
    "the room has ended: no more joins or sends (its history stays readable); do not rejoin";
const FENCED_JOIN: &str =
    "this node no longer holds the room; reconnect through the router and join again with since";

/// Store work for the driver.
#[derive(Debug)]
pub(crate) enum Action {
    /// Write this batch (at most one is in flight), then call [`RoomCore::on_persisted`].
    Persist(Vec<ChatMessage>),
    /// Deliver to `conn` the stored messages in `(since, upto]`, oldest first, then call
    /// [`RoomCore::on_replay_done`]. Live messages wait in the member's buffer meanwhile.
    Replay {
        conn: Arc<ConnHandle>,
        since: MessageId,
        upto: MessageId,
    },
    /// Write the room's lifecycle state (at most one is in flight), then call
    /// [`RoomCore::on_state_saved`].
    SaveState(RoomState),
}

/// Why a batch is not in the store.
#[derive(Debug)]
pub(crate) enum NotStored {
    /// The store refused it or did not answer in time (the driver has logged why).
    Store,
    /// The driver did not write it: the grant was no longer valid when the write was due.
    Fenced,
}

/// What the driver read from the store before the room could start.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// The newest messages, oldest first, at most `--recent-per-room`.
    pub(crate) newest: Vec<ChatMessage>,
    /// Older messages of the dedupe window that `newest` does not cover, oldest first.
    pub(crate) older: Vec<ChatMessage>,
    /// Its lifecycle state, and how long from now its expiry is (zero: passed).
    pub(crate) state: RoomState,
    pub(crate) expires_in: Option<Duration>,
}

/// A lifecycle change the store is writing.
struct Saving {
    state: RoomState,
    expiry: Option<Instant>,
    reply: oneshot::Sender<Result<RoomState, ErrorCode>>,
}

enum MemberState {
    Live,
    /// Waiting for a store replay; live frames wait here, in order, until it is done. Their
    /// bytes are charged to the connection's budget (`bytes` of them).
    CatchingUp {
        window: Vec<Bytes>,
        frames: Vec<Bytes>,
        bytes: usize,
    },
}

struct Member {
    conn: Arc<ConnHandle>,
    state: MemberState,
}

struct Recent {
    id: MessageId,
    bytes: Bytes,
    /// The store has answered for it (either way); unsettled entries are never evicted, so
    /// the window always holds everything the store may not have yet.
    settled: bool,
}

/// A room being handed over: it accepts nothing new and ends once flushed.
struct Handoff {
    close: Option<CloseCode>,
    owner: Option<String>,
    owner_id: Option<u16>,
    /// Past this, what is still unpersisted is dropped rather than wait for a slow store;
    /// `None` once passed.
    deadline: Option<Instant>,
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

    fn dropped_message(&self) -> &'static str {
        if self.close == Some(CloseCode::RoomMoved) {
            "not stored: the room moved before the store confirmed it; reconnect through the router and resend with the same cid"
        } else {
            "not stored: the node is shutting down and the store did not confirm it in time; reconnect and resend with the same cid"
        }
    }
}

/// Set once the grant has lapsed.
struct Fence {
    /// The room's owner now, as far as this node knows, for `room_moved` answers.
    owner: Option<String>,
}

pub(crate) struct RoomCore {
    id: RoomId,
    ctx: Arc<RoomCtx>,
    grant: Grant,
    members: HashMap<u64, Member>,
    users: HashMap<UserId, u32>,
    head: MessageId,
    recent: VecDeque<Recent>,
    /// Every message with an id above this is in `recent`.
    recent_floor: MessageId,
    dedupe: dedupe::Window,
    /// Accepted, delivered, not yet handed to the store.
    unpersisted: Vec<ChatMessage>,
    /// Messages in the batch the store is writing now (0: none).
    inflight: usize,
    replays: VecDeque<Action>,
    broadcasts: u64,
    /// New messages accepted so far (the driver times fan-out by watching it move).
    accepted: u64,
    handoff: Option<Handoff>,
    fence: Option<Fence>,
    ended: bool,
    /// The stored lifecycle state, and the instant its expiry falls at.
    state: RoomState,
    expiry: Option<Instant>,
    saving: Option<Saving>,
    /// The state of `saving`, until the driver has taken it.
    save_due: Option<RoomState>,
    /// The room has ended and its members have been told and dropped.
    members_ended: bool,
}

impl RoomCore {
    /// A room holding `grant`, restored from what the driver loaded.
    pub(crate) fn new(
        id: RoomId,
        ctx: Arc<RoomCtx>,
        grant: Grant,
        loaded: Loaded,
        now: Instant,
    ) -> RoomCore {
        let cfg = &ctx.config;
        let Loaded {
            newest,
            older,
            state,
            expires_in,
        } = loaded;
        let head = newest.last().map_or(MessageId(0), |m| m.id);
        let recent_floor = match newest.first() {
            Some(first) if newest.len() >= cfg.recent_per_room => MessageId(first.id.0 - 1),
            _ => MessageId(0),
        };
        let mut dedupe = dedupe::Window::new(cfg.dedupe_window, cfg.dedupe_max_per_room);
        for msg in older.iter().chain(newest.iter()) {
            dedupe.remember(
                dedupe::key(&msg.from, &msg.cid),
                msg.id,
                now,
                State::Durable,
                now,
            );
        }
        let recent = newest
            .iter()
            .map(|msg| Recent {
                id: msg.id,
                bytes: Bytes::from(ServerFrame::encode_message(msg)),
                settled: true,
            })
            .collect();
        RoomCore {
            id,
            ctx,
            grant,
            members: HashMap::new(),
            users: HashMap::new(),
            head,
            recent,
            recent_floor,
            dedupe,
            unpersisted: Vec::new(),
            inflight: 0,
            replays: VecDeque::new(),
            broadcasts: 0,
            accepted: 0,
            handoff: None,
            fence: None,
            ended: false,
            state,
            expiry: expires_in.map(|d| now + d),
            saving: None,
            save_due: None,
            members_ended: false,
        }
    }

    // ------------------------------------------------------------------------------------
    // Entry points. Each checks the grant at `now` before anything else.
    // ------------------------------------------------------------------------------------

    pub(crate) fn handle(&mut self, cmd: RoomCmd, now: Instant) {
        if !self.holds(now) {
            self.refuse_fenced(cmd);
            return;
        }
        self.check_expiry(now);
        match cmd {
            RoomCmd::Join { conn, since } => self.join(conn, since),
            RoomCmd::Leave { conn_id, notify } => self.leave(conn_id, notify),
            RoomCmd::Send {
                from,
                cid,
                body,
                reply,
                source,
            } => self.send(from, cid, body, reply, source, now),
            RoomCmd::Presence { reply } => {
                let _ = reply.send(self.presence_list());
            }
            RoomCmd::SetState { change, reply } => self.set_state(change, reply, now),
            RoomCmd::Wake => {}
            RoomCmd::ReplayDone { conn_id, ok } => self.replay_done(conn_id, ok),
            RoomCmd::Handoff {
                close,
                owner,
                owner_id,
            } => self.begin_handoff(close, owner, owner_id, now),
        }
        self.settle();
    }

    /// The result of an [`Action::Persist`].
    pub(crate) fn on_persisted(
        &mut self,
        batch: Vec<ChatMessage>,
        result: Result<(), NotStored>,
        now: Instant,
    ) {
        self.inflight = 0;
        self.ctx.add_pending(-(batch.len() as i64));
        // The driver saw the grant lapse before the write: that is this room's lapse too,
        // whatever the lease says by now.
        if matches!(result, Err(NotStored::Fenced)) {
            self.fence_now();
        }
        if !self.holds(now) {
            // Written or not, no ack: the next owner answers the retries.
            for msg in batch {
                self.withhold(&msg);
            }
            self.settle();
            return;
        }
        let ok = result.is_ok();
        for msg in batch {
            if let Ok(i) = self.recent.binary_search_by_key(&msg.id, |r| r.id) {
                self.recent[i].settled = true;
            }
            let key = dedupe::key(&msg.from, &msg.cid);
            let Some(entry) = self.dedupe.get_mut(&key) else {
                continue;
            };
            let waiters = match std::mem::replace(&mut entry.state, State::Durable) {
                State::Pending(w) => w,
                other => {
                    entry.state = other;
                    continue;
                }
            };
            if ok {
                metrics::histogram!(m::ACK_SECONDS)
                    .record(now.saturating_duration_since(entry.accepted).as_secs_f64());
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
                entry.state = State::Failed(Box::new(msg));
            }
        }
        self.trim_recent();
        self.settle();
    }

    /// The end of an [`Action::Replay`].
    pub(crate) fn on_replay_done(&mut self, conn_id: u64, ok: bool, now: Instant) {
        if !self.holds(now) {
            return;
        }
        self.replay_done(conn_id, ok);
        self.settle();
    }

    /// The result of an [`Action::SaveState`].
    pub(crate) fn on_state_saved(&mut self, result: Result<(), NotStored>, now: Instant) {
        let Some(saving) = self.saving.take() else {
            return;
        };
        if matches!(result, Err(NotStored::Fenced)) {
            self.fence_now();
        }
        if !self.holds(now) {
            let _ = saving.reply.send(Err(ErrorCode::RoomMoved));
            return;
        }
        match result {
            Ok(()) => {
                self.state = saving.state;
                self.expiry = saving.expiry;
                let _ = saving.reply.send(Ok(saving.state));
                self.check_expiry(now);
            }
            Err(_) => {
                let _ = saving.reply.send(Err(ErrorCode::StoreUnavailable));
            }
        }
        self.settle();
    }

    /// A wake-up at (or after) [`RoomCore::poll_timeout`].
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if !self.holds(now) {
            return;
        }
        self.check_expiry(now);
        self.settle();
        let Some(h) = &mut self.handoff else {
            return;
        };
        if h.deadline.is_none_or(|d| now < d) {
            return;
        }
        h.deadline = None;
        let (code, message, owner) = (h.code(), h.dropped_message(), h.owner.clone());
        let dropped = std::mem::take(&mut self.unpersisted);
        if !dropped.is_empty() {
            tracing::warn!(
                room = %self.id,
                messages = dropped.len(),
                "handoff flush deadline passed: dropping what the store has not taken"
            );
            self.ctx.add_pending(-(dropped.len() as i64));
        }
        for msg in dropped {
            let key = dedupe::key(&msg.from, &msg.cid);
            if let Some(State::Pending(waiters)) = self.dedupe.forget(&key).map(|e| e.state) {
                for w in waiters {
                    w.error_with_owner(&self.id, &msg.cid, code, message, owner.as_deref());
                }
            }
        }
        // A batch in flight is still waited for: its write is bounded by the store timeout,
        // and ending before it returns would let it land after the next owner loaded.
        self.settle();
    }

    /// Store work to do now: replays first (a joiner is waiting), then the next batch when
    /// none is in flight. Starts nothing once the grant has lapsed.
    pub(crate) fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if !self.holds(now) {
            return None;
        }
        if let Some(replay) = self.replays.pop_front() {
            return Some(replay);
        }
        if let Some(state) = self.save_due.take() {
            return Some(Action::SaveState(state));
        }
        if self.inflight > 0 || self.unpersisted.is_empty() {
            return None;
        }
        let n = self.unpersisted.len().min(self.ctx.config.store_batch);
        let batch: Vec<ChatMessage> = self.unpersisted.drain(..n).collect();
        self.inflight = batch.len();
        Some(Action::Persist(batch))
    }

    /// When to call [`RoomCore::on_timeout`]: the handoff's flush deadline. A quiet room
    /// needs no timer for its grant: when the lease lapses the node's lease guard sends
    /// every room a command (`cluster.rs`), and any entry point fences it. (A timer per
    /// room at the lease's expiry would wake every quiet room once per renewal period.)
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        if self.ended || self.fence.is_some() {
            return None;
        }
        let handoff = self.handoff.as_ref().and_then(|h| h.deadline);
        // The expiry matters only while someone is here to be told.
        let expiry = self
            .expiry
            .filter(|_| self.state.ended_at.is_none() && !self.members.is_empty());
        match (handoff, expiry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ------------------------------------------------------------------------------------
    // What the driver asks about.
    // ------------------------------------------------------------------------------------

    /// No members and nothing to persist: the driver may drop the room after its idle time.
    pub(crate) fn is_idle(&self) -> bool {
        !self.ended
            && self.fence.is_none()
            && self.members.is_empty()
            && self.unpersisted.is_empty()
            && self.inflight == 0
    }

    /// The room is done (handed over, or fenced with nothing in flight): the driver removes
    /// it and answers what is still queued through [`RoomCore::handle`].
    pub(crate) fn is_ended(&self) -> bool {
        self.ended
    }

    /// New messages accepted so far.
    pub(crate) fn accepted(&self) -> u64 {
        self.accepted
    }

    pub(crate) fn id(&self) -> &RoomId {
        &self.id
    }

    // ------------------------------------------------------------------------------------
    // The fence.
    // ------------------------------------------------------------------------------------

    /// Whether the room may act at `now`; fences it the first time it may not.
    fn holds(&mut self, now: Instant) -> bool {
        if self.fence.is_some() {
            return false;
        }
        if self.grant.is_valid_at(now) {
            return true;
        }
        self.fence_now();
        false
    }

    fn fence_now(&mut self) {
        if self.fence.is_some() {
            return;
        }
        let owner = self
            .handoff
            .as_ref()
            .and_then(|h| h.owner.clone())
            .or_else(|| self.ctx.ownership.owner_elsewhere(&self.id));
        // A lapse fences every room of the node at once; a line each is worth it only for
        // the rooms where a sender loses an ack (the lapse is one event for the node).
        if self.unpersisted.is_empty() && self.inflight == 0 {
            tracing::debug!(room = %self.id, members = self.members.len(), "the room's grant lapsed: fenced");
        } else {
            tracing::info!(
                room = %self.id,
                unpersisted = self.unpersisted.len(),
                inflight = self.inflight,
                members = self.members.len(),
                "the room's grant lapsed: fenced; unconfirmed messages get room_moved"
            );
        }
        self.fence = Some(Fence { owner });
        let dropped = std::mem::take(&mut self.unpersisted);
        self.ctx.add_pending(-(dropped.len() as i64));
        for msg in &dropped {
            self.withhold(msg);
        }
        self.replays.clear();
        for (_, member) in self.members.drain() {
            member.conn.close(CloseCode::RoomMoved);
        }
        self.users.clear();
        self.settle();
    }

    /// Answers the waiters of a message this room will not ack, and forgets its cid so
    /// nothing here remembers an id the store may never have.
    fn withhold(&mut self, msg: &ChatMessage) {
        let key = dedupe::key(&msg.from, &msg.cid);
        let Some(entry) = self.dedupe.forget(&key) else {
            return;
        };
        if let State::Pending(waiters) = entry.state {
            let owner = self.fence.as_ref().and_then(|f| f.owner.as_deref());
            for w in waiters {
                metrics::counter!(m::FENCED, "op" => "ack").increment(1);
                w.error_with_owner(&self.id, &msg.cid, ErrorCode::RoomMoved, FENCED_ACK, owner);
            }
        }
    }

    fn refuse_fenced(&self, cmd: RoomCmd) {
        let owner = self.fence.as_ref().and_then(|f| f.owner.as_deref());
        let message = match &cmd {
            RoomCmd::Join { .. } => {
                metrics::counter!(m::FENCED, "op" => "join").increment(1);
                FENCED_JOIN
            }
            RoomCmd::Send { .. } => {
                metrics::counter!(m::FENCED, "op" => "send").increment(1);
                FENCED_SEND
            }
            RoomCmd::SetState { .. } => FENCED_JOIN,
            // Members are gone already; nothing else needs an answer.
            RoomCmd::Presence { .. }
            | RoomCmd::Wake
            | RoomCmd::Leave { .. }
            | RoomCmd::ReplayDone { .. }
            | RoomCmd::Handoff { .. } => return,
        };
        cmd.refuse_with_owner(&self.id, ErrorCode::RoomMoved, message, owner);
    }

    /// Ends the room when its work is done: fenced with nothing in flight, or a closing
    /// handoff that has flushed (members are closed after the flush, so a client that
    /// reconnects elsewhere and retries finds its acked messages in the store).
    fn settle(&mut self) {
        if self.ended || self.inflight > 0 {
            return;
        }
        if self.fence.is_some() {
            self.ended = true;
            return;
        }
        if self.state.ended_at.is_some() && !self.members_ended && self.unpersisted.is_empty() {
            self.end_members();
        }
        let Some(code) = self.handoff.as_ref().and_then(|h| h.close) else {
            return;
        };
        if !self.unpersisted.is_empty() {
            return;
        }
        let to = self.handoff.as_ref().and_then(|h| h.owner_id);
        for (_, member) in self.members.drain() {
            // A bridged member that follows the room is moved to the new owner by its own
            // node, from the last message it got (everything is stored by now); its
            // connection stays open. Every other member is closed.
            match (code, to, &member.state) {
                (CloseCode::RoomMoved, Some(to), MemberState::Live)
                    if member.conn.link().is_some() =>
                {
                    member.conn.moved(&self.id, to)
                }
                _ => member.conn.close(code),
            }
        }
        self.users.clear();
        self.ended = true;
    }

    // ------------------------------------------------------------------------------------
    // Commands, with a valid grant.
    // ------------------------------------------------------------------------------------

    // ------------------------------------------------------------------------------------
    // Lifecycle and presence.
    // ------------------------------------------------------------------------------------

    /// Whether the room has ended by `now` (stored as ended, or its expiry passed).
    fn is_over(&self, now: Instant) -> bool {
        self.state.ended_at.is_some() || self.expiry.is_some_and(|at| now >= at)
    }

    /// Turns a passed expiry into the ended state the members are told of (it needs no
    /// write: the stored expiry already says so to every later owner).
    fn check_expiry(&mut self, now: Instant) {
        if self.state.ended_at.is_none() && self.expiry.is_some_and(|at| now >= at) {
            self.state.ended_at = self.state.expires_at;
            tracing::info!(room = %self.id, "the room expired");
        }
    }

    fn set_state(
        &mut self,
        change: StateChange,
        reply: oneshot::Sender<Result<RoomState, ErrorCode>>,
        now: Instant,
    ) {
        if self.saving.is_some() {
            let _ = reply.send(Err(ErrorCode::RoomUnavailable));
            return;
        }
        if self.handoff.is_some() {
            let _ = reply.send(Err(self
                .handoff
                .as_ref()
                .map_or(ErrorCode::GoingAway, |h| h.code())));
            return;
        }
        if self.is_over(now) {
            // Ending is for good: an ended room answers with what it is.
            let _ = match change {
                StateChange::End => reply.send(Ok(self.state)),
                _ => reply.send(Err(ErrorCode::RoomEnded)),
            };
            return;
        }
        let mut state = self.state;
        let expiry = match change {
            StateChange::End => {
                state.ended_at = Some(now_ms());
                self.expiry
            }
            StateChange::ExpireAt { at, within } => {
                state.expires_at = Some(at);
                Some(now + within)
            }
            StateChange::KeepForever => {
                state.expires_at = None;
                None
            }
        };
        self.save_due = Some(state);
        self.saving = Some(Saving {
            state,
            expiry,
            reply,
        });
    }

    /// Tells every member the room has ended and drops them (their connections stay: they
    /// may carry other rooms). Called once what was accepted before the end is stored.
    fn end_members(&mut self) {
        self.members_ended = true;
        for (_, member) in self.members.drain() {
            if let MemberState::CatchingUp { bytes, .. } = member.state {
                member.conn.refund(bytes);
            }
            member.conn.unfollow(&self.id);
            member.conn.send_frame(&ServerFrame::Error {
                code: ErrorCode::RoomEnded,
                message: ROOM_ENDED.into(),
                cid: None,
                room: Some(self.id.to_string()),
                owner: None,
            });
        }
        self.users.clear();
        self.replays.clear();
    }

    /// The room's users, bridged members included: the count, and the first names sorted.
    fn presence_list(&self) -> RoomPresence {
        let mut users: Vec<UserId> = self.users.keys().cloned().collect();
        users.sort_unstable();
        users.truncate(PRESENCE_LIST_MAX);
        RoomPresence {
            members: self.users.len() as u32,
            users,
        }
    }

    fn begin_handoff(
        &mut self,
        close: Option<CloseCode>,
        owner: Option<String>,
        owner_id: Option<u16>,
        now: Instant,
    ) {
        if self.ended {
            return;
        }
        tracing::debug!(room = %self.id, ?close, "handing the room over");
        // The bound counts from the first handoff; a second one (another ring change)
        // updates where the room went and how it ends, not when the flush must be done.
        let deadline = match &self.handoff {
            Some(h) => h.deadline,
            None => Some(now + 2 * self.ctx.config.store_timeout),
        };
        self.handoff = Some(Handoff {
            close,
            owner,
            owner_id,
            deadline,
        });
    }

    fn refuse_handoff(&self, cmd: RoomCmd) {
        if let Some(h) = &self.handoff {
            cmd.refuse_with_owner(&self.id, h.code(), h.message(), h.owner.as_deref());
        }
    }

    fn pending(&self) -> usize {
        self.unpersisted.len() + self.inflight
    }

    fn join(&mut self, conn: Arc<ConnHandle>, since: Option<MessageId>) {
        if self.handoff.is_some() {
            self.refuse_handoff(RoomCmd::Join { conn, since });
            return;
        }
        if self.state.ended_at.is_some() {
            RoomCmd::Join { conn, since }.refuse(&self.id, ErrorCode::RoomEnded, ROOM_ENDED);
            return;
        }
        let rejoin = self.members.remove(&conn.id).is_some();
        if rejoin {
            // A bridged member's node stops feeding it the stream until it is live again.
            conn.unfollow(&self.id);
        }
        let head = (self.head.0 != 0).then_some(self.head);
        let members = self.users.len() + usize::from(!self.users.contains_key(&conn.user));
        let users = (members <= JOINED_USERS_MAX).then(|| {
            let mut users: Vec<UserId> = self.users.keys().cloned().collect();
            if !self.users.contains_key(&conn.user) {
                users.push(conn.user.clone());
            }
            users.sort_unstable();
            users
        });
        if !conn.send_frame(&ServerFrame::Joined {
            room: self.id.clone(),
            head,
            members: members as u32,
            users,
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
                if !frames.is_empty() && !conn.deliver(Out::Shared(frames)) {
                    self.forget_user(&conn.user);
                    return;
                }
                MemberState::Live
            }
            Some(since) => {
                // Older than the recent window: the store serves (since, recent_floor], the
                // window and live messages wait in the member's buffer until it is done.
                let window: Vec<Bytes> = self.recent.iter().map(|r| r.bytes.clone()).collect();
                self.replays.push_back(Action::Replay {
                    conn: conn.clone(),
                    since,
                    upto: self.recent_floor,
                });
                MemberState::CatchingUp {
                    window,
                    frames: Vec::new(),
                    bytes: 0,
                }
            }
        };
        if matches!(state, MemberState::Live) {
            conn.follow(&self.id, self.head);
        }
        self.members.insert(conn.id, Member { conn, state });
    }

    fn replay_done(&mut self, conn_id: u64, ok: bool) {
        let Some(member) = self.members.get_mut(&conn_id) else {
            return;
        };
        let MemberState::CatchingUp {
            window,
            frames,
            bytes,
        } = std::mem::replace(&mut member.state, MemberState::Live)
        else {
            return;
        };
        let delivered = if ok {
            let conn = &member.conn;
            let delivered = (window.is_empty() || conn.deliver_charged(Out::Shared(window)))
                && (frames.is_empty() || conn.deliver_charged(Out::Frames(frames)));
            if delivered {
                member.conn.follow(&self.id, self.head);
            }
            delivered
        } else {
            member.conn.refund(bytes);
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
        if let MemberState::CatchingUp { bytes, .. } = member.state {
            member.conn.refund(bytes);
        }
        member.conn.unfollow(&self.id);
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
        let dead = self.fanout(Bytes::from(frame.to_json()), None);
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
    fn fanout(&mut self, bytes: Bytes, last: Option<MessageId>) -> Vec<u64> {
        let cap = self.ctx.config.outbound_queue * 4;
        let mut dead = Vec::new();
        let mut delivered = 0u64;
        self.broadcasts += 1;
        let sample = self.broadcasts % 16 == 0;
        let mut max_fill = 0.0f64;
        // Members bridged from other nodes get the frame once per node, through its link;
        // a room spans few nodes, so a short list beats a set.
        let mut links: Vec<Arc<Link>> = Vec::new();
        for (id, member) in &mut self.members {
            match &mut member.state {
                MemberState::Live => {
                    if let Some(link) = member.conn.link() {
                        if !links.iter().any(|l| l.peer() == link.peer()) {
                            links.push(link.clone());
                        }
                        continue;
                    }
                    if sample {
                        max_fill = max_fill.max(member.conn.fill_ratio());
                    }
                    if member.conn.deliver(Out::Frame(bytes.clone())) {
                        delivered += 1;
                    } else {
                        dead.push(*id);
                    }
                }
                MemberState::CatchingUp {
                    window,
                    frames,
                    bytes: held,
                } => {
                    if window.len() + frames.len() >= cap {
                        member.conn.close_slow();
                        dead.push(*id);
                    } else if member.conn.charge(bytes.len()) {
                        frames.push(bytes.clone());
                        *held += bytes.len();
                        delivered += 1;
                    } else {
                        dead.push(*id);
                    }
                }
            }
        }
        // A link that cannot take it breaks; its reset drops the node's members here.
        for link in links {
            link.push(Item::Room {
                room: self.id.clone(),
                last: last.map_or(0, |id| id.0),
                frames: Out::Frame(bytes.clone()),
            });
        }
        metrics::counter!(m::MESSAGES_DELIVERED).increment(delivered);
        if sample && !self.members.is_empty() {
            metrics::histogram!(m::QUEUE_FILL_RATIO).record(max_fill);
        }
        dead
    }

    fn send(
        &mut self,
        from: UserId,
        cid: ClientMsgId,
        body: String,
        reply: Reply,
        source: Source,
        now: Instant,
    ) {
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
        if self.state.ended_at.is_some() {
            reply.error(&self.id, &cid, ErrorCode::RoomEnded, ROOM_ENDED);
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
        let key = dedupe::key(&from, &cid);
        let store_ok =
            self.ctx.store_healthy() && self.pending() < self.ctx.config.max_pending_per_room;
        if let Some(entry) = self.dedupe.get_mut(&key) {
            metrics::counter!(m::MESSAGES_DUPLICATE).increment(1);
            let id = entry.id;
            match &mut entry.state {
                State::Durable => reply.ack(
                    &self.id,
                    &cid,
                    Accepted {
                        id,
                        duplicate: true,
                    },
                ),
                State::Pending(waiters) => waiters.push(reply),
                State::Failed(_) => {
                    if !store_ok {
                        reply.error(
                            &self.id,
                            &cid,
                            ErrorCode::StoreUnavailable,
                            "store unavailable; retry later with the same cid",
                        );
                        return;
                    }
                    let State::Failed(msg) =
                        std::mem::replace(&mut entry.state, State::Pending(vec![reply]))
                    else {
                        return;
                    };
                    entry.accepted = now;
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
        let dead = self.fanout(bytes.clone(), Some(id));
        for conn_id in dead {
            self.leave(conn_id, false);
        }
        self.accepted += 1;
        metrics::counter!(m::MESSAGES_RECEIVED, "source" => source.label()).increment(1);
        tracing::debug!(cid = %msg.cid, %id, source = source.label(), "accepted");
        self.recent.push_back(Recent {
            id,
            bytes,
            settled: false,
        });
        self.trim_recent();
        self.dedupe
            .remember(key, id, now, State::Pending(vec![reply]), now);
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
}

#[cfg(test)]
pub(super) mod tests;
