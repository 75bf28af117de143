//! The commands the rest of the node sends a room (its inbox protocol), where their
//! outcomes go, and how a refused command is answered.

use std::sync::Arc;
use std::time::Duration;

use common::{ClientMsgId, CloseCode, ErrorCode, MessageId, RoomId, ServerFrame, UserId};
use tokio::sync::oneshot;

use crate::outbound::ConnHandle;
use crate::store::RoomState;

/// Where the outcome of a send goes.
pub enum Reply {
    /// A WebSocket sender: gets an `ack` or `error` frame on its outbound queue.
    Conn(Arc<ConnHandle>),
    /// An HTTP publish waiting for its answer.
    Http(oneshot::Sender<Result<Accepted, ErrorCode>>),
}

/// The users connected to a room: `members` of them, the first [`PRESENCE_LIST_MAX`] by
/// name in `users`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RoomPresence {
    pub members: u32,
    pub users: Vec<UserId>,
}

/// Most users a presence answer lists.
pub const PRESENCE_LIST_MAX: usize = 1000;

/// A change to a room's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    /// End it now.
    End,
    /// End it at `at` (Unix ms), which is `within` from when the change was asked.
    ExpireAt { at: u64, within: Duration },
    /// Clear its expiry.
    KeepForever,
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
    pub(super) fn label(self) -> &'static str {
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
    /// Who is connected to the room, bridged members included.
    Presence {
        reply: oneshot::Sender<RoomPresence>,
    },
    /// Ends the room, or sets or clears its expiry; answered once the store has it.
    SetState {
        change: StateChange,
        reply: oneshot::Sender<Result<RoomState, ErrorCode>>,
    },
    /// Does nothing: starts the room if it is not running (to deliver its pending webhooks).
    Wake,
    /// Stop accepting, flush what was accepted, then (with `close`) close every member with
    /// that code and end. Sent on a ring change (`room_moved`) and on shutdown (no close:
    /// the node closes connections itself once every room has flushed).
    Handoff {
        close: Option<CloseCode>,
        /// Where the room went, for `room_moved` answers.
        owner: Option<String>,
        /// The new owner's id: members bridged from other nodes are moved there by their
        /// node instead of being closed.
        owner_id: Option<u16>,
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
            RoomCmd::SetState { reply, .. } => {
                let _ = reply.send(Err(code));
            }
            // An empty answer: nobody is connected to a room that is not running here.
            RoomCmd::Presence { .. }
            | RoomCmd::Wake
            | RoomCmd::Leave { .. }
            | RoomCmd::ReplayDone { .. }
            | RoomCmd::Handoff { .. } => {}
        }
    }
}

impl Reply {
    pub(super) fn ack(self, room: &RoomId, cid: &ClientMsgId, accepted: Accepted) {
        tracing::debug!(%cid, id = %accepted.id, duplicate = accepted.duplicate, "acked");
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
