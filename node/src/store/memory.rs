//! The single-node embedded store: history in this process's memory.
//!
//! Documented as the embedded mode for development and demos: it keeps the newest
//! `per_room` messages of each room and loses everything on restart. Production and every
//! test of storage behaviour use the CQL store against a real server.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use common::{ChatMessage, MessageId, RoomId};

use super::{
    DeadLetter, HistoryQuery, HookCursor, MessageStore, PageFrom, RoomState, StoreError,
    StoreFuture, WriteGuard,
};

pub struct MemoryStore {
    per_room: usize,
    rooms: Mutex<HashMap<RoomId, VecDeque<ChatMessage>>>,
    states: Mutex<HashMap<RoomId, RoomState>>,
    cursors: Mutex<BTreeMap<RoomId, HookCursor>>,
    dead: Mutex<BTreeMap<(RoomId, MessageId), DeadLetter>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<MutexGuard<'_, T>, StoreError> {
    m.lock()
        .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))
}

impl MemoryStore {
    pub fn new(per_room: usize) -> Self {
        Self {
            per_room: per_room.max(1),
            rooms: Mutex::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
            cursors: Mutex::new(BTreeMap::new()),
            dead: Mutex::new(BTreeMap::new()),
        }
    }

    fn append_now(&self, room: &RoomId, batch: &[ChatMessage]) -> Result<(), StoreError> {
        let mut rooms = self
            .rooms
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))?;
        let log = rooms.entry(room.clone()).or_default();
        for m in batch {
            // Appends arrive in id order except retries of a failed batch; keep the log
            // sorted and free of duplicates either way.
            match log.back() {
                Some(last) if last.id >= m.id => {
                    if let Err(at) = log.binary_search_by_key(&m.id, |x| x.id) {
                        log.insert(at, m.clone());
                    }
                }
                _ => log.push_back(m.clone()),
            }
        }
        while log.len() > self.per_room {
            log.pop_front();
        }
        Ok(())
    }

    fn read_now(&self, room: &RoomId, q: HistoryQuery) -> Result<Vec<ChatMessage>, StoreError> {
        let rooms = self
            .rooms
            .lock()
            .map_err(|_| StoreError::Unavailable("memory store lock poisoned".into()))?;
        let Some(log) = rooms.get(room) else {
            return Ok(Vec::new());
        };
        let start = q.after.map_or(0, |a| log.partition_point(|m| m.id <= a));
        let end = q
            .before
            .map_or(log.len(), |b| log.partition_point(|m| m.id < b));
        if start >= end {
            return Ok(Vec::new());
        }
        let (start, end) = match q.from {
            PageFrom::Oldest => (start, end.min(start + q.limit)),
            PageFrom::Newest => (start.max(end.saturating_sub(q.limit)), end),
        };
        Ok(log.range(start..end).cloned().collect())
    }
}

