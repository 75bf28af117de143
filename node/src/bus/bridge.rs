//! Bridged rooms: a WebSocket connection on one node joined to rooms owned by others.
//!
//! The owner keeps its room exactly as it is and adds the remote connection as an ordinary
//! member with a *remote* [`ConnHandle`]: ordering, `since` replay and its seam, presence,
//! acks, dedupe and the fence hold unchanged. What differs is how broadcasts leave: the room
//! sends each frame once per node through that node's link (`link.rs`), not once per
//! member, and tells the node which of its connections *follow* the room's stream. Frames
//! for one member (its `joined`, replay, acks, errors) go through the same ordered link,
//! tagged with the connection, so a member is followed only after its replay and the seam
//! stays exact. The requesting node fans each room frame out to its followers' own bounded
//! queues, the same shared bytes and the same slow-consumer close (4000) as a local room.
//!
//! Links are numbered per (sender, epoch): a missing batch, a lost bus subscription or a
//! link that overflowed resets everything bridged between the two nodes (members dropped on
//! the owner, connections closed with 4002 `bridge_interrupted` on the requester) and the
//! clients rejoin with `since`: nothing is lost silently. A room handed to another node
//! keeps its bridged members: after its flush the old owner says where it went (`moved`),
//! and the requesting node joins each member there from the last message it gave it; the
//! connection stays open. Rooms without remote members cause no Redis traffic.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use common::{metrics as m, CloseCode, ErrorCode, MessageId, RoomId, ServerFrame, UserId};
use tokio_util::sync::CancellationToken;

use super::link::{Carrier, Link, Published};
use super::redis::{Bus, Handled, Inbox};
use super::wire::{Batch, Item};
use crate::cluster::{Cluster, Route};
use crate::frames::Out;
use crate::outbound::ConnHandle;
use crate::registry::Registry;
use crate::room::Accepted;
use crate::room::{Reply, RoomCmd, Source};

/// Owner side: a remote connection bridged into this node's rooms.
struct Proxy {
    handle: Arc<ConnHandle>,
    rooms: HashSet<RoomId>,
}

/// Requester side: a local connection with rooms on other nodes.
struct Bridged {
    conn: Arc<ConnHandle>,
    rooms: HashMap<RoomId, Remote>,
}

/// One remote room of a bridged connection.
#[derive(Clone, Copy)]
struct Remote {
    owner: u16,
    /// Where the join went in the owner's link (`Link::push_counted`).
    at: u64,
    /// The join is this node's own, moving the member after the room moved: a refusal
    /// closes the connection (4001) instead of answering the client.
    moving: bool,
}

/// A connection that follows a room's stream, and the last message it was given.
struct Follower {
    conn: Arc<ConnHandle>,
    last: MessageId,
}

/// What this node knows of one peer's link to it.
#[derive(Default)]
struct Peer {
    epoch: u64,
    next_seq: u64,
    /// This node's connections that follow each of the peer's rooms.
    follows: HashMap<RoomId, HashMap<u64, Follower>>,
}

/// Work left after the requester's lock is released.
enum Then {
    Nothing,
    /// Join `room` on `to` from `since`, for a member whose room moved there.
    Rejoin {
        conn: Arc<ConnHandle>,
        room: RoomId,
        to: u16,
        since: MessageId,
    },
}

#[derive(Default)]
struct Requester {
    conns: HashMap<u64, Bridged>,
    peers: HashMap<u16, Peer>,
}

impl Requester {
    /// Forgets a connection everywhere; returns it if it was bridged.
    fn remove(&mut self, conn: u64) -> Option<Bridged> {
        let b = self.conns.remove(&conn)?;
        metrics::gauge!(m::BRIDGED_ROOMS).decrement(b.rooms.len() as f64);
        for (room, remote) in &b.rooms {
            self.unfollow(remote.owner, room, conn);
        }
        Some(b)
    }

    /// A member whose room moved but could not be moved with it: it reconnects (4001).
    fn close_unmoved(&mut self, conn: u64) {
        metrics::counter!(m::BRIDGE_MOVES, "outcome" => "closed").increment(1);
        if let Some(b) = self.remove(conn) {
            b.conn.close(CloseCode::RoomMoved);
        }
    }

    fn unfollow(&mut self, owner: u16, room: &RoomId, conn: u64) {
        if let Some(peer) = self.peers.get_mut(&owner) {
            if let Some(f) = peer.follows.get_mut(room) {
                f.remove(&conn);
                if f.is_empty() {
                    peer.follows.remove(room);
                }
            }
        }
    }

