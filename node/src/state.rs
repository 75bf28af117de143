//! The state one node's connections and requests share: its config, the cluster view,
//! the rooms, the bus, authentication, presence, and its open connections.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::bus;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::outbound::ConnHandle;
use crate::presence::Presence;
use crate::registry::Registry;
use crate::room::RoomCtx;

/// State shared by every connection and request of one node.
pub struct NodeState {
    pub config: Arc<Config>,
    pub cluster: Arc<Cluster>,
    /// Cross-shard traffic (forwarded publishes, bridged rooms); set in cluster mode once
    /// the inbox is subscribed.
    pub bus: std::sync::OnceLock<Arc<bus::bridge::Bridges>>,
    pub registry: Arc<Registry>,
    pub auth: Authenticator,
    /// Users online on this node, mirrored to Redis for cluster-wide presence.
    pub presence: Arc<Presence>,
    pub open_connections: AtomicUsize,
    pub(crate) conn_ids: AtomicU64,
    pub(crate) conns: Mutex<HashMap<u64, Arc<ConnHandle>>>,
    /// Parent of every connection's token.
    pub shutdown_conns: CancellationToken,
    pub conn_tracker: TaskTracker,
}

impl NodeState {
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn is_shutting_down(&self) -> bool {
        self.registry.ctx().is_draining()
    }

    pub(crate) fn register_conn(&self, conn: &Arc<ConnHandle>) {
        if let Ok(mut conns) = self.conns.lock() {
            conns.insert(conn.id, conn.clone());
        }
        self.presence.connected(&conn.user);
    }

    pub(crate) fn unregister_conn(&self, id: u64) {
        let gone = self
            .conns
            .lock()
            .ok()
            .and_then(|mut conns| conns.remove(&id));
        if let Some(conn) = gone {
            self.presence.disconnected(&conn.user);
        }
    }

    pub(crate) fn snapshot_conns(&self) -> Vec<Arc<ConnHandle>> {
        self.conns
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Ready to take traffic: the store answers, the node is not draining, and it holds its
/// lease and is in its own ring view (a node that membership lost gets no traffic from
/// routers anyway).
pub fn is_ready(ctx: &RoomCtx, cluster: &Cluster) -> bool {
    ctx.store_healthy() && !ctx.is_draining() && cluster.in_ring()
}
