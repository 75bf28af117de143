//! A room's memory of the client message ids it accepted: `(sender, cid)` → the message id
//! it got and what the store has said about it, so a retry gets the same id and is stored
//! once.
//!
//! The window is bounded by age (`--dedupe-window`) and by count (`--dedupe-max-per-room`),
//! oldest forgotten first, except that an entry still waiting for the store is never
//! forgotten (those are bounded by `--max-pending-per-room`). This module only remembers and
//! forgets; it never answers anyone, and it reads no clock: the room passes the time in.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use common::{ChatMessage, ClientMsgId, MessageId, UserId};
use tokio::time::Instant;

use super::cmd::Reply;

/// A 128-bit digest of (sender, cid) rather than the two strings: one allocation-free key
/// per remembered message, for windows of up to `--dedupe-max-per-room` entries. Two
/// different pairs in one room's window share a digest with probability about n²/2¹²⁹.
pub(super) type Key = u128;

pub(super) fn key(from: &UserId, cid: &ClientMsgId) -> Key {
    let mut h = xxhash_rust::xxh3::Xxh3Default::new();
    h.update(from.as_str().as_bytes());
    // Both parts are from a charset without NUL, so the separator keeps pairs distinct.
    h.update(&[0]);
    h.update(cid.as_str().as_bytes());
    h.digest128()
}

pub(super) enum State {
    /// Accepted and delivered; these senders wait for the store.
    Pending(Vec<Reply>),
    Durable,
    /// The store refused it; a retry with the same cid re-persists this message (same id)
    /// without delivering it again. Boxed: most entries are `Durable`, and the map's slots
    /// are as large as the largest variant.
    Failed(Box<ChatMessage>),
}

pub(super) struct Entry {
    pub(super) id: MessageId,
    /// When the room accepted it (or took a retry of a failed write), for the ack latency.
    pub(super) accepted: Instant,
    pub(super) state: State,
    /// Which slot of the age order is this entry's (see [`Window::forget`]).
    slot: u64,
}

pub(super) struct Window {
    entries: HashMap<Key, Entry>,
    /// Keys in the order they were remembered, with when and under which slot number.
    order: VecDeque<(Instant, u64, Key)>,
    next_slot: u64,
    max_age: Duration,
    max_len: usize,
}

impl Window {
    pub(super) fn new(max_age: Duration, max_len: usize) -> Window {
        Window {
            entries: HashMap::new(),
            order: VecDeque::new(),
            next_slot: 0,
            max_age,
            max_len,
        }
    }

    pub(super) fn get_mut(&mut self, key: &Key) -> Option<&mut Entry> {
        self.entries.get_mut(key)
    }

    #[cfg(test)]
    pub(super) fn contains(&self, key: &Key) -> bool {
        self.entries.contains_key(key)
    }

    /// Remembers `key` from `now` on, then forgets what the bounds no longer allow.
    pub(super) fn remember(
        &mut self,
        key: Key,
        id: MessageId,
        accepted: Instant,
        state: State,
        now: Instant,
    ) {
        let slot = self.next_slot;
        self.next_slot += 1;
        self.order.push_back((now, slot, key));
        self.entries.insert(
            key,
            Entry {
                id,
                accepted,
                state,
                slot,
            },
        );
        while let Some(&(at, slot, key)) = self.order.front() {
            let expired = now.saturating_duration_since(at) > self.max_age
                || self.entries.len() > self.max_len;
            if !expired {
                break;
            }
            match self.entries.get(&key) {
                // Pending entries stay until the store answers; they are bounded by
                // max_pending_per_room.
                Some(e) if e.slot == slot && matches!(e.state, State::Pending(_)) => break,
                Some(e) if e.slot == slot => {
                    self.entries.remove(&key);
                }
                // Forgotten already, or remembered again later under a newer slot.
                _ => {}
            }
            self.order.pop_front();
        }
    }

    /// Forgets `key` now, for a message that will never be stored by this room. Its slot in
    /// the age order stays behind and is skipped when it comes up, so a later `remember` of
    /// the same key is not cut short by it.
    pub(super) fn forget(&mut self, key: &Key) -> Option<Entry> {
        self.entries.remove(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(cid: &str) -> Key {
        key(
            &UserId::new("u").expect("user"),
            &ClientMsgId::new(cid).expect("cid"),
        )
    }

    #[test]
    fn keys_tell_sender_and_cid_apart() {
        let a = UserId::new("ab").expect("user");
        let b = UserId::new("a").expect("user");
        let c1 = ClientMsgId::new("c").expect("cid");
        let c2 = ClientMsgId::new("bc").expect("cid");
        assert_ne!(key(&a, &c1), key(&b, &c2));
        assert_eq!(key(&a, &c1), key(&a, &c1));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded_by_age_and_count_but_pending_entries_stay() {
        let mut w = Window::new(Duration::from_secs(10), 2);
        let t0 = Instant::now();
        w.remember(k("a"), MessageId(1), t0, State::Pending(Vec::new()), t0);
        w.remember(k("b"), MessageId(2), t0, State::Durable, t0);
        // Over the count, but the oldest is pending: nothing is forgotten.
        w.remember(k("c"), MessageId(3), t0, State::Durable, t0);
        assert!(w.contains(&k("a")) && w.contains(&k("b")) && w.contains(&k("c")));
        w.get_mut(&k("a")).expect("a").state = State::Durable;
        let t1 = t0 + Duration::from_secs(11);
        w.remember(k("d"), MessageId(4), t1, State::Durable, t1);
        assert!(!w.contains(&k("a")) && !w.contains(&k("b")) && !w.contains(&k("c")));
        assert!(w.contains(&k("d")));
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_key_remembered_again_keeps_its_new_age() {
        let mut w = Window::new(Duration::from_secs(10), 100);
        let t0 = Instant::now();
        w.remember(k("a"), MessageId(1), t0, State::Durable, t0);
        assert!(w.forget(&k("a")).is_some());
        let t1 = t0 + Duration::from_secs(8);
        w.remember(k("a"), MessageId(2), t1, State::Durable, t1);
        // The first slot of "a" expires here; the entry remembered at t1 must survive it.
        let t2 = t0 + Duration::from_secs(11);
        w.remember(k("b"), MessageId(3), t2, State::Durable, t2);
        assert_eq!(w.get_mut(&k("a")).map(|e| e.id), Some(MessageId(2)));
    }
}