    /// Removes the connections that `pick` selects; returns their handles.
    fn remove_where(&mut self, pick: impl Fn(&Bridged) -> bool) -> Vec<Arc<ConnHandle>> {
        let ids: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, b)| pick(b))
            .map(|(id, _)| *id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.remove(id))
            .map(|b| b.conn)
            .collect()
    }
}

/// This node's end of cross-shard traffic: the transport, both ends of bridged
/// connections, and the node's rooms and ring it serves them from.
pub struct Bridges {
    bus: Arc<Bus>,
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    /// Itself, for the links (they hold it weakly, as their [`Carrier`]).
    me: std::sync::Weak<Bridges>,
    links: Mutex<HashMap<u16, Arc<Link>>>,
    /// Owner side: proxies of remote connections, by (node, connection).
    proxies: Mutex<HashMap<(u16, u64), Proxy>>,
    requester: Mutex<Requester>,
}

/// A member id for a new proxy: never one an earlier proxy had, so a leave meant for a
/// proxy that was dropped (its node restarted, its conn id is reused) cannot remove the one
/// that replaced it. The top bit keeps them apart from local connection ids.
fn proxy_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    (1 << 63) | NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How a batch stands against what came before from the same peer.
enum Verdict {
    InSequence,
    /// A duplicate of one already taken (a reset published again after a timeout).
    Stale,
    /// One or more batches were lost.
    Gap,
    /// A new incarnation of the peer (`known`: we had heard from an earlier one).
    Restarted {
        known: bool,
    },
    /// The first batch this process hears from a peer whose link is older than it (this
    /// node restarted). Nothing before it can have been meant for this process: the inbox
    /// was subscribed before the node joined the ring.
    Baseline,
}

fn append(run: &mut Vec<bytes::Bytes>, out: Out) {
    match out {
        Out::Frame(b) | Out::Pong(b) => run.push(b),
        Out::Frames(v) | Out::Shared(v) => run.extend(v),
    }
}

/// A copy of `out` for one more member (frames are shared bytes).
fn dup(out: &Out) -> Out {
    match out {
        Out::Frame(b) => Out::Frame(b.clone()),
        Out::Frames(v) => Out::Frames(v.clone()),
        Out::Shared(v) => Out::Shared(v.clone()),
        Out::Pong(b) => Out::Pong(b.clone()),
    }
}

impl Bridges {
    /// Serves `bus`'s inbox from the node's rooms (`registry`) and ring (`cluster`).
    pub fn attach(bus: Arc<Bus>, cluster: Arc<Cluster>, registry: Arc<Registry>) -> Arc<Bridges> {
        let bridges = Arc::new_cyclic(|me| Bridges {
            bus,
            cluster,
            registry,
            me: me.clone(),
            links: Mutex::default(),
            proxies: Mutex::default(),
            requester: Mutex::default(),
        });
        let inbox: Arc<dyn Inbox> = bridges.clone();
        bridges.bus.attach(Arc::downgrade(&inbox));
        bridges
    }

    /// The transport (forwarded publishes, whether the inbox is live).
    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    /// The link to `owner` while the inbox is live (a node whose subscription is down
    /// would not hear the answers).
    fn live_link(&self, owner: u16) -> Option<Arc<Link>> {
        self.bus.is_up().then(|| self.link(owner)).flatten()
    }

    fn is_shutting_down(&self) -> bool {
        self.registry.ctx().is_draining()
    }

    /// The link to `peer`, started on first use.
    fn link(&self, peer: u16) -> Option<Arc<Link>> {
        let mut links = self.links.lock().ok()?;
        Some(
            links
                .entry(peer)
                .or_insert_with(|| {
                    let carrier: std::sync::Weak<dyn Carrier> = self.me.clone();
                    Link::start(peer, carrier, self.bus.stop_token())
                })
                .clone(),
        )
    }

    // ------------------------------------------------------------------------------------
    // Requester side: what this node's connections ask of other nodes.
    // ------------------------------------------------------------------------------------

    /// Joins `conn` to `room` on `owner`. False (and an error frame) when the link to the
    /// owner cannot take it.
    pub fn join(
        &self,
        conn: &Arc<ConnHandle>,
        owner: u16,
        room: RoomId,
        since: Option<MessageId>,
    ) -> bool {
        // Tracked before it is queued, so the owner's answer always finds it; its place in
        // the link is known once queued (until then no reset counts it as taken).
        self.set_join(conn, owner, &room, u64::MAX);
        let item = Item::Join {
            conn: conn.id,
            room: room.clone(),
            user: conn.user.clone(),
            since,
        };
        let placed = self
            .live_link(owner)
            .and_then(|link| link.push_counted(item));
        match placed {
            Some(at) => {
                self.set_join(conn, owner, &room, at);
                true
            }
            None => {
                self.untrack(conn.id, &room);
                unreachable_owner(conn, None, &room);
                false
            }
        }
    }

