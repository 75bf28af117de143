//! What a room needs from the cluster to be served here: a [`Grant`].
//!
//! A room's task asks [`RoomOwnership::acquire`] before it loads the room from the store;
//! the answer comes only once this node holds a valid lease and the room's previous owner
//! has let go (see `cluster.rs`). The grant is then checked before every id is assigned and
//! before every ack: it is valid only while the lease of the incarnation that granted it
//! is, so a node that was paused or cut off stops accepting the moment it runs again. The
//! grant knows nothing of rings or Redis; standalone nodes get one that never ends.

use std::sync::Arc;

use common::membership::Lease;
use common::RoomId;
use tokio::time::Instant;

use crate::store::BoxFuture;

/// The right to serve one room, for as long as the lease that granted it is valid.
#[derive(Clone, Debug)]
pub struct Grant {
    lease: Lease,
    incarnation: u64,
}

impl Grant {
    /// A grant under `lease`'s current incarnation.
    pub fn new(lease: Lease) -> Grant {
        Grant {
            incarnation: lease.incarnation(),
            lease,
        }
    }

    /// A grant that never ends (standalone node, tests).
    pub fn forever() -> Grant {
        Grant::new(Lease::forever())
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        self.lease.is_valid_for(self.incarnation, now)
    }

    pub fn is_valid(&self) -> bool {
        self.is_valid_at(Instant::now())
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// When the grant ends unless a renewal extends the lease first; `None` when it never
    /// ends (or there is no lease at all, which [`Grant::is_valid_at`] already says). A room
    /// wakes at this instant so that a quiet room is fenced when its grant lapses, not only
    /// at its next command.
    pub fn expires_at(&self) -> Option<Instant> {
        self.lease.expires_at()
    }
}

/// Why a room cannot be served here now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Another node owns it: answer `room_moved` (with its address when known).
    Moved { owner: Option<String> },
    /// It is between owners, or this node has no lease: answer `room_unavailable`.
    Unavailable,
}

/// The cluster side of room ownership.
pub trait RoomOwnership: Send + Sync + 'static {
    /// Waits (bounded) until this node may serve `room`, and grants it.
    fn acquire<'a>(&'a self, room: &'a RoomId) -> BoxFuture<'a, Result<Grant, Refusal>>;

    /// The address of the room's owner now, when it is another node (for `room_moved`).
    fn owner_elsewhere(&self, room: &RoomId) -> Option<String>;
}

/// Ownership for a node without a cluster: every room, forever.
pub struct Standalone;

impl RoomOwnership for Standalone {
    fn acquire<'a>(&'a self, _room: &'a RoomId) -> BoxFuture<'a, Result<Grant, Refusal>> {
        Box::pin(async { Ok(Grant::forever()) })
    }

    fn owner_elsewhere(&self, _room: &RoomId) -> Option<String> {
        None
    }
}

/// Standalone ownership, shared.
pub fn standalone() -> Arc<dyn RoomOwnership> {
    Arc::new(Standalone)
}