impl MessageStore for MemoryStore {
    fn append<'a>(
        &'a self,
        room: &'a RoomId,
        batch: &'a [ChatMessage],
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if !guard.may_write() {
                return Err(StoreError::Fenced);
            }
            self.append_now(room, batch)
        })
    }

    fn read<'a>(
        &'a self,
        room: &'a RoomId,
        query: HistoryQuery,
    ) -> StoreFuture<'a, Vec<ChatMessage>> {
        Box::pin(async move { self.read_now(room, query) })
    }

    fn room_state<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, RoomState> {
        Box::pin(async move { Ok(lock(&self.states)?.get(room).copied().unwrap_or_default()) })
    }

    fn set_room_state<'a>(
        &'a self,
        room: &'a RoomId,
        state: RoomState,
        guard: &'a dyn WriteGuard,
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if !guard.may_write() {
                return Err(StoreError::Fenced);
            }
            lock(&self.states)?.insert(room.clone(), state);
            Ok(())
        })
    }

    fn hook_cursor<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, Option<HookCursor>> {
        Box::pin(async move { Ok(lock(&self.cursors)?.get(room).cloned()) })
    }

    fn set_hook_cursor<'a>(&'a self, room: &'a RoomId, cursor: HookCursor) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            lock(&self.cursors)?.insert(room.clone(), cursor);
            Ok(())
        })
    }

    fn clear_hook_cursor<'a>(&'a self, room: &'a RoomId) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            lock(&self.cursors)?.remove(room);
            Ok(())
        })
    }

    fn hook_rooms(&self, limit: usize) -> StoreFuture<'_, Vec<RoomId>> {
        Box::pin(async move { Ok(lock(&self.cursors)?.keys().take(limit).cloned().collect()) })
    }

    fn put_dead_letter<'a>(&'a self, dead: &'a DeadLetter) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = (dead.message.room.clone(), dead.message.id);
            lock(&self.dead)?.insert(key, dead.clone());
            Ok(())
        })
    }

    fn dead_letters<'a>(
        &'a self,
        room: Option<&'a RoomId>,
        limit: usize,
    ) -> StoreFuture<'a, Vec<DeadLetter>> {
        Box::pin(async move {
            let dead = lock(&self.dead)?;
            Ok(dead
                .values()
                .filter(|d| room.is_none_or(|r| &d.message.room == r))
                .take(limit)
                .cloned()
                .collect())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        room: &'a RoomId,
        id: MessageId,
    ) -> StoreFuture<'a, Option<DeadLetter>> {
        Box::pin(async move { Ok(lock(&self.dead)?.get(&(room.clone(), id)).cloned()) })
    }

    fn delete_dead_letter<'a>(&'a self, room: &'a RoomId, id: MessageId) -> StoreFuture<'a, bool> {
        Box::pin(async move { Ok(lock(&self.dead)?.remove(&(room.clone(), id)).is_some()) })
    }

    fn check(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{ClientMsgId, MessageId, UserId};

    fn msg(id: u64) -> ChatMessage {
        ChatMessage {
            room: RoomId::new("r").expect("room"),
            id: MessageId(id),
            from: UserId::new("u").expect("user"),
            cid: ClientMsgId::new(format!("c{id}")).expect("cid"),
            body: String::new(),
            ts: 0,
        }
    }

    fn ids(v: Vec<ChatMessage>) -> Vec<u64> {
        v.into_iter().map(|m| m.id.0).collect()
    }

    fn q(after: Option<u64>, before: Option<u64>, limit: usize, from: PageFrom) -> HistoryQuery {
        HistoryQuery {
            after: after.map(MessageId),
            before: before.map(MessageId),
            limit,
            from,
        }
    }

    #[test]
    fn pages_in_both_directions_and_bounds_history() {
        let s = MemoryStore::new(5);
        let r = RoomId::new("r").expect("room");
        s.append_now(&r, &(1..=7).map(msg).collect::<Vec<_>>())
            .expect("append");
        // Retried and out-of-order appends neither duplicate nor unsort.
        s.append_now(&r, &[msg(5), msg(4)]).expect("append");
        let all = s
            .read_now(&r, q(None, None, 100, PageFrom::Oldest))
            .expect("read");
        assert_eq!(ids(all), vec![3, 4, 5, 6, 7]);
        let newest = s
            .read_now(&r, q(None, None, 2, PageFrom::Newest))
            .expect("read");
        assert_eq!(ids(newest), vec![6, 7]);
        let after = s
            .read_now(&r, q(Some(3), None, 2, PageFrom::Oldest))
            .expect("read");
        assert_eq!(ids(after), vec![4, 5]);
        let before = s
            .read_now(&r, q(None, Some(6), 2, PageFrom::Newest))
            .expect("read");
        assert_eq!(ids(before), vec![4, 5]);
        let between = s
            .read_now(&r, q(Some(3), Some(7), 10, PageFrom::Oldest))
            .expect("read");
        assert_eq!(ids(between), vec![4, 5, 6]);
        let empty = s
            .read_now(&r, q(Some(7), Some(3), 10, PageFrom::Oldest))
            .expect("read");
        assert!(empty.is_empty());
    }
}