    fn set_join(&self, conn: &Arc<ConnHandle>, owner: u16, room: &RoomId, at: u64) {
        if let Ok(mut r) = self.requester.lock() {
            let b = r.conns.entry(conn.id).or_insert_with(|| Bridged {
                conn: conn.clone(),
                rooms: HashMap::new(),
            });
            let remote = Remote {
                owner,
                at,
                moving: false,
            };
            if b.rooms.insert(room.clone(), remote).is_none() {
                metrics::gauge!(m::BRIDGED_ROOMS).increment(1.0);
            }
        }
    }

    /// A `send` from a bridged connection, answered (ack or error) by the owner.
    pub fn send(
        &self,
        conn: &Arc<ConnHandle>,
        owner: u16,
        room: RoomId,
        cid: common::ClientMsgId,
        body: String,
    ) -> bool {
        // The room may have moved since the connection joined it (`moved`).
        let owner = self.owner_of(conn.id, &room).unwrap_or(owner);
        tracing::debug!(%room, %cid, owner, "send bridged to the owner");
        let cid_text = cid.to_string();
        let item = Item::Send {
            conn: conn.id,
            user: conn.user.clone(),
            room: room.clone(),
            cid,
            body,
        };
        self.push(owner, item, conn, Some(&cid_text), &room)
    }

    /// The connection left a remote room: it stops getting the room's frames at once.
    pub fn leave(&self, conn: &Arc<ConnHandle>, owner: u16, room: RoomId) {
        let owner = self.owner_of(conn.id, &room).unwrap_or(owner);
        self.untrack(conn.id, &room);
        let item = Item::Leave {
            conn: conn.id,
            room: room.clone(),
        };
        self.push(owner, item, conn, None, &room);
    }

    /// The connection ended: every owner it joined through forgets it.
    pub fn conn_ended(&self, conn: u64, owners: &HashSet<u16>) {
        let mut owners = owners.clone();
        if let Ok(mut r) = self.requester.lock() {
            if let Some(b) = r.remove(conn) {
                owners.extend(b.rooms.values().map(|x| x.owner));
            }
        }
        for owner in owners {
            if let Some(link) = self.link(owner) {
                // A link that cannot take it resets, which forgets the connection too.
                link.push(Item::Gone { conn });
            }
        }
    }

    /// The node that serves `room` to `conn` now.
    fn owner_of(&self, conn: u64, room: &RoomId) -> Option<u16> {
        let r = self.requester.lock().ok()?;
        r.conns.get(&conn)?.rooms.get(room).map(|x| x.owner)
    }

    fn untrack(&self, conn: u64, room: &RoomId) {
        if let Ok(mut r) = self.requester.lock() {
            let remote = r.conns.get_mut(&conn).and_then(|b| b.rooms.remove(room));
            if let Some(remote) = remote {
                metrics::gauge!(m::BRIDGED_ROOMS).decrement(1.0);
                r.unfollow(remote.owner, room, conn);
            }
        }
    }

    fn push(
        &self,
        owner: u16,
        item: Item,
        conn: &ConnHandle,
        cid: Option<&str>,
        room: &RoomId,
    ) -> bool {
        let ok = self.live_link(owner).is_some_and(|link| link.push(item));
        if !ok {
            unreachable_owner(conn, cid, room);
        }
        ok
    }

    // ------------------------------------------------------------------------------------
    // Both sides: a batch from a peer's link.
    // ------------------------------------------------------------------------------------

