//! The message store interface: durable, batched, fallible.
//!
//! Rooms hand batches of accepted messages to [`MessageStore::append`] and ack senders only
//! after it returns `Ok`. The trait is object-safe (boxed futures) so the node picks an
//! implementation at start-up. Implementations own their own connection pools and limits;
//! they never see connections or rooms' members.

pub mod memory;
pub mod scylla;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use common::{ChatMessage, MessageId, RoomId};
use serde::Serialize;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// What every store call resolves with.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store could not be reached or refused the call; the driver's error is the source.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("store timed out")]
    Timeout,
    /// The writer's [`WriteGuard`] said no: nothing was written.
    #[error("the writer may no longer write this room")]
    Fenced,
}

/// The error behind [`StoreError::Unavailable`], kept whole (callers can walk its chain or
/// downcast it) and shared: a coalesced read hands one failure to every waiter.
#[derive(Debug, Clone)]
pub struct Cause(std::sync::Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn of(e: impl std::error::Error + Send + Sync + 'static) -> Cause {
        Cause(std::sync::Arc::new(e))
    }

    /// The driver's error, for callers that branch on its kind.
    pub fn get(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A failure described in words (a poisoned lock, a test switching the store off).
impl From<&str> for Cause {
    fn from(why: &str) -> Cause {
        Cause(std::sync::Arc::from(Box::<
            dyn std::error::Error + Send + Sync,
        >::from(why)))
    }
}

/// What a writer checks right before a write leaves the process, *after* the store has
/// stamped it with its timestamp: a pause that falls between the stamp and the check is
/// caught by the check, and a pause after the check leaves a write stamped before the
/// writer's lease ended, which a later owner's fence shadows (see [`MessageStore::fence`]).
pub trait WriteGuard: Send + Sync {
    fn may_write(&self) -> bool;
}

/// For writers that own what they write unconditionally (tests, tools).
pub struct Unguarded;

impl WriteGuard for Unguarded {
    fn may_write(&self) -> bool {
        true
    }
}

/// Which messages to read. Bounds are exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HistoryQuery {
    pub after: Option<MessageId>,
    pub before: Option<MessageId>,
    pub limit: usize,
    /// With `Oldest`, the page starts just after `after`; with `Newest`, it ends just before
    /// `before`. Either way the result is returned oldest first.
    pub from: PageFrom,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageFrom {
    Oldest,
    Newest,
}

/// A room's lifecycle: active until it is ended (by the API) or its expiry passes. Unix ms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RoomState {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

impl RoomState {
    /// When the room ended or ends: the earlier of the two.
    pub fn end(&self) -> Option<u64> {
        match (self.ended_at, self.expires_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn is_ended_at(&self, now_ms: u64) -> bool {
        self.end().is_some_and(|end| end <= now_ms)
    }
}

/// How far a room's webhook delivery has got: every message up to `delivered` was taken by
/// the endpoint or dead-lettered; the next one has failed `attempts` times.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookCursor {
    pub delivered: MessageId,
    pub attempts: u32,
    pub last_error: String,
}

/// A message whose webhook delivery gave up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    pub message: ChatMessage,
    pub attempts: u32,
    pub last_error: String,
    /// Unix ms.
    pub dead_at: u64,
}

fn not_kept() -> StoreError {
    StoreError::Unavailable("this store keeps only messages".into())
}

pub trait MessageStore: Send + Sync + 'static {
    /// Makes a batch of one room's messages durable. Retrying a batch (same ids) is safe.
    /// `guard` is asked, after each write is stamped and before it is sent, whether the
    /// writer may still write; when it may not, nothing more is sent and the answer is
    /// [`StoreError::Fenced`] (what was sent before may have landed).
    fn append<'a>(
        &'a self,
        room: &'a RoomId,
        batch: &'a [ChatMessage],
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()>;

    /// Reads one page of a room's history, oldest first.
    fn read<'a>(
        &'a self,
        room: &'a RoomId,
        query: HistoryQuery,
    ) -> StoreFuture<'a, Vec<ChatMessage>>;

    /// Fences `room` when this node takes it over from another: a write of an id above
    /// `after` (the head it just read) that an earlier owner still has on its way (a
    /// process paused between its lease check and its write, a write its store call gave up
    /// on) is invisible whenever it lands; this node's own writes from now on are not. For
    /// an empty room (`after` is 0) it covers ids minted within `window` of now. Only stores
    /// that several processes write need it; the embedded store has one writer.
    fn fence<'a>(
        &'a self,
        _room: &'a RoomId,
        _after: MessageId,
        _window: Duration,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    // Rooms' lifecycle and webhook delivery. Both production stores keep them; the
    // defaults are for test doubles that store only messages (nothing ends, nothing waits).

    /// A room's lifecycle state; the default (active, no expiry) for a room never set.
    fn room_state<'a>(&'a self, _room: &'a RoomId) -> StoreFuture<'a, RoomState> {
        Box::pin(async { Ok(RoomState::default()) })
    }

    /// Records a room's lifecycle state (only the room's owner writes it).
    fn set_room_state<'a>(
        &'a self,
        _room: &'a RoomId,
        _state: RoomState,
        _guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(not_kept()) })
    }

    /// Where a room's webhook delivery stands, if it may be behind (see `hooks`).
    fn hook_cursor<'a>(&'a self, _room: &'a RoomId) -> StoreFuture<'a, Option<HookCursor>> {
        Box::pin(async { Ok(None) })
    }

    /// Records where a room's webhook delivery stands. Writes by one process land in the
    /// order they were made, whatever order they arrive in.
    fn set_hook_cursor<'a>(
        &'a self,
        _room: &'a RoomId,
        _cursor: HookCursor,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(not_kept()) })
    }

    /// Forgets a room's cursor: everything stored in it has been delivered.
    fn clear_hook_cursor<'a>(&'a self, _room: &'a RoomId) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(not_kept()) })
    }

    /// Rooms that have a cursor (deliveries may be pending), at most `limit`.
    fn hook_rooms(&self, _limit: usize) -> StoreFuture<'_, Vec<RoomId>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Keeps a delivery that ran out of attempts (or age).
    fn put_dead_letter<'a>(&'a self, _dead: &'a DeadLetter) -> StoreFuture<'a, ()> {
        Box::pin(async { Err(not_kept()) })
    }

    /// Dead letters of one room (oldest first), or of every room, at most `limit`.
    fn dead_letters<'a>(
        &'a self,
        _room: Option<&'a RoomId>,
        _limit: usize,
    ) -> StoreFuture<'a, Vec<DeadLetter>> {
        Box::pin(async { Err(not_kept()) })
    }

    /// One dead letter.
    fn dead_letter<'a>(
        &'a self,
        _room: &'a RoomId,
        _id: MessageId,
    ) -> StoreFuture<'a, Option<DeadLetter>> {
        Box::pin(async { Err(not_kept()) })
    }

    /// Removes one dead letter; `false` if there was none.
    fn delete_dead_letter<'a>(
        &'a self,
        _room: &'a RoomId,
        _id: MessageId,
    ) -> StoreFuture<'a, bool> {
        Box::pin(async { Err(not_kept()) })
    }

    /// Cheap liveness probe used by readiness.
    fn check(&self) -> StoreFuture<'_, ()>;

    /// Short name for logs and `/readyz`.
    fn name(&self) -> &'static str;
}
