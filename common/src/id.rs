//! Message ids: 64-bit, time-ordered, unique across the cluster.
//!
//! Layout (most significant first): 41 bits of milliseconds since [`EPOCH_MS`]
//! (2024-01-01T00:00:00Z, good until 2093), 10 bits of node id, 12 bits of sequence within
//! the millisecond. Two nodes never mint the same id because their node ids differ; one node
//! never mints the same id twice because the generator is monotonic. On the wire an id is a
//! decimal string, since JavaScript numbers lose precision past 2^53.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// 2024-01-01T00:00:00Z in Unix milliseconds.
pub const EPOCH_MS: u64 = 1_704_067_200_000;
pub const NODE_BITS: u32 = 10;
pub const SEQ_BITS: u32 = 12;
/// Largest node id that fits in an id.
pub const MAX_NODE_ID: u16 = (1 << NODE_BITS) - 1;
const TIME_SHIFT: u32 = NODE_BITS + SEQ_BITS;

/// A cluster-unique, time-ordered message id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId(pub u64);

impl MessageId {
    /// The smallest id minted at or after `unix_ms`; useful as an exclusive lower bound
    /// (`MessageId::first_at(t).0 - 1`) or to turn a time into a history cursor.
    pub fn first_at(unix_ms: u64) -> MessageId {
        MessageId(unix_ms.saturating_sub(EPOCH_MS) << TIME_SHIFT)
    }

    /// Unix milliseconds at which the id was minted.
    pub fn unix_ms(self) -> u64 {
        (self.0 >> TIME_SHIFT) + EPOCH_MS
    }

    pub fn node(self) -> u16 {
        ((self.0 >> SEQ_BITS) & u64::from(MAX_NODE_ID)) as u16
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.0)
    }
}

/// A string that is not an id in its one canonical form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadId;

impl fmt::Display for BadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a message id: a decimal u64 with no sign, spaces or leading zeros")
    }
}

impl std::error::Error for BadId {}

