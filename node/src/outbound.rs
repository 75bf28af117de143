//! The outbound side of one WebSocket connection, as rooms see it.
//!
//! A [`ConnHandle`] is a bounded queue into the connection's writer task plus a way to close
//! the connection with a code. Rooms only ever `try_send`: a full queue means the client is
//! not reading fast enough, so it is closed with [`CloseCode::SlowConsumer`] instead of
//! slowing the room. This module does no I/O; the writer in `connection.rs` drains the queue.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use bytes::Bytes;
use common::{metrics as m, CloseCode, ServerFrame, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

pub struct ConnHandle {
    pub id: u64,
    pub user: UserId,
    tx: mpsc::Sender<Out>,
    capacity: usize,
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
            tx,
            capacity,
            cancel,
            close_code: OnceLock::new(),
            slow_counted: AtomicBool::new(false),
        };
        (h, rx)
    }

    /// Enqueues without waiting. A full queue closes the connection as a slow consumer.
    /// Returns false when the item was not enqueued (full or already closed).
    pub fn deliver(&self, out: Out) -> bool {
        match self.tx.try_send(out) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close_slow();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Serializes and delivers one frame meant for this connection only.
    pub fn send_frame(&self, frame: &ServerFrame) -> bool {
        self.deliver(Out::Frame(Bytes::from(frame.to_json())))
    }

    /// Enqueues, waiting for room: only for paths that may wait on this one client, such as
    /// a replay. Returns false if the connection closed first.
    pub async fn deliver_wait(&self, out: Out) -> bool {
        tokio::select! {
            _ = self.cancel.cancelled() => false,
            r = self.tx.send(out) => r.is_ok(),
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
        let _ = self.close_code.set(code);
        self.cancel.cancel();
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
        1.0 - self.tx.capacity() as f64 / self.capacity as f64
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
