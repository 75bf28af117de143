//! The consistent-hash ring: which node owns a room.
//!
//! Built with the `hashring` crate over virtual nodes and one stable hasher (XXH3-64, seed
//! 0, over explicit bytes), so every router and node, in any process, on any version of
//! Rust, computes the same owner for the same membership. Only `HashRing::batch_add` and
//! `get` are used: `get_with_replicas` returns neighbouring ring entries rather than
//! distinct nodes, and `add` does not deduplicate, so membership is deduplicated here
//! before the ring is built. A ring is immutable; a membership change builds a new one.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hash, Hasher};

use hashring::HashRing;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3Default;

/// Virtual nodes per node unless configured otherwise.
pub const DEFAULT_VNODES: u32 = 160;

/// A live node as members see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node's stable id (`--node-id`), also part of its message ids.
    pub id: u16,
    /// Where routers and clients reach its WebSocket and HTTP API: `host:port`.
    pub addr: String,
    /// Unix ms when the node process started.
    pub started_at_ms: u64,
    /// The registration period this entry belongs to: a node that lost its lease registers
    /// again under a new one, which changes the ring's version (not its owners). 0 for
    /// entries from before incarnations existed.
    #[serde(default)]
    pub incarnation: u64,
}

/// XXH3-64 with seed 0: a published algorithm, so owners never change with the toolchain.
#[derive(Clone, Copy, Default, Debug)]
pub struct StableHash;

impl BuildHasher for StableHash {
    type Hasher = Xxh3Default;
    fn build_hasher(&self) -> Xxh3Default {
        Xxh3Default::new()
    }
}

/// One virtual node: hashed as the bytes `"<node id>#<index>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct VNode {
    node: u16,
    index: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(format!("{}#{}", self.node, self.index).as_bytes());
    }
}

/// A room key: hashed as the room id's bytes only (no length prefix or terminator, which
/// `str`'s own `Hash` would add and which the standard library does not promise to keep).
struct RoomKey<'a>(&'a str);

impl Hash for RoomKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// An immutable ring over a membership snapshot.
#[derive(Clone, Debug)]
pub struct Ring {
    nodes: Vec<NodeInfo>,
    vnodes: u32,
    ring: HashRing<VNode, StableHash>,
    version: u64,
}

impl Ring {
    /// Builds the ring. Duplicate ids keep the last entry given.
    pub fn new(nodes: impl IntoIterator<Item = NodeInfo>, vnodes: u32) -> Ring {
        let by_id: BTreeMap<u16, NodeInfo> = nodes.into_iter().map(|n| (n.id, n)).collect();
        let nodes: Vec<NodeInfo> = by_id.into_values().collect();
        let vnodes = vnodes.max(1);
        let mut ring = HashRing::with_hasher(StableHash);
        ring.batch_add(
            nodes
                .iter()
                .flat_map(|n| (0..vnodes).map(move |index| VNode { node: n.id, index }))
                .collect(),
        );
        let mut digest = Xxh3Default::new();
        digest.write(&vnodes.to_le_bytes());
        for n in &nodes {
            digest.write(&n.id.to_le_bytes());
            digest.write(n.addr.as_bytes());
            digest.write(&[0]);
            // Left out when absent, so rings of entries without one keep their versions.
            if n.incarnation != 0 {
                digest.write(&n.incarnation.to_le_bytes());
            }
        }
        Ring {
            version: digest.finish(),
            nodes,
            vnodes,
            ring,
        }
    }

    pub fn empty() -> Ring {
        Ring::new([], DEFAULT_VNODES)
    }

    /// The node that owns `room`, or `None` on an empty ring.
    pub fn owner(&self, room: &str) -> Option<&NodeInfo> {
        let v = self.ring.get(&RoomKey(room))?;
        self.get_node(v.node)
    }

    /// The owner's id, or `None` on an empty ring.
    pub fn owner_id(&self, room: &str) -> Option<u16> {
        self.ring.get(&RoomKey(room)).map(|v| v.node)
    }

    pub fn get_node(&self, id: u16) -> Option<&NodeInfo> {
        self.nodes
            .binary_search_by_key(&id, |n| n.id)
            .ok()
            .map(|i| &self.nodes[i])
    }

