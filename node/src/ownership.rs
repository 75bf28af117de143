//! What a room needs from the cluster to be served here: a [`Grant`].
//!
//! A room's task asks [`RoomOwnership::acquire`] before it loads the room from the store;
//! the answer comes only once this node holds a valid lease and the room's previous owner
//! has let go (see `cluster.rs`). The grant is then checked before every id is assigned and
//! before every ack: it is valid only while the lease of the incarnation that granted it
//! is, so a node that was paused or cut off stops accepting the moment it runs again. The
//! grant knows nothing of rings or Redis; standalone nodes get one that never ends.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chat_server::membership::{Lease, View};
use common::{MessageId, NodeInfo, Ring, RoomId};
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
        let incarnation = lease.incarnation();
        Grant::for_incarnation(lease, incarnation)
    }

    /// A grant valid only while `lease` is valid for `incarnation`.
    pub fn for_incarnation(lease: Lease, incarnation: u64) -> Grant {
        Grant { lease, incarnation }
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

    /// The registration period that granted it: the Unix ms at which it began (1 for a
    /// standalone node).
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Whether `id` was minted by this node during the incarnation that granted this: then
    /// this node wrote the room last, and no earlier owner's write can still be on its way
    /// (it fenced the store when it took the room). Otherwise the room must be fenced.
    pub fn minted_here(&self, id: MessageId, node: u16) -> bool {
        id.node() == node && id.unix_ms() >= self.incarnation
    }
}

impl crate::store::WriteGuard for Grant {
    fn may_write(&self) -> bool {
        self.is_valid()
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

/// This node's tenure over rooms across ring changes: the rings it has seen since the last
/// one every member applied, so it can tell a room it held all along (serve it at once)
/// from one it is taking over (wait until the ring is *settled*: every member has applied
/// it, so the previous owner has flushed and stopped, and every member that vanished
/// without leaving has certainly stopped writing). Pure: views and time are inputs.
#[derive(Debug)]
pub struct Tenure {
    me: u16,
    /// How long a ring change is waited out for members that predate `applied` (an older
    /// version in a rolling upgrade): they never say when they have let go.
    legacy_wait: Duration,
    last_settled: Option<Arc<Ring>>,
    /// Rings seen since `last_settled`, oldest first; the last is the current one.
    since: Vec<Arc<Ring>>,
    /// Our own earlier incarnations, which stopped serving before we registered again.
    quiesced: HashSet<u64>,
    /// Nothing is taken over before this (a predecessor process may still be writing).
    not_before: Option<Instant>,
}

/// What [`Tenure::decide`] says about serving a room here now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Serve,
    /// Wait for the previous owner: until the instant given (a departed member's writes,
    /// a legacy member's grace), or for the next view (`None`: acks still missing).
    Wait(Option<Instant>),
    Elsewhere(NodeInfo),
    /// The ring is empty: nobody may serve it.
    NoOwner,
}

/// Rings remembered while unsettled; past this, continuity is no longer claimed.
const MAX_UNSETTLED_RINGS: usize = 64;

impl Tenure {
    pub fn new(me: u16, legacy_wait: Duration) -> Tenure {
        Tenure {
            me,
            legacy_wait,
            last_settled: None,
            since: Vec::new(),
            quiesced: HashSet::new(),
            not_before: None,
        }
    }

    /// Takes over nothing before `at`.
    pub fn not_before(&mut self, at: Instant) {
        self.not_before = Some(at);
    }

