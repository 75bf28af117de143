//! Bridged rooms: a WebSocket connection on one node joined to rooms owned by others.
//!
//! The owner keeps its room exactly as it is and adds the remote connection as an ordinary
//! member through a *proxy* [`ConnHandle`]: ordering, `since` replay and its seam, presence,
//! acks, dedupe and the slow-consumer bound therefore hold unchanged. The proxy's queue is
//! drained by a task that publishes the frames to the requesting node's inbox as numbered
//! `deliver` batches; that node feeds them into the real connection's queue. Pub/sub is
//! at-most-once, so a missing number, a lost bus link or a moved room closes the real
//! connection with a reconnect-and-resume code (4002 `bridge_interrupted` or 4001), and
//! the client rejoins with `since`: nothing is lost silently. Rooms without remote members
//! have no proxies and cause no Redis traffic.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::{
    metrics as m, ClientMsgId, CloseCode, ErrorCode, MessageId, RoomId, ServerFrame, UserId,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::redis::{Bus, Envelope};
use crate::outbound::{ConnHandle, Out};
use crate::room::{Reply, RoomCmd, Source};
use crate::NodeState;

/// Frames per `deliver` message, at most.
const DELIVER_BATCH: usize = 256;
/// Bridge operations a connection may have queued for the bus.
const OPS_QUEUE: usize = 256;

struct Proxy {
    handle: Arc<ConnHandle>,
    rooms: HashSet<RoomId>,
}

struct Bridged {
    conn: Arc<ConnHandle>,
    /// The next `deliver` number expected from each owner node.
    next_seq: HashMap<u16, u64>,
    /// Remote rooms of this connection and their owners.
    rooms: HashMap<RoomId, u16>,
}

#[derive(Default)]
pub struct Bridges {
    /// Owner side: proxies of remote connections, by (node, connection).
    proxies: Mutex<HashMap<(u16, u64), Proxy>>,
    /// Requester side: local connections with rooms on other nodes.
    local: Mutex<HashMap<u64, Bridged>>,
}

/// What a connection asks of the bus, in order (one task per connection sends them).
pub enum BridgeOp {
    Join {
        owner: u16,
        room: RoomId,
        since: Option<MessageId>,
    },
    Send {
        owner: u16,
        room: RoomId,
        cid: ClientMsgId,
        body: String,
    },
    Leave {
        owner: u16,
        room: RoomId,
    },
}

/// Takes a removed connection's rooms off the bridged-rooms gauge.
fn untracked(b: &Bridged) {
    metrics::gauge!(m::BRIDGED_ROOMS).decrement(b.rooms.len() as f64);
}

fn proxy_id(node: u16, conn: u64) -> u64 {
    (1 << 63) | (u64::from(node) << 40) | (conn & ((1 << 40) - 1))
}

impl Bridges {
    /// Requester side: records that `conn` joined `room` on `owner`.
    fn track(&self, conn: &Arc<ConnHandle>, room: RoomId, owner: u16) {
        if let Ok(mut local) = self.local.lock() {
            let b = local.entry(conn.id).or_insert_with(|| Bridged {
                conn: conn.clone(),
                next_seq: HashMap::new(),
                rooms: HashMap::new(),
            });
            b.next_seq.entry(owner).or_insert(1);
            if b.rooms.insert(room, owner).is_none() {
                metrics::gauge!(m::BRIDGED_ROOMS).increment(1.0);
            }
        }
    }

    fn untrack(&self, conn: u64, room: &RoomId) {
        if let Ok(mut local) = self.local.lock() {
            if let Some(b) = local.get_mut(&conn) {
                if b.rooms.remove(room).is_some() {
                    metrics::gauge!(m::BRIDGED_ROOMS).decrement(1.0);
                }
            }
        }
    }

    /// Requester side: the connection ended; returns the owners to tell.
    fn forget_conn(&self, conn: u64) -> Vec<u16> {
        let b = self.local.lock().ok().and_then(|mut l| l.remove(&conn));
        b.map(|b| {
            untracked(&b);
            b.next_seq.into_keys().collect()
        })
        .unwrap_or_default()
    }