    /// Takes one batch from `batch.from`'s link, in order. A batch out of sequence means one
    /// was lost: everything bridged with that peer is reset, and the batch dropped.
    pub(crate) async fn on_batch(&self, batch: Batch) {
        let from = batch.from;
        if from == self.bus.me() {
            return;
        }
        // A batch that starts with a reset is the peer starting over with us: taken whatever
        // its number (it forgets the batches in between anyway), unless it is an old one.
        let resync = matches!(batch.items.first(), Some(Item::Reset { .. }));
        let verdict = self.requester.lock().ok().map(|mut r| {
            let peer = r.peers.entry(from).or_default();
            let known = peer.epoch != 0;
            let fresh = peer.epoch != batch.epoch;
            let verdict = if fresh {
                if batch.seq == 1 || resync {
                    Verdict::Restarted { known }
                } else if !known {
                    Verdict::Baseline
                } else {
                    Verdict::Gap
                }
            } else if batch.seq == peer.next_seq || (resync && batch.seq > peer.next_seq) {
                Verdict::InSequence
            } else if batch.seq < peer.next_seq {
                Verdict::Stale
            } else {
                Verdict::Gap
            };
            if !matches!(verdict, Verdict::Stale) {
                peer.epoch = batch.epoch;
                peer.next_seq = batch.seq + 1;
            }
            verdict
        });
        match verdict {
            None | Some(Verdict::Stale) => return,
            Some(Verdict::Gap) => {
                metrics::counter!(m::BUS_ERRORS, "kind" => "gap").increment(1);
                tracing::debug!(
                    from,
                    seq = batch.seq,
                    "link gap; resetting what is bridged with the peer"
                );
                self.reset_peer(from, "gap", None);
                if let Some(link) = self.link(from) {
                    link.push(self.reset_item(from));
                }
                return;
            }
            Some(Verdict::Restarted { known: true }) => self.reset_peer(from, "restarted", None),
            Some(Verdict::Baseline) => {
                // The peer may still hold what an earlier process of this node had bridged
                // with it: have it forget that, but not the joins of this batch or later.
                if let Some(link) = self.link(from) {
                    link.push(Item::Forget {
                        epoch: batch.epoch,
                        upto: batch.seq - 1,
                    });
                }
            }
            Some(Verdict::Restarted { known: false } | Verdict::InSequence) => {}
        }
        let mut items = batch.items.into_iter().peekable();
        while let Some(item) = items.next() {
            // Consecutive frames of one room reach each follower as one queue entry, as a
            // batch of commands does in a local room: a batch must not overflow a queue
            // that the same frames one by one would not.
            let item = match item {
                Item::Room {
                    room,
                    mut last,
                    frames,
                } => {
                    let mut run: Vec<bytes::Bytes> = Vec::new();
                    let mut frames = Some(frames);
                    while let Some(Item::Room { room: next, .. }) = items.peek() {
                        if *next != room {
                            break;
                        }
                        let Some(Item::Room {
                            frames: more,
                            last: more_last,
                            ..
                        }) = items.next()
                        else {
                            break;
                        };
                        if let Some(first) = frames.take() {
                            append(&mut run, first);
                        }
                        append(&mut run, more);
                        last = last.max(more_last);
                    }
                    let frames = frames.unwrap_or(Out::Frames(run));
                    Item::Room { room, last, frames }
                }
                other => other,
            };
            match item {
                Item::Room { .. }
                | Item::To { .. }
                | Item::Follow { .. }
                | Item::Unfollow { .. }
                | Item::Close { .. }
                | Item::Moved { .. }
                | Item::Refused { .. } => {
                    let then = self.on_owner_item(from, self.bus.me(), item);
                    self.then(then);
                }
                Item::Reset { epoch, upto } | Item::Forget { epoch, upto } => {
                    // Our joins the peer had taken when it reset are gone there; later
                    // ones stand. Joins from an earlier incarnation of ours are not ours.
                    let whole = matches!(item, Item::Reset { .. });
                    let upto = if epoch == self.bus.epoch() {
                        self.link(from).and_then(|link| link.covered_by(upto))
                    } else {
                        Some(0)
                    };
                    if whole {
                        self.reset_peer(from, "peer", upto)
                    } else {
                        self.forget_joins(from, "peer", upto);
                    }
                }
                request => self.on_request(from, request).await,
            }
        }
    }

