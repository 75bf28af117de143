//! This node's place in the cluster: membership, its ring view, and room ownership.
//!
//! With `--redis-url` the node registers itself in Redis (stable id, advertised address),
//! watches membership, and serves a room only if the ring says it owns it; when the ring
//! changes, rooms it no longer owns are handed over: they stop accepting, flush what they
//! accepted to the store, then close their members with `room_moved` (4001) so clients
//! reconnect through a router to the new owner and resume with `since`. Without Redis the
//! node is standalone and owns every room. This module decides ownership; rooms do the
//! handing over (see `room/core.rs`).

use std::sync::{Arc, Mutex};

use common::membership::{self, MembershipConfig, Registration, RingWatch};
use common::{CloseCode, NodeInfo, RoomId};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::registry::Registry;
use crate::room::RoomCmd;

pub struct Cluster {
    me: NodeInfo,
    ring: RingWatch,
    registration: Mutex<Option<Registration>>,
    standalone: bool,
    /// Set when this node leaves on shutdown: its rooms then drain through the shutdown
    /// sequence (flush, paced `going_away`), not through ring-change handoffs.
    leaving: std::sync::atomic::AtomicBool,
}

impl Cluster {
    /// Registers and starts watching, or sets up standalone ownership without Redis.
    pub async fn start(
        config: &Config,
        bound: std::net::SocketAddr,
        stop: CancellationToken,
    ) -> anyhow::Result<Cluster> {
        let me = NodeInfo {
            id: config.node_id,
            addr: config
                .advertise
                .clone()
                .unwrap_or_else(|| bound.to_string()),
            started_at_ms: common::id::now_ms(),
        };
        let Some(url) = &config.redis_url else {
            return Ok(Cluster {
                ring: RingWatch::fixed(common::Ring::new([me.clone()], config.vnodes)),
                me,
                registration: Mutex::new(None),
                standalone: true,
                leaving: Default::default(),
            });
        };
        let cfg = MembershipConfig {
            redis_url: url.clone(),
            prefix: config.redis_prefix.clone(),
            ttl: config.membership_ttl,
            vnodes: config.vnodes,
        };
        let registration = membership::register(&cfg, me.clone())
            .await
            .map_err(|e| anyhow::anyhow!("joining the cluster through {url}: {e}"))?;
        let ring = membership::watch(cfg, stop)
            .await
            .map_err(|e| anyhow::anyhow!("watching membership through {url}: {e}"))?;
        tracing::info!(node = me.id, addr = %me.addr, members = ring.current().len(), "joined the cluster");
        Ok(Cluster {
            me,
            ring,
            registration: Mutex::new(Some(registration)),
            standalone: false,
            leaving: Default::default(),
        })
    }

    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    pub fn ring(&self) -> &RingWatch {
        &self.ring
    }

    /// The room's owner when it is another node; `None` when this node owns it.
    pub fn owner_elsewhere(&self, room: &RoomId) -> Option<NodeInfo> {
        if self.leaving.load(std::sync::atomic::Ordering::Relaxed) {
            // Draining after leaving the ring: finish what is here, answer `going_away`.
            return None;
        }
        let ring = self.ring.current();
        match ring.owner(room.as_str()) {
            Some(owner) if owner.id != self.me.id => Some(owner.clone()),
            // An empty ring means membership lost us too; serve rather than refuse all.
            _ => None,
        }
    }

    /// Whether this node is in its own ring view (always, standalone).
    pub fn in_ring(&self) -> bool {
        self.standalone || self.ring.current().get_node(self.me.id).is_some()
    }

    pub fn membership_ok(&self) -> bool {
        self.standalone || self.ring.redis_ok()
    }

    /// Leaves the ring now (graceful shutdown), so routers stop sending new clients here.
    pub async fn leave(&self) {
        self.leaving
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let registration = self.registration.lock().ok().and_then(|mut r| r.take());
        if let Some(r) = registration {
            r.leave().await;
            tracing::info!(node = self.me.id, "left the cluster");
        }
    }

    /// Hands over every active room this node no longer owns, on each ring change.
    pub fn spawn_handoffs(self: &Arc<Self>, registry: Arc<Registry>, stop: CancellationToken) {
        if self.standalone {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut ring = cluster.ring.ring.clone();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = ring.changed() => if changed.is_err() { return },
                }
                if cluster.leaving.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                let mut moved = 0;
                for room in registry.room_ids() {
                    if let Some(owner) = cluster.owner_elsewhere(&room) {
                        moved += 1;
                        registry
                            .dispatch_existing(
                                &room,
                                RoomCmd::Handoff {
                                    close: Some(CloseCode::RoomMoved),
                                    owner: Some(owner.addr),
                                },
                            )
                            .await;
                    }
                }
                if moved > 0 {
                    tracing::info!(rooms = moved, "ring changed: handing rooms over");
                }
            }
        });
    }
}
