//! The outbound side of one WebSocket connection, as rooms see it.
//!
//! A [`ConnHandle`] is a bounded queue into the connection's writer task plus a way to close
//! the connection with a code. Rooms only ever `try_send`: a full queue means the client is
//! not reading fast enough, so it is closed with [`CloseCode::SlowConsumer`] instead of
//! slowing the room. This module does no I/O; the writer in `connection.rs` drains the queue.
//!
//! A member bridged from another node has a *remote* handle: what the room gives it goes
//! into the link to that node (`bus/link.rs`) tagged with the connection, and the real
//! connection's bounded queue is on that node. Rooms do not broadcast to remote members one
//! by one: they send each frame once per link ([`ConnHandle::link`]), and tell the other
//! node which of its members follow the room's stream ([`ConnHandle::follow`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use common::{metrics as m, CloseCode, RoomId, ServerFrame, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::bus::link::Link;
use crate::bus::wire::Item;

/// One item of a connection's outbound queue.
#[derive(Debug)]
pub enum Out {
    /// A serialized server frame, shared with every other member it was broadcast to.
    Frame(Bytes),
    /// Several frames that must stay together and in order (a replay page, a catch-up
    /// buffer); takes one queue slot.
    Frames(Vec<Bytes>),
    /// The answer to a client ping.
    Pong(Bytes),
}

enum Sink {
    /// A connection of this node: its writer task drains the queue.
    Local {
        tx: mpsc::Sender<Out>,
        capacity: usize,
    },
    /// Connection `conn` of the node at the other end of `link`.
    Remote { link: Arc<Link>, conn: u64 },
}

pub struct ConnHandle {
    pub id: u64,
    pub user: UserId,
    sink: Sink,
    cancel: CancellationToken,
    close_code: OnceLock<CloseCode>,
    slow_counted: AtomicBool,
}

impl std::fmt::Debug for ConnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnHandle")
            .field("id", &self.id)
            .field("user", &self.user)
            .finish()
    }
}

impl ConnHandle {
    pub fn new(
        id: u64,
        user: UserId,
        capacity: usize,
        cancel: CancellationToken,
    ) -> (ConnHandle, mpsc::Receiver<Out>) {
        let (tx, rx) = mpsc::channel(capacity);
        let h = ConnHandle {
            id,
            user,
            sink: Sink::Local { tx, capacity },
            cancel,
            close_code: OnceLock::new(),
            slow_counted: AtomicBool::new(false),
        };
        (h, rx)
    }

    /// The handle of connection `conn` of the node at the other end of `link`, known here
    /// as `id` (unique among this node's connections).
    pub(crate) fn remote(
        id: u64,
        user: UserId,
        link: Arc<Link>,
        conn: u64,
        cancel: CancellationToken,
    ) -> ConnHandle {
        ConnHandle {
            id,
            user,
            sink: Sink::Remote { link, conn },
            cancel,
            close_code: OnceLock::new(),
            slow_counted: AtomicBool::new(false),
        }
    }

