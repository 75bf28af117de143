//! This node's place in the cluster: its registration and lease, its ring view, and which
//! rooms it may serve.
//!
//! With `--redis-url` the node registers itself in Redis (stable id, advertised address,
//! an incarnation per lease period) and serves a room only while (1) its lease is valid,
//! (2) the ring says it owns the room, and (3) the room's previous owner has let go:
//! [`Tenure`] decides that from the members' `applied` ring versions and the departed
//! members' waits (see `ownership.rs`). On a ring change, rooms it no longer owns are
//! handed over (stop accepting, flush, close members with 4001), and only then does it
//! publish that it applied the ring, which is what lets the new owners start. When its
//! lease lapses (a pause, a partition from Redis, a vanished key) every room is fenced at
//! once by its grant, and the node registers a new incarnation once they have all ended.
//! Rooms do the handing over and the fencing themselves (see `room/core.rs`). Without
//! Redis the node is standalone and owns every room.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chat_server::membership::{self, Lease, MembershipConfig, Registration, RingWatch, View};
use common::{metrics as m, CloseCode, NodeInfo, RoomId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::ownership::{Decision, Grant, Refusal, RoomOwnership, Tenure};
use crate::registry::Registry;
use crate::room::RoomCmd;
use crate::store::BoxFuture;

/// Where a request for a room should go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns it (it may still have to wait for the previous owner).
    Local,
    /// Another node owns it.
    Elsewhere(NodeInfo),
    /// Nobody may serve it here now: no lease, or an empty ring.
    Unavailable,
}

