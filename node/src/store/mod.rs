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

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out")]
    Timeout,
    /// The writer's [`WriteGuard`] said no: nothing was written.
    #[error("the writer may no longer write this room")]
    Fenced,
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
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Reads one page of a room's history, oldest first.
    fn read<'a>(
        &'a self,
        room: &'a RoomId,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<Vec<ChatMessage>, StoreError>>;

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
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async { Ok(()) })
    }

    /// Cheap liveness probe used by readiness.
    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Short name for logs and `/readyz`.
    fn name(&self) -> &'static str;
}
