//! A store that fails when a test says so, and otherwise is the store it wraps (the real
//! CQL store, or the memory store for the node's own failure handling). Every call is
//! passed through; only the faults are the test's.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_node::store::{
    DeadLetter, HistoryQuery, HookCursor, MessageStore, RoomState, StoreError, StoreFuture,
    WriteGuard,
};
use common::{ChatMessage, MessageId, RoomId};

type Predicate = dyn Fn(&[ChatMessage]) -> bool + Send + Sync;

pub struct Faulty {
    inner: Arc<dyn MessageStore>,
    /// While set, appends, reads and the readiness probe fail.
    pub down: AtomicBool,
    /// An append of a batch this says yes to fails (and nothing of it is written).
    fail_batch: Box<Predicate>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn MessageStore>) -> Faulty {
        Faulty::failing_batches(inner, |_| false)
    }

    pub fn failing_batches(
        inner: Arc<dyn MessageStore>,
        fail_batch: impl Fn(&[ChatMessage]) -> bool + Send + Sync + 'static,
    ) -> Faulty {
        Faulty {
            inner,
            down: AtomicBool::new(false),
            fail_batch: Box::new(fail_batch),
        }
    }

    fn check_up(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

impl MessageStore for Faulty {
    fn append<'a>(
        &'a self,
        room: &'a RoomId,
        batch: &'a [ChatMessage],
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.check_up()?;
            if (self.fail_batch)(batch) {
                return Err(StoreError::Unavailable("failed by the test".into()));
            }
            self.inner.append(room, batch, guard).await
        })
    }

    fn read<'a>(&'a self, room: &'a RoomId, q: HistoryQuery) -> StoreFuture<'a, Vec<ChatMessage>> {
        Box::pin(async move {
            self.check_up()?;
            self.inner.read(room, q).await
        })
    }

    fn check(&self) -> StoreFuture<'_, ()> {
        Box::pin(async move {
            self.check_up()?;
            self.inner.check().await
        })
    }

    fn fence<'a>(
        &'a self,
        room: &'a RoomId,
        after: MessageId,
        window: Duration,
    ) -> StoreFuture<'a, ()> {
        self.inner.fence(room, after, window)
    }

    fn room_state<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, RoomState> {
        self.inner.room_state(room)
    }

    fn set_room_state<'a>(
        &'a self,
        room: &'a RoomId,
        state: RoomState,
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        self.inner.set_room_state(room, state, guard)
    }

    fn hook_cursor<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, Option<HookCursor>> {
        self.inner.hook_cursor(room)
    }

    fn set_hook_cursor<'a>(&'a self, room: &'a RoomId, cursor: HookCursor) -> StoreFuture<'a, ()> {
        self.inner.set_hook_cursor(room, cursor)
    }

    fn clear_hook_cursor<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, ()> {
        self.inner.clear_hook_cursor(room)
    }

    fn hook_rooms(&self, limit: usize) -> StoreFuture<'_, Vec<RoomId>> {
        self.inner.hook_rooms(limit)
    }

    fn put_dead_letter<'a>(&'a self, dead: &'a DeadLetter) -> StoreFuture<'a, ()> {
        self.inner.put_dead_letter(dead)
    }

    fn dead_letters<'a>(
        &'a self,
        room: Option<&'a RoomId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<DeadLetter>> {
        self.inner.dead_letters(room, limit)
    }

    fn dead_letter<'a>(
        &'a self,
        room: &'a RoomId,
        id: MessageId,
    ) -> StoreFuture<'a, Option<DeadLetter>> {
        self.inner.dead_letter(room, id)
    }

    fn delete_dead_letter<'a>(&'a self, room: &'a RoomId, id: MessageId) -> StoreFuture<'a, bool> {
        self.inner.delete_dead_letter(room, id)
    }

    fn name(&self) -> &'static str {
        "faulty"
    }
}