    /// Requester side: a `deliver` or `closed` from an owner.
    pub(crate) fn on_owner_message(&self, env: Envelope) {
        let Ok(mut local) = self.local.lock() else {
            return;
        };
        match env {
            Envelope::Deliver {
                from_node,
                conn,
                seq,
                frames,
            } => {
                let Some(b) = local.get_mut(&conn) else {
                    return;
                };
                let expected = b.next_seq.entry(from_node).or_insert(1);
                if seq != *expected {
                    metrics::counter!(m::BUS_ERRORS, "kind" => "gap").increment(1);
                    tracing::debug!(conn, from_node, seq, expected = *expected, "bridge gap");
                    b.conn.close(CloseCode::BridgeInterrupted);
                    if let Some(b) = local.remove(&conn) {
                        untracked(&b);
                    }
                    return;
                }
                *expected += 1;
                let frames = frames.into_iter().map(Bytes::from).collect();
                if !b.conn.deliver(Out::Frames(frames)) {
                    if let Some(b) = local.remove(&conn) {
                        untracked(&b);
                    }
                }
            }
            Envelope::Closed { conn, code, .. } => {
                if let Some(b) = local.remove(&conn) {
                    untracked(&b);
                    b.conn
                        .close(CloseCode::from_code(code).unwrap_or(CloseCode::BridgeInterrupted));
                }
            }
            _ => {}
        }
    }

    /// Requester side: the bus link dropped; bridged connections may have missed frames.
    pub(crate) fn interrupt_all(&self) {
        let all: Vec<Bridged> = self
            .local
            .lock()
            .map(|mut l| l.drain().map(|(_, b)| b).collect())
            .unwrap_or_default();
        for b in all {
            untracked(&b);
            if !b.rooms.is_empty() {
                b.conn.close(CloseCode::BridgeInterrupted);
            }
        }
    }