    /// Requester side: frames and follow changes from the owner `from`.
    fn on_owner_item(&self, from: u16, me: u16, item: Item) -> Then {
        let Ok(mut r) = self.requester.lock() else {
            return Then::Nothing;
        };
        match item {
            Item::Room { room, last, frames } => {
                let Some(follows) = r
                    .peers
                    .get_mut(&from)
                    .and_then(|p| p.follows.get_mut(&room))
                else {
                    return Then::Nothing;
                };
                let mut delivered = 0u64;
                // A follower that cannot take it was closed as slow by `deliver`; its
                // connection's end tells the owner.
                follows.retain(|_, f| {
                    let ok = f.conn.deliver(dup(&frames));
                    delivered += u64::from(ok);
                    if ok && last > f.last.0 {
                        f.last = MessageId(last);
                    }
                    ok
                });
                if follows.is_empty() {
                    if let Some(p) = r.peers.get_mut(&from) {
                        p.follows.remove(&room);
                    }
                }
                metrics::counter!(m::MESSAGES_DELIVERED).increment(delivered);
            }
            Item::To { conn, frames } => {
                if let Some(b) = r.conns.get(&conn) {
                    b.conn.deliver(frames);
                }
            }
            Item::Follow { conn, room, at } => {
                // Only if the connection still has the room on that owner: a `leave` or a
                // move may have overtaken the owner's answer.
                let Some(b) = r.conns.get_mut(&conn) else {
                    return Then::Nothing;
                };
                let Some(remote) = b.rooms.get_mut(&room).filter(|x| x.owner == from) else {
                    return Then::Nothing;
                };
                remote.moving = false;
                let conn_handle = b.conn.clone();
                r.peers
                    .entry(from)
                    .or_default()
                    .follows
                    .entry(room)
                    .or_default()
                    .insert(
                        conn,
                        Follower {
                            conn: conn_handle,
                            last: MessageId(at),
                        },
                    );
            }
            Item::Unfollow { conn, room } => r.unfollow(from, &room, conn),
            Item::Close { conn, code } => {
                // The owner closed its proxy of the connection: every room the connection
                // still has there is gone. Rooms that moved on from it are not.
                let affected = r
                    .conns
                    .get(&conn)
                    .is_some_and(|b| b.rooms.values().any(|x| x.owner == from));
                if affected {
                    if let Some(b) = r.remove(conn) {
                        b.conn.close(
                            CloseCode::from_code(code).unwrap_or(CloseCode::BridgeInterrupted),
                        );
                    }
                }
            }
            Item::Moved { conn, room, to } => {
                let last = r
                    .peers
                    .get_mut(&from)
                    .and_then(|p| p.follows.get_mut(&room))
                    .and_then(|f| f.remove(&conn))
                    .map(|f| f.last);
                let Some(b) = r.conns.get_mut(&conn) else {
                    return Then::Nothing;
                };
                let Some(remote) = b.rooms.get_mut(&room).filter(|x| x.owner == from) else {
                    return Then::Nothing;
                };
                match last {
                    // The room is now ours, or its new owner unknown: the connection must
                    // reconnect, as a local member of a moved room does.
                    Some(since) if to != 0 && to != me => {
                        *remote = Remote {
                            owner: to,
                            at: u64::MAX,
                            moving: true,
                        };
                        metrics::counter!(m::BRIDGE_MOVES, "outcome" => "rejoined").increment(1);
                        return Then::Rejoin {
                            conn: b.conn.clone(),
                            room,
                            to,
                            since,
                        };
                    }
                    _ => {
                        r.close_unmoved(conn);
                    }
                }
            }
            Item::Refused {
                conn,
                room,
                code,
                owner,
            } => {
                let Some(b) = r.conns.get_mut(&conn) else {
                    return Then::Nothing;
                };
                let Some(remote) = b.rooms.get(&room).copied().filter(|x| x.owner == from) else {
                    return Then::Nothing;
                };
                if remote.moving {
                    // Moving the member did not work (the new owner's ring is behind, or
                    // it is shutting down): it reconnects and resumes instead.
                    r.close_unmoved(conn);
                    return Then::Nothing;
                }
                b.rooms.remove(&room);
                metrics::gauge!(m::BRIDGED_ROOMS).decrement(1.0);
                let message = match code {
                    ErrorCode::GoingAway => "the room's owner is shutting down; join again shortly",
                    ErrorCode::RoomMoved => "the room moved; join it again",
                    _ => "the room's owner holds no lease right now; join again shortly",
                };
                b.conn.send_frame(&ServerFrame::Error {
                    code,
                    message: message.into(),
                    cid: None,
                    room: Some(room.to_string()),
                    owner,
                });
            }
            _ => {}
        }
        Then::Nothing
    }

    fn then(&self, then: Then) {
        let Then::Rejoin {
            conn,
            room,
            to,
            since,
        } = then
        else {
            return;
        };
        let item = Item::Join {
            conn: conn.id,
            room: room.clone(),
            user: conn.user.clone(),
            since: Some(since),
        };
        match self.link(to).and_then(|l| l.push_counted(item)) {
            Some(at) => {
                if let Ok(mut r) = self.requester.lock() {
                    if let Some(remote) = r
                        .conns
                        .get_mut(&conn.id)
                        .and_then(|b| b.rooms.get_mut(&room))
                    {
                        remote.at = at;
                    }
                }
            }
            None => {
                if let Ok(mut r) = self.requester.lock() {
                    r.remove(conn.id);
                }
                conn.close(CloseCode::BridgeInterrupted);
            }
        }
    }

