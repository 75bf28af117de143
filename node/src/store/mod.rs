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

use common::{ChatMessage, MessageId, RoomId};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out")]
    Timeout,
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
    fn append<'a>(
        &'a self,
        room: &'a RoomId,
        batch: &'a [ChatMessage],
    ) -> BoxFuture<'a, Result<(), StoreError>>;

    /// Reads one page of a room's history, oldest first.
    fn read<'a>(
        &'a self,
        room: &'a RoomId,
        query: HistoryQuery,
    ) -> BoxFuture<'a, Result<Vec<ChatMessage>, StoreError>>;

    /// Cheap liveness probe used by readiness.
    fn check(&self) -> BoxFuture<'_, Result<(), StoreError>>;

    /// Short name for logs and `/readyz`.
    fn name(&self) -> &'static str;
}