    /// The members, sorted by id.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn vnodes(&self) -> u32 {
        self.vnodes
    }

    /// A digest of the membership (ids, addresses, incarnations, vnode count): equal on
    /// every router and node that sees the same members, different after any change,
    /// including a node registering again after it lost its lease. Owners depend on ids
    /// only. Start times are left out.
    pub fn version(&self) -> u64 {
        self.version
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: u16) -> NodeInfo {
        NodeInfo {
            id,
            addr: format!("10.0.0.{id}:7001"),
            started_at_ms: 0,
            incarnation: 0,
        }
    }

    fn ring(ids: impl IntoIterator<Item = u16>) -> Ring {
        Ring::new(ids.into_iter().map(node), DEFAULT_VNODES)
    }

    fn rooms(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("room-{i}")).collect()
    }

    /// Golden owners: a change here moves every deployed cluster's rooms. Only change them
    /// together with a documented migration.
    #[test]
    fn owners_are_stable_across_versions() {
        let r = ring([1, 2, 3]);
        let got: Vec<u16> = [
            "lobby", "team-1", "team-2", "a", "room-42", "x:y.z", "general", "random",
        ]
        .iter()
        .map(|room| r.owner_id(room).expect("owner"))
        .collect();
        assert_eq!(got, GOLDEN, "the ring's placement changed");
        assert_eq!(
            r.version(),
            GOLDEN_VERSION,
            "the ring's version digest changed"
        );
    }

    const GOLDEN: [u16; 8] = [3, 2, 1, 1, 3, 1, 1, 1];
    const GOLDEN_VERSION: u64 = 15_417_639_770_677_853_103;

    #[test]
    fn membership_order_and_duplicates_do_not_matter() {
        let a = Ring::new([node(3), node(1), node(2)], DEFAULT_VNODES);
        let b = Ring::new([node(1), node(2), node(3), node(2)], DEFAULT_VNODES);
        assert_eq!(a.version(), b.version());
        assert_eq!(a.len(), 3);
        for room in rooms(1000) {
            assert_eq!(a.owner_id(&room), b.owner_id(&room));
        }
        assert_ne!(a.version(), ring([1, 2]).version());
        assert!(Ring::empty().owner("x").is_none());
    }

    #[test]
    fn adding_a_node_moves_about_one_in_n_rooms_and_only_to_it() {
        let all = rooms(100_000);
        for n in 3u16..=9 {
            let before = ring(1..=n);
            let after = ring(1..=n + 1);
            let mut moved = 0;
            for room in &all {
                let (b, a) = (before.owner_id(room), after.owner_id(room));
                if b != a {
                    moved += 1;
                    assert_eq!(a, Some(n + 1), "a room moved between old nodes");
                }
            }
            let share = moved as f64 / all.len() as f64;
            let ideal = 1.0 / f64::from(n + 1);
            eprintln!("{n}->{} nodes: moved {share:.3} (ideal {ideal:.3})", n + 1);
            assert!(
                (share - ideal).abs() < ideal * 0.35,
                "{n}->{}: moved {share:.3}, ideal {ideal:.3}",
                n + 1
            );
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_rooms() {
        let all = rooms(50_000);
        let before = ring(1..=5);
        let after = ring([1, 2, 4, 5]);
        for room in &all {
            let b = before.owner_id(room);
            if b != Some(3) {
                assert_eq!(b, after.owner_id(room));
            }
        }
    }

    #[test]
    fn load_is_balanced_within_the_documented_bound() {
        let all = rooms(100_000);
        for n in 3u16..=10 {
            let r = ring(1..=n);
            let mut counts = BTreeMap::new();
            for room in &all {
                *counts
                    .entry(r.owner_id(room).expect("owner"))
                    .or_insert(0usize) += 1;
            }
            assert_eq!(counts.len(), usize::from(n));
            let mean = all.len() as f64 / f64::from(n);
            let max = *counts.values().max().expect("max") as f64;
            // Reported in deploy/OPERATIONS.md (max/mean per node count); printed with
            // `cargo test -p common balanced -- --nocapture`.
            eprintln!("{n} nodes: max/mean {:.3}", max / mean);
            assert!(max / mean < 1.25, "{n} nodes: max/mean {:.3}", max / mean);
        }
    }
}