    /// Forgets everything bridged with `peer`: its members in this node's rooms are dropped,
    /// and this node's connections bridged to its rooms (those whose join is at or before
    /// `upto` in the link; all with `None`) are closed with 4002 so their clients resume
    /// with `since`.
    pub(crate) fn reset_peer(&self, peer: u16, reason: &'static str, upto: Option<u64>) {
        let closed = self.forget_joins(peer, reason, upto);
        let dropped: Vec<u64> = self
            .proxies
            .lock()
            .map(|p| {
                p.keys()
                    .filter(|(node, _)| *node == peer)
                    .map(|(_, c)| *c)
                    .collect()
            })
            .unwrap_or_default();
        if closed > 0 || !dropped.is_empty() {
            tracing::info!(
                peer,
                reason,
                closed,
                dropped = dropped.len(),
                "bridge reset: connections bridged with the peer resume with since"
            );
        }
        for conn in dropped {
            self.drop_proxy(peer, conn);
        }
    }

    /// Closes (4002) this node's connections bridged to `peer`'s rooms whose join is at or
    /// before `upto` in the link (all with `None`); returns how many.
    fn forget_joins(&self, peer: u16, reason: &'static str, upto: Option<u64>) -> usize {
        metrics::counter!(m::BRIDGE_RESETS, "reason" => reason).increment(1);
        let closed = self
            .requester
            .lock()
            .map(|mut r| {
                r.remove_where(|b| {
                    b.rooms
                        .values()
                        .any(|x| x.owner == peer && upto.is_none_or(|t| x.at <= t))
                })
            })
            .unwrap_or_default();
        let n = closed.len();
        for conn in closed {
            conn.close(CloseCode::BridgeInterrupted);
        }
        n
    }

    /// The reset to send `peer`: how far into its link this node had read.
    pub(crate) fn reset_item(&self, peer: u16) -> Item {
        let (epoch, upto) = self
            .requester
            .lock()
            .ok()
            .and_then(|r| {
                r.peers
                    .get(&peer)
                    .map(|p| (p.epoch, p.next_seq.saturating_sub(1)))
            })
            .unwrap_or((0, 0));
        Item::Reset { epoch, upto }
    }

