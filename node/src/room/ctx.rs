//! What every room of the node shares: config, store, ids, the ownership grants, the
//! webhook deliveries, the shutdown token and tracker, and the node-wide store health and
//! pending count that readiness and shutdown read.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;

use common::{metrics as m, IdGenerator};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::ownership::RoomOwnership;
use crate::store::MessageStore;

/// What every room of the node shares.
pub struct RoomCtx {
    pub config: Arc<Config>,
    pub store: Arc<dyn MessageStore>,
    pub ids: IdGenerator,
    pub shutdown: CancellationToken,
    /// Grants rooms to this node (the cluster's lease and ring, or standalone).
    pub ownership: Arc<dyn RoomOwnership>,
    /// Room tasks and their store/replay tasks, so shutdown can wait for pending writes.
    pub tracker: TaskTracker,
    /// Webhook delivery, when `--webhook-url` is set.
    pub hooks: Option<Arc<crate::hooks::Webhooks>>,
    store_healthy: AtomicBool,
    draining: AtomicBool,
    /// Messages accepted by rooms and not yet settled by the store, node-wide.
    pending: AtomicI64,
}

impl RoomCtx {
    pub fn new(
        config: Arc<Config>,
        store: Arc<dyn MessageStore>,
        shutdown: CancellationToken,
        ownership: Arc<dyn RoomOwnership>,
    ) -> RoomCtx {
        RoomCtx {
            ids: IdGenerator::new(config.node_id),
            hooks: crate::hooks::Webhooks::from_config(&config),
            config,
            store,
            shutdown,
            ownership,
            tracker: TaskTracker::new(),
            store_healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            pending: AtomicI64::new(0),
        }
    }

    /// False from a failed store call until the health probe sees the store again; new
    /// sends are refused meanwhile instead of being delivered and then not acked.
    pub fn store_healthy(&self) -> bool {
        self.store_healthy.load(Ordering::Relaxed)
    }

    /// Messages accepted and not yet settled by the store, across rooms.
    pub fn pending(&self) -> i64 {
        self.pending.load(Ordering::Relaxed)
    }

    pub(crate) fn add_pending(&self, n: i64) {
        self.pending.fetch_add(n, Ordering::Relaxed);
        metrics::gauge!(m::STORE_PENDING).increment(n as f64);
    }

    /// True from the start of a graceful shutdown: readiness is red, no new connections.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn mark_store_failed(&self) {
        self.store_healthy.store(false, Ordering::Relaxed);
    }

    pub fn set_store_healthy(&self, healthy: bool) {
        self.store_healthy.store(healthy, Ordering::Relaxed);
    }
}

/// Counts a live room task in `chat_node_rooms_active` for as long as it exists.
pub(crate) struct ActiveRoomGuard;

impl ActiveRoomGuard {
    pub(crate) fn new() -> Self {
        metrics::gauge!(m::ROOMS_ACTIVE).increment(1.0);
        ActiveRoomGuard
    }
}

impl Drop for ActiveRoomGuard {
    fn drop(&mut self) {
        metrics::gauge!(m::ROOMS_ACTIVE).decrement(1.0);
    }
}