    /// Whether `view` is settled for this node's `incarnation` at `now`; if not, until when
    /// to wait (`None`: until the view changes).
    pub fn settled(
        &self,
        view: &View,
        incarnation: u64,
        now: Instant,
    ) -> Result<(), Option<Instant>> {
        let mut until: Option<Instant> = None;
        let mut later = |t: Instant| {
            if now < t {
                until = Some(until.map_or(t, |u: Instant| u.max(t)));
            }
        };
        if let Some(t) = self.not_before {
            later(t);
        }
        let mut missing = false;
        // Our own record in this view must be the current incarnation's: a view read
        // before we registered again carries other members' acks of an older ring.
        match view.members.get(&self.me) {
            Some(r) if r.node.incarnation == incarnation => {}
            _ => missing = true,
        }
        let version = view.ring.version();
        for (id, rec) in &view.members {
            if *id == self.me {
                continue;
            }
            match rec.applied {
                Some(v) if v == version => {}
                Some(_) => missing = true,
                None => later(view.ring_since + self.legacy_wait),
            }
        }
        for d in &view.departed {
            if d.node.id == self.me && self.quiesced.contains(&d.node.incarnation) {
                continue;
            }
            later(d.safe_after);
        }
        match (missing, until) {
            (false, None) => Ok(()),
            (true, _) => Err(None),
            (false, Some(t)) => Err(Some(t)),
        }
    }

    /// Folds a view in; call it for every view and before every decision.
    pub fn observe(&mut self, view: &View, incarnation: u64, now: Instant) {
        if self.since.last().map(|r| r.version()) != Some(view.ring.version()) {
            self.since.push(view.ring.clone());
            if self.since.len() > MAX_UNSETTLED_RINGS {
                self.since.remove(0);
                self.last_settled = None;
            }
        }
        if self.settled(view, incarnation, now).is_ok() {
            self.last_settled = Some(view.ring.clone());
            self.since = vec![view.ring.clone()];
        }
    }

    /// Whether this node may serve `room` now under `incarnation`.
    pub fn decide(&mut self, room: &str, view: &View, incarnation: u64, now: Instant) -> Decision {
        self.observe(view, incarnation, now);
        let Some(owner) = view.ring.owner(room) else {
            return Decision::NoOwner;
        };
        if owner.id != self.me {
            return Decision::Elsewhere(owner.clone());
        }
        let wait = match self.settled(view, incarnation, now) {
            Ok(()) => return Decision::Serve,
            Err(until) => until,
        };
        if owner.incarnation != incarnation {
            // The ring still lists an older incarnation of ours.
            return Decision::Wait(None);
        }
        // Held all along since the last settled ring: nobody else can have served it,
        // since taking it would have needed our ack of a ring where we did not own it.
        let held = self
            .last_settled
            .as_ref()
            .is_some_and(|r| r.owner_id(room) == Some(self.me))
            && self.since.iter().all(|r| r.owner_id(room) == Some(self.me));
        if held && self.not_before.is_none_or(|t| now >= t) {
            return Decision::Serve;
        }
        Decision::Wait(wait)
    }

    /// The lease of the current incarnation lapsed: nothing held is held any more.
    pub fn lapsed(&mut self) {
        self.last_settled = None;
        self.since.clear();
    }