    /// Requester side: closes connections whose remote rooms changed owner; owner side:
    /// drops proxies of nodes that left the ring.
    fn on_ring_change(&self, state: &NodeState) {
        let ring = state.cluster.ring().current();
        let moved: Vec<Arc<ConnHandle>> = self
            .local
            .lock()
            .map(|mut l| {
                let ids: Vec<u64> = l
                    .iter()
                    .filter(|(_, b)| {
                        b.rooms
                            .iter()
                            .any(|(room, owner)| ring.owner_id(room.as_str()) != Some(*owner))
                    })
                    .map(|(id, _)| *id)
                    .collect();
                ids.iter()
                    .filter_map(|id| l.remove(id))
                    .map(|b| {
                        untracked(&b);
                        b.conn
                    })
                    .collect()
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
            self.drop_proxy(state, node, conn);
        }
    }

    /// Owner side: the proxy of (node, conn), created (with its writer) on first use.
    fn proxy(
        &self,
        bus: &Arc<Bus>,
        state: &Arc<NodeState>,
        node: u16,
        conn: u64,
        user: &UserId,
    ) -> Arc<ConnHandle> {
        let Ok(mut proxies) = self.proxies.lock() else {
            // A poisoned lock only follows a panic elsewhere; answer through a dead handle.
            let (h, _) = ConnHandle::new(
                proxy_id(node, conn),
                user.clone(),
                1,
                CancellationToken::new(),
            );
            h.cancel_silently();
            return Arc::new(h);
        };
        if let Some(p) = proxies.get(&(node, conn)) {
            if !p.handle.is_closed() {
                return p.handle.clone();
            }
        }
        let (handle, rx) = ConnHandle::new(
            proxy_id(node, conn),
            user.clone(),
            state.config.outbound_queue,
            CancellationToken::new(),
        );
        let handle = Arc::new(handle);
        metrics::gauge!(m::BRIDGE_PROXIES).increment(1.0);
        proxies.insert(
            (node, conn),
            Proxy {
                handle: handle.clone(),
                rooms: HashSet::new(),
            },
        );
        tokio::spawn(proxy_writer(
            bus.clone(),
            Arc::downgrade(state),
            node,
            conn,
            handle.clone(),
            rx,
        ));
        handle
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

    /// Owner side: removes a proxy and its memberships.
    fn drop_proxy(&self, state: &NodeState, node: u16, conn: u64) {
        let proxy = self
            .proxies
            .lock()
            .ok()
            .and_then(|mut p| p.remove(&(node, conn)));
        let Some(proxy) = proxy else { return };
        metrics::gauge!(m::BRIDGE_PROXIES).decrement(1.0);
        proxy.handle.cancel_silently();
        for room in proxy.rooms {
            let registry = state.registry.clone();
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

    /// Owner side, on shutdown: closes every proxy with `code`; their writers tell the
    /// requesting nodes, which close the real connections the same way.
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

    /// Bridged memberships now (remote connections on this node, local ones elsewhere).
    pub fn counts(&self) -> (usize, usize) {
        let proxies = self.proxies.lock().map(|p| p.len()).unwrap_or(0);
        let local = self.local.lock().map(|l| l.len()).unwrap_or(0);
        (proxies, local)
    }
}

/// Publishes a proxy's frames to the requesting node, in order and numbered.
async fn proxy_writer(
    bus: Arc<Bus>,
    state: std::sync::Weak<NodeState>,
    node: u16,
    conn: u64,
    handle: Arc<ConnHandle>,
    mut rx: mpsc::Receiver<Out>,
) {
    let mut seq = 0u64;
    loop {
        let first = tokio::select! {
            biased;
            _ = handle.cancelled() => break,
            out = rx.recv() => match out { Some(o) => o, None => break },
        };
        let mut frames = Vec::new();
        push(&mut frames, first);
        while frames.len() < DELIVER_BATCH {
            match rx.try_recv() {
                Ok(o) => push(&mut frames, o),
                Err(_) => break,
            }
        }
        if frames.is_empty() {
            continue;
        }
        seq += 1;
        let env = Envelope::Deliver {
            from_node: bus.me(),
            conn,
            seq,
            frames,
        };
        match bus.publish(node, &env).await {
            Ok(0) | Err(_) => {
                // The requester is gone, or Redis is: close with 4002 so that, if the
                // requester can still be reached, its client resumes rather than waits.
                metrics::counter!(m::BUS_ERRORS, "kind" => "publish").increment(1);
                handle.close(CloseCode::BridgeInterrupted);
                break;
            }
            Ok(_) => {}
        }
    }
    drop(rx);
    if let Some(code) = handle.close_code() {
        let env = Envelope::Closed {
            from_node: bus.me(),
            conn,
            code: code.code(),
        };
        let _ = bus.publish(node, &env).await;
    }
    if let Some(state) = state.upgrade() {
        bus.bridges.drop_proxy(&state, node, conn);
    }
}

fn push(frames: &mut Vec<String>, out: Out) {
    let mut one = |b: Bytes| {
        if let Ok(s) = String::from_utf8(b.to_vec()) {
            frames.push(s);
        }
    };
    match out {
        Out::Frame(b) => one(b),
        Out::Frames(v) => v.into_iter().for_each(one),
        // Pings and pongs are the real connection's business, on its own node.
        Out::Pong(_) => {}
    }
}

/// Owner side: a bridge request from another node.
pub(crate) async fn on_bridge_request(bus: &Arc<Bus>, state: &Arc<NodeState>, env: Envelope) {
    match env {
        Envelope::Join {
            from_node,
            conn,
            room,
            user,
            since,
        } => {
            let proxy = bus.bridges.proxy(bus, state, from_node, conn, &user);
            if state.is_shutting_down() {
                refuse(
                    &proxy,
                    &room,
                    ErrorCode::GoingAway,
                    "the node is shutting down",
                    None,
                );
                return;
            }
            match state.cluster.route(&room) {
                crate::cluster::Route::Local => {}
                crate::cluster::Route::Elsewhere(owner) => {
                    refuse(
                        &proxy,
                        &room,
                        ErrorCode::RoomMoved,
                        "the room moved",
                        Some(owner.addr),
                    );
                    return;
                }
                crate::cluster::Route::Unavailable => {
                    refuse(
                        &proxy,
                        &room,
                        ErrorCode::RoomUnavailable,
                        "the room's owner holds no lease right now; join again shortly",
                        None,
                    );
                    return;
                }
            }
            bus.bridges.proxy_rooms(from_node, conn, &room, true);
            state
                .registry
                .dispatch(&room, RoomCmd::Join { conn: proxy, since })
                .await;
        }
        Envelope::BridgedSend {
            from_node,
            conn,
            user,
            room,
            cid,
            body,
        } => {
            // Without a proxy (its join failed or was never seen) the proxy is created now,
            // so the room's `not_joined` answer reaches the sender instead of silence.
            let proxy = bus.bridges.proxy(bus, state, from_node, conn, &user);
            let cmd = RoomCmd::Send {
                from: proxy.user.clone(),
                cid,
                body,
                reply: Reply::Conn(proxy.clone()),
                source: Source::Bus,
            };
            if let Err(cmd) = state.registry.try_dispatch(&room, cmd) {
                cmd.refuse(
                    &room,
                    ErrorCode::Overloaded,
                    "room is overloaded; retry later with the same cid",
                );
            }
        }
        Envelope::Leave {
            from_node,
            conn,
            room,
        } => {
            let proxy = bus
                .bridges
                .proxies
                .lock()
                .ok()
                .and_then(|p| p.get(&(from_node, conn)).map(|p| p.handle.id));
            if let Some(conn_id) = proxy {
                bus.bridges.proxy_rooms(from_node, conn, &room, false);
                state
                    .registry
                    .dispatch_existing(
                        &room,
                        RoomCmd::Leave {
                            conn_id,
                            notify: true,
                        },
                    )
                    .await;
            }
        }
        Envelope::Gone { from_node, conn } => bus.bridges.drop_proxy(state, from_node, conn),
        _ => {}
    }
}

fn refuse(
    proxy: &ConnHandle,
    room: &RoomId,
    code: ErrorCode,
    message: &str,
    owner: Option<String>,
) {
    proxy.send_frame(&ServerFrame::Error {
        code,
        message: message.into(),
        cid: None,
        room: Some(room.to_string()),
        owner,
    });
}

/// Requester side: starts the task that sends one connection's bridge operations in order,
/// and tells every owner when the connection ends (`token` cancelled).
pub fn start_ops(bus: Arc<Bus>, conn: Arc<ConnHandle>) -> mpsc::Sender<BridgeOp> {
    let (tx, mut rx) = mpsc::channel::<BridgeOp>(OPS_QUEUE);
    tokio::spawn(async move {
        let me = bus.me();
        // Owners this connection ever joined through: each is told `gone` at the end, even
        // if the bridge record was already removed (gap, moved room, lost bus link).
        let mut owners: HashSet<u16> = HashSet::new();
        loop {
            let op = tokio::select! {
                biased;
                op = rx.recv() => match op { Some(op) => op, None => break },
                _ = conn.cancelled() => break,
            };
            let (owner, env, cid_room) = match op {
                BridgeOp::Join { owner, room, since } => {
                    owners.insert(owner);
                    bus.bridges.track(&conn, room.clone(), owner);
                    let env = Envelope::Join {
                        from_node: me,
                        conn: conn.id,
                        room: room.clone(),
                        user: conn.user.clone(),
                        since,
                    };
                    (owner, env, (None, room))
                }
                BridgeOp::Send {
                    owner,
                    room,
                    cid,
                    body,
                } => {
                    let env = Envelope::BridgedSend {
                        from_node: me,
                        conn: conn.id,
                        user: conn.user.clone(),
                        room: room.clone(),
                        cid: cid.clone(),
                        body,
                    };
                    (owner, env, (Some(cid), room))
                }
                BridgeOp::Leave { owner, room } => {
                    bus.bridges.untrack(conn.id, &room);
                    let env = Envelope::Leave {
                        from_node: me,
                        conn: conn.id,
                        room: room.clone(),
                    };
                    (owner, env, (None, room))
                }
            };
            let ok = matches!(bus.publish(owner, &env).await, Ok(n) if n > 0);
            if !ok {
                metrics::counter!(m::BUS_ERRORS, "kind" => "publish").increment(1);
                let (cid, room) = cid_room;
                conn.send_frame(&ServerFrame::Error {
                    code: ErrorCode::NodeUnavailable,
                    message: "the room's owner could not be reached through the bus; retry later"
                        .into(),
                    cid: cid.map(|c| c.to_string()),
                    room: Some(room.to_string()),
                    owner: None,
                });
                if matches!(env, Envelope::Join { .. }) {
                    bus.bridges.untrack(conn.id, &room);
                }
            }
        }
        owners.extend(bus.bridges.forget_conn(conn.id));
        for owner in owners {
            let _ = bus
                .publish(
                    owner,
                    &Envelope::Gone {
                        from_node: me,
                        conn: conn.id,
                    },
                )
                .await;
        }
    });
    tx
}

/// Keeps bridges consistent with the ring: see [`Bridges::on_ring_change`].
pub fn spawn_ring_watch(bus: Arc<Bus>, state: Arc<NodeState>, stop: CancellationToken) {
    let mut ring = state.cluster.ring().ring.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = ring.changed() => if changed.is_err() { return },
            }
            bus.bridges.on_ring_change(&state);
        }
    });
}