    /// The bus subscription dropped: anything from any peer may be lost. Resets every peer
    /// and tells each.
    pub(crate) fn interrupt_all(&self) {
        let mut peers: HashSet<u16> = self
            .requester
            .lock()
            .map(|r| {
                r.conns
                    .values()
                    .flat_map(|b| b.rooms.values().map(|x| x.owner))
                    .chain(r.peers.keys().copied())
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(p) = self.proxies.lock() {
            peers.extend(p.keys().map(|(node, _)| *node));
        }
        let links: Vec<Arc<Link>> = self
            .links
            .lock()
            .map(|l| l.values().cloned().collect())
            .unwrap_or_default();
        for peer in peers {
            self.reset_peer(peer, "unsubscribed", None);
        }
        for link in links {
            link.push(self.reset_item(link.peer()));
        }
    }

    /// Requester side: closes connections whose remote rooms changed owner; owner side:
    /// drops proxies of nodes that left the ring.
    fn on_ring_change(&self) {
        let ring = self.cluster.ring().current();
        let moved = self
            .requester
            .lock()
            .map(|mut r| {
                // A room whose owner is still in the ring is handed over by it: it says where
                // the room went (`moved`) or closes its members. One whose owner vanished
                // has nobody to say so: its members reconnect.
                r.remove_where(|b| {
                    b.rooms.iter().any(|(room, x)| {
                        ring.owner_id(room.as_str()) != Some(x.owner)
                            && ring.get_node(x.owner).is_none()
                    })
                })
            })
            .unwrap_or_default();
        for conn in moved {
            conn.close(CloseCode::RoomMoved);
        }
        let gone: Vec<(u16, u64)> = self
            .proxies
            .lock()
            .map(|p| {
                p.keys()
                    .filter(|(node, _)| ring.get_node(*node).is_none())
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        for (node, conn) in gone {
            self.drop_proxy(node, conn);
        }
    }

    // ------------------------------------------------------------------------------------
    // Owner side: requests from other nodes' connections.
    // ------------------------------------------------------------------------------------

    /// The proxy of (node, conn), created on first use.
    fn proxy(&self, node: u16, conn: u64, user: &UserId) -> Option<Arc<ConnHandle>> {
        let link = self.link(node)?;
        let mut proxies = self.proxies.lock().ok()?;
        if let Some(p) = proxies.get(&(node, conn)) {
            if !p.handle.is_closed() {
                return Some(p.handle.clone());
            }
        }
        let handle = Arc::new(ConnHandle::remote(
            proxy_id(),
            user.clone(),
            link,
            conn,
            CancellationToken::new(),
        ));
        if proxies
            .insert(
                (node, conn),
                Proxy {
                    handle: handle.clone(),
                    rooms: HashSet::new(),
                },
            )
            .is_none()
        {
            metrics::gauge!(m::BRIDGE_PROXIES).increment(1.0);
        }
        Some(handle)
    }

    fn proxy_rooms(&self, node: u16, conn: u64, room: &RoomId, joined: bool) {
        if let Ok(mut p) = self.proxies.lock() {
            if let Some(p) = p.get_mut(&(node, conn)) {
                if joined {
                    p.rooms.insert(room.clone());
                } else {
                    p.rooms.remove(room);
                }
            }
        }
    }

    /// Removes a proxy and its memberships.
    fn drop_proxy(&self, node: u16, conn: u64) {
        let proxy = self
            .proxies
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&(node, conn)));
        let Some(proxy) = proxy else { return };
        metrics::gauge!(m::BRIDGE_PROXIES).decrement(1.0);
        proxy.handle.cancel_silently();
        for room in proxy.rooms {
            let registry = self.registry.clone();
            let conn_id = proxy.handle.id;
            tokio::spawn(async move {
                registry
                    .dispatch_existing(
                        &room,
                        RoomCmd::Leave {
                            conn_id,
                            notify: false,
                        },
                    )
                    .await;
            });
        }
    }

    /// Owner side, on shutdown: closes every proxy with `code`; the requesting nodes close
    /// the real connections the same way.
    pub fn close_all_proxies(&self, code: CloseCode) {
        let handles: Vec<Arc<ConnHandle>> = self
            .proxies
            .lock()
            .map(|p| p.values().map(|p| p.handle.clone()).collect())
            .unwrap_or_default();
        for h in handles {
            h.close(code);
        }
    }

    /// Items still queued on every link (shutdown waits for them to be published).
    pub fn queued(&self) -> usize {
        self.links
            .lock()
            .map(|l| l.values().map(|l| l.queued()).sum())
            .unwrap_or(0)
    }

    /// Bridged memberships now (remote connections on this node, local ones elsewhere).
    pub fn counts(&self) -> (usize, usize) {
        let proxies = self.proxies.lock().map(|p| p.len()).unwrap_or(0);
        let local = self.requester.lock().map(|r| r.conns.len()).unwrap_or(0);
        (proxies, local)
    }

    /// A request from connection `conn` of node `from`.
    async fn on_request(&self, from: u16, item: Item) {
        match item {
            Item::Join {
                conn,
                room,
                user,
                since,
            } => {
                let refusal = if self.is_shutting_down() {
                    Some((ErrorCode::GoingAway, None))
                } else {
                    match self.cluster.route(&room) {
                        crate::cluster::Route::Local => None,
                        crate::cluster::Route::Elsewhere(owner) => {
                            Some((ErrorCode::RoomMoved, Some(owner.addr)))
                        }
                        crate::cluster::Route::Unavailable => {
                            Some((ErrorCode::RoomUnavailable, None))
                        }
                    }
                };
                if let Some((code, owner)) = refusal {
                    if let Some(link) = self.link(from) {
                        link.push(Item::Refused {
                            conn,
                            room,
                            code,
                            owner,
                        });
                    }
                    return;
                }
                let Some(proxy) = self.proxy(from, conn, &user) else {
                    return;
                };
                self.proxy_rooms(from, conn, &room, true);
                self.registry
                    .dispatch(&room, RoomCmd::Join { conn: proxy, since })
                    .await;
            }
            Item::Send {
                conn,
                user,
                room,
                cid,
                body,
            } => {
                tracing::debug!(%room, %cid, from, conn, "bridged send received");
                // Without a proxy (its join failed or was never seen) the proxy is created
                // now, so the room's `not_joined` answer reaches the sender, not silence.
                let Some(proxy) = self.proxy(from, conn, &user) else {
                    return;
                };
                let cmd = RoomCmd::Send {
                    from: proxy.user.clone(),
                    cid,
                    body,
                    reply: Reply::Conn(proxy.clone()),
                    source: Source::Bus,
                };
                if let Err(cmd) = self.registry.try_dispatch(&room, cmd) {
                    cmd.refuse(
                        &room,
                        ErrorCode::Overloaded,
                        "room is overloaded; retry later with the same cid",
                    );
                }
            }
            Item::Leave { conn, room } => {
                let proxy = self
                    .proxies
                    .lock()
                    .ok()
                    .and_then(|p| p.get(&(from, conn)).map(|p| p.handle.id));
                if let Some(conn_id) = proxy {
                    self.proxy_rooms(from, conn, &room, false);
                    self.registry
                        .dispatch_existing(
                            &room,
                            RoomCmd::Leave {
                                conn_id,
                                notify: true,
                            },
                        )
                        .await;
                    // A proxy in no room is forgotten (its handle stays open for the `left`
                    // on its way); a later request creates it again.
                    if let Ok(mut p) = self.proxies.lock() {
                        if p.get(&(from, conn)).is_some_and(|p| p.rooms.is_empty()) {
                            p.remove(&(from, conn));
                            metrics::gauge!(m::BRIDGE_PROXIES).decrement(1.0);
                        }
                    }
                }
            }
            Item::Gone { conn } => self.drop_proxy(from, conn),
            _ => {}
        }
    }
}

fn unreachable_owner(conn: &ConnHandle, cid: Option<&str>, room: &RoomId) {
    metrics::counter!(m::BUS_ERRORS, "kind" => "publish").increment(1);
    conn.send_frame(&ServerFrame::Error {
        code: ErrorCode::NodeUnavailable,
        message: "the room's owner could not be reached through the bus; retry later".into(),
        cid: cid.map(str::to_owned),
        room: Some(room.to_string()),
        owner: None,
    });
}

/// Keeps bridges consistent with the ring: see [`Bridges::on_ring_change`].
pub fn spawn_ring_watch(bridges: Arc<Bridges>, stop: CancellationToken) {
    let mut ring = bridges.cluster.ring().ring.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = ring.changed() => if changed.is_err() { return },
            }
            bridges.on_ring_change();
        }
    });
}

