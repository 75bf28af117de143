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

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use common::{metrics as m, CloseCode, RoomId, ServerFrame, UserId};
use tokio::sync::{mpsc, Notify, Semaphore, SemaphorePermit};
use tokio_util::sync::CancellationToken;

use crate::bus::link::Link;
use crate::bus::wire::Item;
use crate::frames::Out;

/// The bytes a local connection may have waiting for its writer: its queue and the frames
/// rooms hold for it while it catches up, together. Frames are shared with other members,
/// so this counts what the connection keeps alive, not copies.
struct Budget {
    max: usize,
    used: AtomicUsize,
    freed: Notify,
}

impl Budget {
    /// Takes `n` bytes if they fit (an item larger than the whole budget fits an empty one).
    fn try_take(&self, n: usize) -> bool {
        if n == 0 {
            return true;
        }
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used == 0 || used.saturating_add(n) <= self.max).then(|| used.saturating_add(n))
            })
            .is_ok()
    }

    /// Waits until `n` bytes fit in half the budget, or `cancel` fires (false). What may
    /// wait (a replay) leaves the other half to what may not (broadcasts, acks), so a
    /// client that reads while it catches up is not closed as slow because of its replay.
    async fn take(&self, n: usize, cancel: &CancellationToken) -> bool {
        let fits = |used: usize| used == 0 || used.saturating_add(n) <= self.max / 2;
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let taken = self
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    fits(used).then(|| used.saturating_add(n))
                })
                .is_ok();
            if taken {
                return true;
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = freed => {}
            }
        }
    }

    fn give(&self, n: usize) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                Some(used.saturating_sub(n))
            });
        self.freed.notify_waiters();
    }
}

enum Sink {
    /// A connection of this node: its writer task drains the queue.
    Local {
        tx: mpsc::Sender<Out>,
        capacity: usize,
        budget: Budget,
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
    /// One replay page at a time per connection, whatever the number of rooms replaying.
    replay_turn: Semaphore,
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
            sink: Sink::Local {
                tx,
                capacity,
                budget: Budget {
                    max: usize::MAX,
                    used: AtomicUsize::new(0),
                    freed: Notify::new(),
                },
            },
            cancel,
            close_code: OnceLock::new(),
            slow_counted: AtomicBool::new(false),
            replay_turn: Semaphore::new(1),
        };
        (h, rx)
    }

    /// Bounds what the connection may have waiting to `max_bytes` (unbounded otherwise).
    pub fn with_byte_budget(mut self, max_bytes: usize) -> Self {
        if let Sink::Local { budget, .. } = &mut self.sink {
            budget.max = max_bytes;
        }
        self
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
            replay_turn: Semaphore::new(1),
        }
    }

    /// Enqueues without waiting. A full queue, or one holding its byte budget, closes the
    /// connection as a slow consumer. Returns false when the item was not enqueued (full or
    /// already closed).
    pub fn deliver(&self, out: Out) -> bool {
        if !self.charge(out.len()) {
            return false;
        }
        self.deliver_charged(out)
    }

    /// Charges `n` bytes (frames a room holds for this connection) to its budget; false,
    /// with the connection closed as slow, when they do not fit. A remote member's budget
    /// is on its own node: always true.
    pub(crate) fn charge(&self, n: usize) -> bool {
        match &self.sink {
            Sink::Local { budget, .. } if !budget.try_take(n) => {
                self.close_slow();
                false
            }
            _ => true,
        }
    }

    /// Gives back bytes charged with [`ConnHandle::charge`] that will not be delivered, or
    /// that the writer has taken off the queue.
    pub(crate) fn refund(&self, n: usize) {
        if let Sink::Local { budget, .. } = &self.sink {
            budget.give(n);
        }
    }

    /// [`ConnHandle::deliver`] of an item whose bytes are already charged.
    pub(crate) fn deliver_charged(&self, out: Out) -> bool {
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

    /// Waits for this connection's turn to replay a page (one page at a time across all
    /// its rooms, so a connection that joins many rooms with old `since` holds one page
    /// outside its budget, not one per room). `None` if it closed first.
    pub(crate) async fn replay_turn(&self) -> Option<SemaphorePermit<'_>> {
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            p = self.replay_turn.acquire() => p.ok(),
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

    /// Enqueues, waiting for room (in the queue and in the byte budget): only for paths that
    /// may wait on this one client, such as a replay. Returns false if the connection closed
    /// first.
    pub async fn deliver_wait(&self, out: Out) -> bool {
        match &self.sink {
            Sink::Local { tx, budget, .. } => {
                let n = out.len();
                if !budget.take(n, &self.cancel).await {
                    return false;
                }
                tokio::select! {
                    _ = self.cancel.cancelled() => false,
                    r = tx.send(out) => r.is_ok(),
                }
            }
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
            Sink::Local { tx, capacity, .. } => 1.0 - tx.capacity() as f64 / *capacity as f64,
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

    #[tokio::test]
    async fn the_byte_budget_closes_a_full_connection_and_holds_a_replay_back() {
        let frame = || Out::Frame(Bytes::from(vec![b'x'; 1000]));
        let (h, mut rx) = ConnHandle::new(
            1,
            UserId::new("u").expect("user"),
            100,
            CancellationToken::new(),
        );
        let h = Arc::new(h.with_byte_budget(2500));
        assert!(h.deliver(frame()) && h.deliver(frame()));
        // The queue has slots left, but not bytes: a third frame waits in a replay...
        let waiting = tokio::spawn({
            let h = h.clone();
            async move { h.deliver_wait(frame()).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        // ...until the writer has taken enough off for it to fit in half the budget (the
        // other half is kept for broadcasts).
        let out = rx.recv().await.expect("queued");
        h.refund(out.len());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let out = rx.recv().await.expect("queued");
        h.refund(out.len());
        assert!(waiting.await.expect("task"));
        assert!(h.deliver(frame()));
        // A broadcast that does not fit closes the connection as slow.
        assert!(!h.deliver(frame()));
        assert_eq!(h.close_code(), Some(CloseCode::SlowConsumer));
        // An item larger than the whole budget still fits an empty one.
        let (big, _rx) = ConnHandle::new(
            2,
            UserId::new("u").expect("user"),
            100,
            CancellationToken::new(),
        );
        let big = big.with_byte_budget(10);
        assert!(big.deliver(frame()));
    }
}