/// Parses only the form ids are written in: ASCII digits, no sign, no whitespace, no
/// leading zero (except `0` itself), at most `u64::MAX`. Every place an id is read (the
/// upgrade query, `join` frames, HTTP cursors) goes through here, so all agree.
impl std::str::FromStr for MessageId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if !canonical {
            return Err(BadId);
        }
        s.parse().map(MessageId).map_err(|_| BadId)
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = MessageId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message id as a decimal string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<MessageId, E> {
                v.parse().map_err(E::custom)
            }
            // Accepted for convenience; ids above 2^53 lose precision in JavaScript.
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<MessageId, E> {
                Ok(MessageId(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Mints ids for one node. Lock-free; shared by all rooms of the node.
#[derive(Debug)]
pub struct IdGenerator {
    node: u64,
    last: AtomicU64,
}

impl IdGenerator {
    /// Panics if `node` exceeds [`MAX_NODE_ID`]; config validation rejects that first.
    pub fn new(node: u16) -> Self {
        assert!(node <= MAX_NODE_ID, "node id {node} exceeds {MAX_NODE_ID}");
        Self {
            node: u64::from(node),
            last: AtomicU64::new(0),
        }
    }

    /// A new id, greater than every id this generator returned before.
    pub fn next(&self) -> MessageId {
        self.next_after(MessageId(0))
    }

    /// A new id greater than `floor` and than every id this generator returned before.
    ///
    /// A room passes its last id so ids stay increasing within the room even if this node's
    /// clock is behind the node that owned the room before.
    pub fn next_after(&self, floor: MessageId) -> MessageId {
        self.next_at(now_ms(), floor)
    }

    fn next_at(&self, unix_ms: u64, floor: MessageId) -> MessageId {
        let node_bits = self.node << SEQ_BITS;
        let stamp = |ms: u64| (ms << TIME_SHIFT) | node_bits;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let now = stamp(unix_ms.saturating_sub(EPOCH_MS));
            let bound = last.max(floor.0);
            let seq_mask = (1u64 << SEQ_BITS) - 1;
            let candidate = if now > bound {
                now
            } else if bound & !seq_mask == ((bound >> TIME_SHIFT) << TIME_SHIFT) | node_bits
                && bound & seq_mask != seq_mask
            {
                // The bound is ours and its millisecond has sequence numbers left.
                bound + 1
            } else {
                stamp((bound >> TIME_SHIFT) + 1)
            };
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return MessageId(candidate),
                Err(actual) => last = actual,
            }
        }
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_canonical_decimal_form_is_an_id() {
        for ok in ["0", "1", "42", "18446744073709551615"] {
            assert_eq!(
                ok.parse::<MessageId>().map(|i| i.0.to_string()).as_deref(),
                Ok(ok)
            );
        }
        for bad in [
            "",
            "+1",
            "-1",
            " 1",
            "1 ",
            "\t1",
            "01",
            "00",
            "1e3",
            "0x1",
            "1_000",
            "١",
            "18446744073709551616",
        ] {
            assert_eq!(bad.parse::<MessageId>(), Err(BadId), "{bad:?}");
        }
    }

    #[test]
    fn ids_are_strictly_increasing_within_one_millisecond() {
        let g = IdGenerator::new(7);
        let t = EPOCH_MS + 1_000;
        let mut prev = MessageId(0);
        for _ in 0..10_000 {
            let id = g.next_at(t, MessageId(0));
            assert!(id > prev);
            assert_eq!(id.node(), 7);
            prev = id;
        }
        // 10,000 ids do not fit in one millisecond's 4,096 sequence numbers: time moved on.
        assert!(prev.unix_ms() > t);
    }

    #[test]
    fn ids_follow_the_clock_and_carry_time() {
        let g = IdGenerator::new(1);
        let a = g.next_at(EPOCH_MS + 5, MessageId(0));
        let b = g.next_at(EPOCH_MS + 9, MessageId(0));
        assert_eq!(a.unix_ms(), EPOCH_MS + 5);
        assert_eq!(b.unix_ms(), EPOCH_MS + 9);
        assert!(b > a);
        assert!(MessageId::first_at(EPOCH_MS + 9) <= b);
        assert!(MessageId::first_at(EPOCH_MS + 10) > b);
    }

    #[test]
    fn a_floor_from_another_node_ahead_in_time_is_respected() {
        let other = IdGenerator::new(900);
        let ahead = other.next_at(EPOCH_MS + 50_000, MessageId(0));
        let g = IdGenerator::new(3);
        let id = g.next_at(EPOCH_MS + 10, ahead);
        assert!(id > ahead);
        assert_eq!(id.node(), 3);
        // And later ids from g stay above it even without the floor.
        assert!(g.next_at(EPOCH_MS + 11, MessageId(0)) > id);
    }

    #[test]
    fn two_nodes_never_collide() {
        let a = IdGenerator::new(1);
        let b = IdGenerator::new(2);
        let t = EPOCH_MS + 77;
        let xs: std::collections::HashSet<_> = (0..5000)
            .flat_map(|_| [a.next_at(t, MessageId(0)), b.next_at(t, MessageId(0))])
            .collect();
        assert_eq!(xs.len(), 10_000);
    }

    #[test]
    fn concurrent_minting_is_unique() {
        let g = std::sync::Arc::new(IdGenerator::new(5));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let g = g.clone();
                std::thread::spawn(move || (0..20_000).map(|_| g.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for h in handles {
            for id in h.join().expect("thread") {
                assert!(all.insert(id));
            }
        }
        assert_eq!(all.len(), 80_000);
    }

    #[test]
    fn wire_form_is_a_decimal_string() {
        let id = MessageId(1 << 60);
        let s = serde_json::to_string(&id).expect("ser");
        assert_eq!(s, "\"1152921504606846976\"");
        assert_eq!(serde_json::from_str::<MessageId>(&s).expect("de"), id);
        assert!(serde_json::from_str::<MessageId>("\"12x\"").is_err());
    }
}