pub struct Cluster {
    me: NodeInfo,
    ring: RingWatch,
    registration: Option<Registration>,
    lease: Lease,
    tenure: Mutex<Tenure>,
    standalone: bool,
    /// Set when this node leaves on shutdown: its rooms then drain through the shutdown
    /// sequence (flush, paced `going_away`), not through ring-change handoffs.
    leaving: AtomicBool,
    acquire_timeout: Duration,
    /// Whether every member has applied the current ring (see `Tenure::settled`).
    settled: AtomicBool,
    /// How long a handoff may take before the ring change is acknowledged anyway (the
    /// rooms bound their own flush at two store timeouts).
    handoff_timeout: Duration,
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
            incarnation: 0,
        };
        let legacy_wait = config.membership_ttl + config.store_timeout;
        let handoff_timeout = config.store_timeout * 2 + Duration::from_secs(1);
        let Some(url) = &config.redis_url else {
            return Ok(Cluster {
                ring: RingWatch::fixed(common::Ring::new([me.clone()], config.vnodes)),
                tenure: Mutex::new(Tenure::new(me.id, legacy_wait)),
                me,
                registration: None,
                lease: Lease::forever(),
                standalone: true,
                leaving: AtomicBool::new(false),
                acquire_timeout: config.room_acquire_timeout,
                settled: AtomicBool::new(true),
                handoff_timeout,
            });
        };
        let cfg = MembershipConfig {
            redis_url: url.clone(),
            prefix: config.redis_prefix.clone(),
            ttl: config.membership_ttl,
            vnodes: config.vnodes,
            departure_wait: config.store_timeout,
        };
        let registration = membership::register(&cfg, me.clone())
            .await
            .with_context(|| format!("joining the cluster through {url}"))?;
        let ring = membership::watch(cfg, stop)
            .await
            .with_context(|| format!("watching membership through {url}"))?;
        let mut tenure = Tenure::new(me.id, legacy_wait);
        if registration.had_predecessor() {
            // An earlier process at this address did not leave: its last writes may still
            // be landing in the store.
            tracing::info!(node = me.id, wait = ?config.store_timeout, "a previous process of this node did not leave; waiting out its writes");
            tenure.not_before(Instant::now() + config.store_timeout);
        }
        let me = registration.me().clone();
        tracing::info!(node = me.id, addr = %me.addr, incarnation = me.incarnation, members = ring.current().len(), "joined the cluster");
        Ok(Cluster {
            lease: registration.lease().clone(),
            me,
            ring,
            registration: Some(registration),
            tenure: Mutex::new(tenure),
            standalone: false,
            leaving: AtomicBool::new(false),
            acquire_timeout: config.room_acquire_timeout,
            settled: AtomicBool::new(false),
            handoff_timeout,
        })
    }

    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    pub fn ring(&self) -> &RingWatch {
        &self.ring
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Relaxed)
    }

    /// Where requests for `room` go now.
    pub fn route(&self, room: &RoomId) -> Route {
        if self.standalone || self.is_leaving() {
            // Draining after leaving the ring: finish what is here, answer `going_away`.
            return Route::Local;
        }
        if !self.lease.is_valid() {
            return Route::Unavailable;
        }
        let ring = self.ring.current();
        match ring.owner(room.as_str()) {
            Some(owner) if owner.id == self.me.id => Route::Local,
            Some(owner) => Route::Elsewhere(owner.clone()),
            // An empty ring (Redis lost every key, nobody re-registered yet) gives nobody
            // the right to serve: no lease in view, no ownership.
            None => Route::Unavailable,
        }
    }

    /// The room's owner when it is another node.
    pub fn owner_elsewhere(&self, room: &RoomId) -> Option<NodeInfo> {
        match self.route(room) {
            Route::Elsewhere(owner) => Some(owner),
            _ => None,
        }
    }

    /// Whether this node holds a lease and is in its own ring view (always, standalone).
    pub fn in_ring(&self) -> bool {
        self.standalone
            || (self.lease.is_valid() && self.ring.current().get_node(self.me.id).is_some())
    }

    pub fn membership_ok(&self) -> bool {
        self.standalone || self.ring.redis_ok()
    }

    pub fn has_lease(&self) -> bool {
        self.lease.is_valid()
    }

    /// Whether every member has applied this node's current ring.
    pub fn settled(&self) -> bool {
        self.standalone || self.settled.load(Ordering::Relaxed)
    }

    /// Shutdown, step one: out of the ring (routers send new clients elsewhere), while this
    /// node still holds its lease and hands its rooms over.
    pub async fn drain(&self) {
        self.leaving.store(true, Ordering::Relaxed);
        if let Some(r) = &self.registration {
            r.drain().await;
            tracing::info!(node = self.me.id, "draining: left the ring");
        }
    }

    /// Shutdown, step two, once every room stopped accepting and flushed: tells the others
    /// they may take the rooms. Waits (bounded) for the view without this node, so the
    /// version acknowledged is the one they compute.
    pub async fn handed_over(&self) {
        let Some(r) = &self.registration else { return };
        let mut views = self.ring.view.clone();
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let view = views.borrow_and_update().clone();
            if view.ring.get_node(self.me.id).is_none() {
                r.set_applied(view.ring.version()).await;
                return;
            }
            tokio::select! {
                _ = views.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    /// Shutdown, last step: leaves for good. With `flushed`, others take the rooms at once;
    /// otherwise they wait as after a crash.
    pub async fn leave(&self, flushed: bool) {
        if let Some(r) = &self.registration {
            r.leave(flushed).await;
            tracing::info!(node = self.me.id, flushed, "left the cluster");
        }
    }

    /// Hands over every active room this node no longer owns on each ring change, then
    /// acknowledges the ring; keeps `chat_node_ownership_settled` current.
    pub fn spawn_handoffs(self: &Arc<Self>, registry: Arc<Registry>, stop: CancellationToken) {
        if self.standalone {
            metrics::gauge!(m::OWNERSHIP_SETTLED).set(1.0);
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut views = cluster.ring.view.clone();
            let mut applied: Option<(u64, u64)> = None;
            loop {
                if cluster.is_leaving() {
                    return;
                }
                let view = views.borrow_and_update().clone();
                let incarnation = cluster.lease.incarnation();
                let now = Instant::now();
                let next_wake = {
                    let mut t = cluster.tenure.lock().unwrap_or_else(|p| p.into_inner());
                    t.observe(&view, incarnation, now);
                    let settled = t.settled(&view, incarnation, now);
                    metrics::gauge!(m::OWNERSHIP_SETTLED).set(if settled.is_ok() {
                        1.0
                    } else {
                        0.0
                    });
                    settled.err().flatten()
                };
                let version = view.ring.version();
                if cluster.lease.is_valid() && applied != Some((incarnation, version)) {
                    cluster.hand_over(&registry, &view).await;
                    // A newer ring arrived meanwhile: hand over for it before acknowledging.
                    if views.has_changed().unwrap_or(false)
                        && views.borrow().ring.version() != version
                    {
                        continue;
                    }
                    if let Some(r) = &cluster.registration {
                        r.set_applied(version).await;
                    }
                    applied = Some((incarnation, version));
                }
                let wake = next_wake.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    changed = views.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep_until(wake) => {}
                }
            }
        });
    }

    /// Hands over the active rooms `view` gives to others, and waits (bounded) until each
    /// has stopped accepting, flushed and ended.
    async fn hand_over(&self, registry: &Arc<Registry>, view: &View) {
        let mut ended = Vec::new();
        for room in registry.room_ids() {
            let owner = view.ring.owner(room.as_str());
            if owner.map(|o| o.id) == Some(self.me.id) {
                continue;
            }
            let cmd = RoomCmd::Handoff {
                close: Some(CloseCode::RoomMoved),
                owner: owner.map(|o| o.addr.clone()),
                owner_id: owner.map(|o| o.id),
            };
            if let Some(done) = registry.dispatch_existing_then_ended(&room, cmd).await {
                ended.push(done);
            }
        }
        if ended.is_empty() {
            return;
        }
        let rooms = ended.len();
        tracing::info!(
            rooms,
            version = view.ring.version(),
            "ring changed: handing rooms over"
        );
        if tokio::time::timeout(self.handoff_timeout, futures_util::future::join_all(ended))
            .await
            .is_err()
        {
            tracing::warn!(rooms, "some rooms did not finish handing over in time");
        }
    }

    /// Watches the lease; when it lapses, fences every room, waits until they ended, and
    /// registers a new incarnation.
    pub fn spawn_lease_guard(self: &Arc<Self>, registry: Arc<Registry>, stop: CancellationToken) {
        if self.standalone {
            return;
        }
        let cluster = self.clone();
        tokio::spawn(async move {
            loop {
                if !wait_for_lapse(&cluster.lease, &stop).await || cluster.is_leaving() {
                    return;
                }
                let incarnation = cluster.lease.incarnation();
                // Already invalid by the clock; ending it wakes rooms waiting to be granted,
                // so they refuse at once instead of at their acquire deadline.
                cluster.lease.end();
                metrics::counter!(m::LEASE_LOST).increment(1);
                metrics::gauge!(m::READY).set(0.0);
                tracing::error!(
                    node = cluster.me.id,
                    incarnation,
                    "lease lapsed: fencing every room, then registering again"
                );
                cluster
                    .tenure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .lapsed();
                cluster.fence_rooms(&registry).await;
                cluster
                    .tenure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .quiesced(incarnation);
                if !cluster.rejoin(&stop).await {
                    return;
                }
            }
        });
    }

    /// Every room of the lapsed incarnation: its grant is already invalid, so any command
    /// makes it refuse, close its members with 4001 and end; wait (bounded) for that.
    async fn fence_rooms(&self, registry: &Arc<Registry>) {
        let mut ended = Vec::new();
        for room in registry.room_ids() {
            let cmd = RoomCmd::Handoff {
                close: Some(CloseCode::RoomMoved),
                owner: None,
                owner_id: None,
            };
            if let Some(done) = registry.dispatch_existing_then_ended(&room, cmd).await {
                ended.push(done);
            }
        }
        let rooms = ended.len();
        if tokio::time::timeout(self.handoff_timeout, futures_util::future::join_all(ended))
            .await
            .is_err()
        {
            tracing::warn!(rooms, "some fenced rooms did not end in time");
        }
        tracing::info!(rooms, "fenced every room");
    }

    /// Registers again, retrying with backoff until Redis answers. False when stopping.
    async fn rejoin(&self, stop: &CancellationToken) -> bool {
        let Some(r) = &self.registration else {
            return false;
        };
        let mut backoff = Duration::from_millis(100);
        loop {
            if self.is_leaving() || stop.is_cancelled() {
                return false;
            }
            match r.rejoin().await {
                Ok(incarnation) => {
                    tracing::info!(
                        node = self.me.id,
                        incarnation,
                        "registered again after the lease lapsed"
                    );
                    return true;
                }
                Err(e) => tracing::warn!(error = %e, "registering again failed; retrying"),
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Resolves when `lease` is not valid (true), or when stopping (false).
async fn wait_for_lapse(lease: &Lease, stop: &CancellationToken) -> bool {
    loop {
        let changed = lease.changed();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if !lease.is_valid() {
            return true;
        }
        let until = lease.expires_at();
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = &mut changed => {}
            _ = sleep_until_some(until) => {}
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl RoomOwnership for Cluster {
    fn acquire<'a>(&'a self, room: &'a RoomId) -> BoxFuture<'a, Result<Grant, Refusal>> {
        Box::pin(async move {
            if self.standalone {
                return Ok(Grant::forever());
            }
            let deadline = Instant::now() + self.acquire_timeout;
            let mut views = self.ring.view.clone();
            loop {
                if self.is_leaving() {
                    return Err(Refusal::Unavailable);
                }
                let now = Instant::now();
                let incarnation = self.lease.incarnation();
                if !self.lease.is_valid_for(incarnation, now) {
                    return Err(Refusal::Unavailable);
                }
                let view = views.borrow_and_update().clone();
                let decision = self
                    .tenure
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .decide(room.as_str(), &view, incarnation, now);
                let until = match decision {
                    Decision::Serve => {
                        return Ok(Grant::for_incarnation(self.lease.clone(), incarnation))
                    }
                    Decision::Elsewhere(owner) => {
                        return Err(Refusal::Moved {
                            owner: Some(owner.addr),
                        })
                    }
                    Decision::NoOwner => return Err(Refusal::Unavailable),
                    Decision::Wait(until) => until,
                };
                if now >= deadline {
                    tracing::debug!(%room, "the previous owner did not let go in time");
                    return Err(Refusal::Unavailable);
                }
                let wake = until.map_or(deadline, |u| u.min(deadline));
                let lease_changed = self.lease.changed();
                tokio::select! {
                    changed = views.changed() => if changed.is_err() { return Err(Refusal::Unavailable) },
                    _ = tokio::time::sleep_until(wake) => {}
                    _ = lease_changed => {}
                }
            }
        })
    }

    fn owner_elsewhere(&self, room: &RoomId) -> Option<String> {
        Cluster::owner_elsewhere(self, room).map(|n| n.addr)
    }
}

/// The room ownership of a started cluster, for the rooms' context.
pub fn ownership(cluster: &Arc<Cluster>) -> Arc<dyn RoomOwnership> {
    cluster.clone()
}