    /// `incarnation` (ours) has stopped serving every room: its departure needs no wait.
    pub fn quiesced(&mut self, incarnation: u64) {
        self.quiesced.insert(incarnation);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use chat_server::membership::{Departed, MemberRecord, MemberState};

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn node(id: u16, incarnation: u64) -> NodeInfo {
        NodeInfo {
            id,
            addr: format!("10.0.0.{id}:7001"),
            started_at_ms: 0,
            incarnation,
        }
    }

    /// A view of `nodes` (id, incarnation) where each member has applied what `acks` says:
    /// `Some(true)` this ring, `Some(false)` another one, `None` nothing (legacy).
    fn view(nodes: &[(u16, u64, Option<bool>)], departed: Vec<Departed>) -> View {
        let ring = Ring::new(nodes.iter().map(|&(id, inc, _)| node(id, inc)), 64);
        let version = ring.version();
        let members: BTreeMap<u16, MemberRecord> = nodes
            .iter()
            .map(|&(id, inc, ack)| {
                let mut r = MemberRecord::new(node(id, inc));
                r.state = MemberState::Active;
                r.applied = ack.map(|same| if same { version } else { version ^ 1 });
                (id, r)
            })
            .collect();
        View {
            ring: Arc::new(ring),
            ring_since: Instant::now(),
            members,
            departed,
            redis_ok: true,
        }
    }

    /// A room each of `ids` owns in `v`.
    fn room_of(v: &View, id: u16) -> String {
        (0..10_000)
            .map(|i| format!("room-{i}"))
            .find(|r| v.ring.owner_id(r) == Some(id))
            .expect("a room owned by the node")
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_taken_over_waits_for_every_members_ack() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        // Node 1 joins a cluster of 2 and 3: the rooms it gains are theirs until they ack.
        let before = view(&[(2, 20, Some(true)), (3, 30, Some(true))], vec![]);
        let after = view(
            &[
                (1, 10, Some(true)),
                (2, 20, Some(false)),
                (3, 30, Some(true)),
            ],
            vec![],
        );
        t.observe(&before, 10, now);
        let room = room_of(&after, 1);
        assert_eq!(t.decide(&room, &after, 10, now), Decision::Wait(None));
        let acked = view(
            &[
                (1, 10, Some(true)),
                (2, 20, Some(true)),
                (3, 30, Some(true)),
            ],
            vec![],
        );
        assert_eq!(t.decide(&room, &acked, 10, now), Decision::Serve);
        let theirs = room_of(&acked, 2);
        assert!(matches!(t.decide(&theirs, &acked, 10, now), Decision::Elsewhere(n) if n.id == 2));
    }

    #[tokio::test(start_paused = true)]
    async fn rooms_held_all_along_are_served_while_others_move() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        let settled = view(&[(1, 10, Some(true)), (2, 20, Some(true))], vec![]);
        t.observe(&settled, 10, now);
        // Node 3 joins; node 2 has not acked yet. A room node 1 kept is served at once.
        let change = view(
            &[
                (1, 10, Some(true)),
                (2, 20, Some(false)),
                (3, 30, Some(true)),
            ],
            vec![],
        );
        let kept = (0..10_000)
            .map(|i| format!("room-{i}"))
            .find(|r| settled.ring.owner_id(r) == Some(1) && change.ring.owner_id(r) == Some(1))
            .expect("a room node 1 keeps");
        assert_eq!(t.decide(&kept, &change, 10, now), Decision::Serve);
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_lost_and_regained_while_unsettled_waits() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        let a = view(&[(1, 10, Some(true)), (2, 20, Some(true))], vec![]);
        t.observe(&a, 10, now);
        // Node 3 joins and takes some of node 1's rooms; it leaves again before anyone
        // acked. Node 3 may have served them meanwhile only with node 1's ack, but node 1
        // cannot know that from the rings alone: it waits for the acks of the new ring.
        let b = view(
            &[
                (1, 10, Some(false)),
                (2, 20, Some(false)),
                (3, 30, Some(false)),
            ],
            vec![],
        );
        t.observe(&b, 10, now);
        let moved = (0..10_000)
            .map(|i| format!("room-{i}"))
            .find(|r| a.ring.owner_id(r) == Some(1) && b.ring.owner_id(r) == Some(3))
            .expect("a room that moved to node 3");
        let c = view(&[(1, 10, Some(true)), (2, 20, Some(false))], vec![]);
        assert_eq!(c.ring.version(), a.ring.version());
        assert_eq!(t.decide(&moved, &c, 10, now), Decision::Wait(None));
        let c_acked = view(&[(1, 10, Some(true)), (2, 20, Some(true))], vec![]);
        assert_eq!(t.decide(&moved, &c_acked, 10, now), Decision::Serve);
    }

