//! What a connection is given to write: one item of its outbound queue, as rooms, the bus
//! and the connection itself hand it over. Nothing here does I/O.

use bytes::Bytes;

/// One item of a connection's outbound queue.
#[derive(Debug)]
pub enum Out {
    /// A serialized server frame, shared with every other member it was broadcast to.
    Frame(Bytes),
    /// Several frames that must stay together and in order (a replay page, a catch-up
    /// buffer); takes one queue slot.
    Frames(Vec<Bytes>),
    /// Frames the room keeps anyway (its window of recent messages), handed to a joiner:
    /// like `Frames`, but not charged to the connection's byte budget.
    Shared(Vec<Bytes>),
    /// The answer to a client ping.
    Pong(Bytes),
}

impl Out {
    /// The bytes it holds, as charged to a connection's [`Budget`] (none for `Shared`).
    pub fn len(&self) -> usize {
        match self {
            Out::Frame(b) | Out::Pong(b) => b.len(),
            Out::Frames(v) => v.iter().map(Bytes::len).sum(),
            Out::Shared(_) => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