    /// Enqueues without waiting. A full queue closes the connection as a slow consumer.
    /// Returns false when the item was not enqueued (full or already closed).
    pub fn deliver(&self, out: Out) -> bool {
        match &self.sink {
            Sink::Local { tx, .. } => match tx.try_send(out) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.close_slow();
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            },
            // A link that cannot take it breaks, and its reset drops this member.
            Sink::Remote { link, conn } => {
                !self.is_closed()
                    && link.push(Item::To {
                        conn: *conn,
                        frames: out,
                    })
            }
        }
    }

    /// The link a remote member's room frames go through (`None` for a local connection).
    pub(crate) fn link(&self) -> Option<&Arc<Link>> {
        match &self.sink {
            Sink::Local { .. } => None,
            Sink::Remote { link, .. } => Some(link),
        }
    }

    /// The room's broadcasts reach this member from now on through its node's copy of the
    /// room stream (a remote member only; a local one gets them from [`ConnHandle::deliver`]).
    /// `at` is the last message the member has (its replay or recent window ends there).
    pub(crate) fn follow(&self, room: &RoomId, at: common::MessageId) {
        if let (Sink::Remote { link, conn }, false) = (&self.sink, self.is_closed()) {
            link.push(Item::Follow {
                conn: *conn,
                room: room.clone(),
                at: at.0,
            });
        }
    }

    /// A remote member's room moved to node `to` after a flush: its node joins it there
    /// from the last message it delivered, without closing the connection.
    pub(crate) fn moved(&self, room: &RoomId, to: u16) {
        if let (Sink::Remote { link, conn }, false) = (&self.sink, self.is_closed()) {
            link.push(Item::Moved {
                conn: *conn,
                room: room.clone(),
                to,
            });
        }
    }

    /// The opposite of [`ConnHandle::follow`]: the member left, or waits for a replay.
    pub(crate) fn unfollow(&self, room: &RoomId) {
        // A dropped proxy says nothing more: its connection id may already name a new
        // connection of a restarted node.
        if let (Sink::Remote { link, conn }, false) = (&self.sink, self.is_closed()) {
            link.push(Item::Unfollow {
                conn: *conn,
                room: room.clone(),
            });
        }
    }

    /// Serializes and delivers one frame meant for this connection only.
    pub fn send_frame(&self, frame: &ServerFrame) -> bool {
        self.deliver(Out::Frame(Bytes::from(frame.to_json())))
    }

    /// Enqueues, waiting for room: only for paths that may wait on this one client, such as
    /// a replay. Returns false if the connection closed first.
    pub async fn deliver_wait(&self, out: Out) -> bool {
        match &self.sink {
            Sink::Local { tx, .. } => tokio::select! {
                _ = self.cancel.cancelled() => false,
                r = tx.send(out) => r.is_ok(),
            },
            Sink::Remote { link, conn } => tokio::select! {
                _ = self.cancel.cancelled() => false,
                ok = link.push_wait(Item::To { conn: *conn, frames: out }) => ok,
            },
        }
    }

    pub fn close_slow(&self) {
        self.close(CloseCode::SlowConsumer);
        if !self.slow_counted.swap(true, Ordering::Relaxed) {
            metrics::counter!(m::SLOW_CONSUMER_DISCONNECTS).increment(1);
        }
    }

    /// Asks the writer to close the connection with `code`. The first code set wins.
    pub fn close(&self, code: CloseCode) {
        // A proxy already dropped (cancelled) tells its node nothing: see `unfollow`.
        let live = !self.is_closed();
        let first = self.close_code.set(code).is_ok();
        self.cancel.cancel();
        if let (true, true, Sink::Remote { link, conn }) = (first, live, &self.sink) {
            link.push(Item::Close {
                conn: *conn,
                code: code.code(),
            });
        }
    }

    /// Ends the connection without a close frame (the peer is already gone).
    pub fn cancel_silently(&self) {
        self.cancel.cancel();
    }

    pub fn close_code(&self) -> Option<CloseCode> {
        self.close_code.get().copied()
    }

    pub fn is_closed(&self) -> bool {
        self.cancel.is_cancelled()
    }

    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.cancel.cancelled()
    }

    /// How full the outbound queue is, 0.0 to 1.0.
    pub fn fill_ratio(&self) -> f64 {
        match &self.sink {
            Sink::Local { tx, capacity } => 1.0 - tx.capacity() as f64 / *capacity as f64,
            Sink::Remote { link, .. } => link.fill_ratio(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_closes_as_slow_consumer() {
        let (h, _rx) =
            ConnHandle::new(1, UserId::new("u").expect("u"), 2, CancellationToken::new());
        assert!(h.deliver(Out::Frame(Bytes::from_static(b"a"))));
        assert!(h.deliver(Out::Frame(Bytes::from_static(b"b"))));
        assert!((h.fill_ratio() - 1.0).abs() < f64::EPSILON);
        assert!(!h.deliver(Out::Frame(Bytes::from_static(b"c"))));
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
        assert!(h.is_closed());
        // A later close does not overwrite the first reason.
        h.close(CloseCode::GoingAway);
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
    }
}