    #[tokio::test(start_paused = true)]
    async fn a_departed_members_rooms_wait_until_its_writes_are_over() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        t.observe(
            &view(&[(1, 10, Some(true)), (2, 20, Some(true))], vec![]),
            10,
            now,
        );
        let safe = now + Duration::from_secs(3);
        let gone = Departed {
            node: node(2, 20),
            safe_after: safe,
        };
        let v = view(&[(1, 10, Some(true))], vec![gone]);
        let room = room_of(&view(&[(1, 10, None), (2, 20, None)], vec![]), 2);
        assert_eq!(v.ring.owner_id(&room), Some(1));
        assert_eq!(t.decide(&room, &v, 10, now), Decision::Wait(Some(safe)));
        tokio::time::advance(Duration::from_secs(3)).await;
        assert_eq!(t.decide(&room, &v, 10, Instant::now()), Decision::Serve);
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_lapse_nothing_is_held_until_the_new_incarnation_is_settled() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        let old = view(&[(1, 10, Some(true)), (2, 20, Some(true))], vec![]);
        t.observe(&old, 10, now);
        let mine = room_of(&old, 1);
        assert_eq!(t.decide(&mine, &old, 10, now), Decision::Serve);
        t.lapsed();
        // Registered again as incarnation 11: a stale view (still incarnation 10, with acks
        // of the old ring) must not settle anything.
        assert_eq!(t.decide(&mine, &old, 11, now), Decision::Wait(None));
        // Our old incarnation shows as departed in the new view; we quiesced it ourselves.
        t.quiesced(10);
        let departed_self = Departed {
            node: node(1, 10),
            safe_after: now + WAIT,
        };
        let new = view(
            &[(1, 11, Some(true)), (2, 20, Some(false))],
            vec![departed_self.clone()],
        );
        assert_eq!(t.decide(&mine, &new, 11, now), Decision::Wait(None));
        let acked = view(
            &[(1, 11, Some(true)), (2, 20, Some(true))],
            vec![departed_self],
        );
        assert_eq!(t.decide(&mine, &acked, 11, now), Decision::Serve);
    }

    #[tokio::test(start_paused = true)]
    async fn members_without_acks_are_waited_out_and_empty_rings_own_nothing() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        let legacy = view(&[(1, 10, Some(true)), (2, 20, None)], vec![]);
        let room = room_of(&legacy, 1);
        assert_eq!(
            t.decide(&room, &legacy, 10, now),
            Decision::Wait(Some(legacy.ring_since + WAIT))
        );
        tokio::time::advance(WAIT).await;
        assert_eq!(
            t.decide(&room, &legacy, 10, Instant::now()),
            Decision::Serve
        );
        let empty = view(&[], vec![]);
        assert_eq!(
            t.decide(&room, &empty, 10, Instant::now()),
            Decision::NoOwner
        );
    }

    #[test]
    fn only_a_head_this_incarnation_minted_spares_the_fence() {
        let lease = Lease::new();
        let started_ms = common::id::now_ms();
        lease.begin(started_ms, Instant::now(), WAIT, Duration::from_secs(1));
        let grant = Grant::new(lease);
        let ids = common::IdGenerator::new(7);
        let mine = ids.next();
        assert!(grant.minted_here(mine, 7));
        // Another node's id, or this node's from before this incarnation began (a previous
        // process, or this one before its lease lapsed), needs the fence.
        assert!(!grant.minted_here(common::IdGenerator::new(8).next(), 7));
        assert!(!grant.minted_here(MessageId::first_at(started_ms - 1), 7));
        assert!(!grant.minted_here(MessageId(0), 7), "an empty room");
        // Standalone: every id of this node.
        assert!(Grant::forever().minted_here(MessageId::first_at(1_704_067_200_001), 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_predecessor_process_blocks_every_takeover_for_a_while() {
        let mut t = Tenure::new(1, WAIT);
        let now = Instant::now();
        t.not_before(now + Duration::from_secs(2));
        let v = view(&[(1, 10, Some(true)), (2, 20, Some(true))], vec![]);
        let room = room_of(&v, 1);
        assert_eq!(
            t.decide(&room, &v, 10, now),
            Decision::Wait(Some(now + Duration::from_secs(2)))
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(t.decide(&room, &v, 10, Instant::now()), Decision::Serve);
    }
}