/// What this node does with what its inbox receives.
impl Inbox for Bridges {
    fn batch(&self, batch: Batch) -> Handled<'_, ()> {
        Box::pin(self.on_batch(batch))
    }

    fn send(
        &self,
        room: RoomId,
        user: UserId,
        cid: common::ClientMsgId,
        body: String,
    ) -> Handled<'static, Result<Accepted, ErrorCode>> {
        let cluster = self.cluster.clone();
        let registry = self.registry.clone();
        Box::pin(run_forwarded(cluster, registry, room, user, cid, body))
    }

    fn lost(&self) {
        self.interrupt_all();
    }
}

/// The links publish through the transport and reset what is bridged when they break.
impl Carrier for Bridges {
    fn me(&self) -> u16 {
        self.bus.me()
    }

    fn epoch(&self) -> u64 {
        self.bus.epoch()
    }

    fn publish<'a>(&'a self, peer: u16, payload: &'a [u8]) -> Published<'a> {
        Box::pin(self.bus.publish_raw(peer, payload))
    }

    fn reset(&self, peer: u16, reason: &'static str) -> Item {
        self.reset_peer(peer, reason, None);
        self.reset_item(peer)
    }
}

/// Runs a forwarded send on this node, if it owns the room.
async fn run_forwarded(
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    room: RoomId,
    user: UserId,
    cid: common::ClientMsgId,
    body: String,
) -> Result<Accepted, ErrorCode> {
    if registry.ctx().is_draining() {
        return Err(ErrorCode::GoingAway);
    }
    match cluster.route(&room) {
        Route::Local => {}
        Route::Elsewhere(_) => return Err(ErrorCode::RoomMoved),
        Route::Unavailable => return Err(ErrorCode::RoomUnavailable),
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = RoomCmd::Send {
        from: user,
        cid,
        body,
        reply: Reply::Http(tx),
        source: Source::Bus,
    };
    if registry.try_dispatch(&room, cmd).is_err() {
        return Err(ErrorCode::Overloaded);
    }
    let wait = registry.ctx().config.store_timeout * 2 + std::time::Duration::from_secs(1);
    match tokio::time::timeout(wait, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(ErrorCode::Internal),
        Err(_) => Err(ErrorCode::StoreUnavailable),
    }
}
