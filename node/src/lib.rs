//! chat-node: one node of the chat cluster.
//!
//! [`run`] serves WebSocket, HTTP API, health and metrics on one listener until its
//! shutdown token is cancelled, then shuts down gracefully: stop accepting, turn `/readyz`
//! red, close clients with `going_away` at a capped rate, let rooms flush their pending
//! store writes, and return within the configured grace period. `main.rs` only parses
//! config and wires signals; tests call `run` directly on port 0.

pub mod api;
pub mod auth;
pub mod bus;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod frames;
pub mod hooks;
pub mod http;
pub mod outbound;
pub mod ownership;
pub mod presence;
pub mod reader;
mod refusal;
pub mod registry;
pub mod room;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use chat_server::http::Acceptor;
use common::{metrics as m, CloseCode};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::config::{Config, StoreKind};
use crate::registry::Registry;
use crate::room::RoomCtx;
use crate::store::memory::MemoryStore;
use crate::store::scylla::{ScyllaConfig, ScyllaStore};
use crate::store::MessageStore;

pub use crate::config::Config as NodeConfig;
pub use crate::state::{is_ready, NodeState};

/// How often readiness re-checks the store.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// Builds the store named by the config, connecting and migrating the schema if needed.
pub async fn build_store(config: &Config) -> anyhow::Result<Arc<dyn MessageStore>> {
    match config.store {
        StoreKind::Memory => Ok(Arc::new(MemoryStore::new(config.memory_history_per_room))),
        StoreKind::Scylla => {
            let store = ScyllaStore::connect(&ScyllaConfig {
                nodes: config.cql_nodes.clone(),
                keyspace: config.cql_keyspace.clone(),
                replication: config.cql_replication.clone(),
                consistency: config.cql_consistency.to_scylla(),
                bucket: config.cql_bucket,
                max_inflight: config.cql_max_inflight,
                request_timeout: config.store_timeout,
                message_ttl: config.message_ttl,
            })
            .await?;
            Ok(Arc::new(store))
        }
    }
}

/// WebSocket connections the open-file limit leaves room for: the soft limit (which
/// `main` raises to the hard one) less a reserve of a tenth, at least 256, for HTTP
/// clients, probes, scrapes, the store's and Redis's connections and the listener.
fn connection_room() -> usize {
    let limit = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft);
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    limit.saturating_sub((limit / 10).max(256)).max(1)
}

impl chat_server::Server for Config {
    const NAME: &'static str = "chat-node";

    fn check(&self) -> Result<(), chat_server::InvalidConfig> {
        self.validate()?;
        // Key files are part of the config: an unreadable one is a config error too.
        Authenticator::from_config(self)
            .map(drop)
            .map_err(|e| chat_server::InvalidConfig(e.to_string()))
    }

    fn listen(&self) -> std::net::SocketAddr {
        self.listen
    }

    fn flags(&self) -> &chat_server::binary::ServerFlags {
        &self.server
    }

    async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        run(self, listener, shutdown).await
    }
}

/// Serves until `shutdown` is cancelled, then shuts down gracefully.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let store = build_store(&config).await?;
    run_with_store(config, listener, shutdown, store).await
}

/// [`run`] with a store built by the caller.
pub async fn run_with_store(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
    store: Arc<dyn MessageStore>,
) -> anyhow::Result<()> {
    config.validate()?;
    let mut config = config;
    let fd_room = connection_room();
    if config.max_connections == 0 {
        config.max_connections = fd_room;
    } else if config.max_connections > fd_room {
        tracing::warn!(
            max_connections = config.max_connections,
            fits = fd_room,
            "--max-connections is above what the open-file limit leaves room for: at the limit, new connections (health checks among them) go unanswered"
        );
    }
    let config = Arc::new(config);
    let auth = Authenticator::from_config(&config)?;
    let background = CancellationToken::new();
    chat_server::telemetry::start(telemetry::describe_all, background.clone());
    let rooms_shutdown = CancellationToken::new();
    let local = listener.local_addr()?;
    // The inbox first: once this node is in the ring, peers may send to it.
    let bus = match &config.redis_url {
        Some(url) => Some(
            bus::redis::Bus::start(
                url,
                &config.redis_prefix,
                config.node_id,
                background.clone(),
            )
            .await
            .with_context(|| format!("subscribing to the bus through {url}"))?,
        ),
        None => None,
    };
    let cluster = Arc::new(Cluster::start(&config, local, background.clone()).await?);
    let ctx = Arc::new(RoomCtx::new(
        config.clone(),
        store,
        rooms_shutdown.clone(),
        cluster::ownership(&cluster),
    ));
    let (presence, presence_writer) = presence::Presence::new(
        &config.redis_prefix,
        config.node_id,
        config.user_presence_ttl,
        config.redis_url.is_some(),
    );
    let presence = Arc::new(presence);
    if let (Some(writer), Some(url)) = (presence_writer, &config.redis_url) {
        let conn = presence::connect(url)
            .await
            .with_context(|| format!("connecting to Redis for presence at {url}"))?;
        tokio::spawn(presence::run(
            presence.clone(),
            writer,
            conn,
            background.clone(),
        ));
    }
    let state = Arc::new(NodeState {
        presence,
        config: config.clone(),
        cluster: cluster.clone(),
        bus: std::sync::OnceLock::new(),
        registry: Registry::new(ctx.clone()),
        auth,
        open_connections: AtomicUsize::new(0),
        conn_ids: AtomicU64::new(1),
        conns: Mutex::new(HashMap::new()),
        shutdown_conns: CancellationToken::new(),
        conn_tracker: TaskTracker::new(),
    });
    tokio::spawn(probe_store(
        ctx.clone(),
        cluster.clone(),
        background.clone(),
    ));
    cluster.spawn_handoffs(state.registry.clone(), background.clone());
    if let Some(hooks) = &ctx.hooks {
        let waker = state.clone();
        tokio::spawn(hooks::sweep(
            hooks.clone(),
            ctx.store.clone(),
            move |room| {
                // Only rooms this node owns, and not while it is leaving.
                if !waker.is_shutting_down()
                    && matches!(waker.cluster.route(&room), cluster::Route::Local)
                {
                    let _ = waker.registry.try_dispatch(&room, room::RoomCmd::Wake);
                }
            },
            background.clone(),
        ));
    }
    cluster.spawn_lease_guard(state.registry.clone(), background.clone());
    if let Some(bus) = bus {
        let bridges = bus::bridge::Bridges::attach(bus, cluster.clone(), state.registry.clone());
        bus::bridge::spawn_ring_watch(bridges.clone(), background.clone());
        let _ = state.bus.set(bridges);
    }
    tracing::info!(
        addr = %local,
        advertise = %cluster.me().addr,
        node = config.node_id,
        store = ctx.store.name(),
        max_connections = config.max_connections,
        "chat-node listening"
    );

    // The listener stays open through the drain so probes and scrapes see `/readyz` turn
    // red (and new upgrades get `going_away`) instead of a refused connection.
    let acceptor = {
        let state = state.clone();
        Acceptor::start(listener, count_bad_http, move |req, _peer| {
            http::handle(req, state.clone())
        })
    };
    shutdown.cancelled().await;
    shutdown_gracefully(&state, &ctx, acceptor).await;
    background.cancel();
    Ok(())
}

fn count_bad_http() {
    metrics::counter!(m::BAD_INPUT, "kind" => "bad_http").increment(1);
}

async fn shutdown_gracefully(state: &Arc<NodeState>, ctx: &Arc<RoomCtx>, acceptor: Acceptor) {
    let grace = state.config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    ctx.start_draining();
    metrics::gauge!(m::READY).set(0.0);
    // Leave the ring first so routers send new clients elsewhere, then let every room stop
    // accepting and flush what it accepted before any client is told to reconnect: a
    // client that retries elsewhere then finds its acked messages in the store. Only then
    // are the new owners told they may start (the lease is held until the very end).
    state.cluster.drain().await;
    for room in state.registry.room_ids() {
        state
            .registry
            .dispatch_existing(
                &room,
                room::RoomCmd::Handoff {
                    close: None,
                    owner: None,
                    owner_id: None,
                },
            )
            .await;
    }
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    while ctx.pending() > 0 && tokio::time::Instant::now() < deadline {
        poll.tick().await;
    }
    let flushed = ctx.pending() == 0;
    if flushed {
        state.cluster.handed_over().await;
    } else {
        tracing::warn!(
            pending = ctx.pending(),
            "grace period ended with store writes pending; the new owners will wait them out"
        );
    }
    tracing::info!(?grace, "shutting down: closing clients");
    // Close clients at a capped rate so they do not all reconnect at the same instant.
    let conns = state.snapshot_conns();
    let per_tick = (state.config.shutdown_close_rate / 10).max(1) as usize;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    for chunk in conns.chunks(per_tick) {
        tick.tick().await;
        for conn in chunk {
            conn.close(CloseCode::GoingAway);
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    // Remote members bridged into this node's rooms go the same way.
    if let Some(bus) = state.bus.get() {
        bus.close_all_proxies(CloseCode::GoingAway);
        // Their closes travel in the links: give the writers a moment to publish them.
        let flushed_by = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
        while bus.queued() > 0 && tokio::time::Instant::now() < flushed_by {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Anything left (the deadline cut the pacing short) is closed at once.
    for conn in state.snapshot_conns() {
        conn.close(CloseCode::GoingAway);
    }
    state.conn_tracker.close();
    let _ = tokio::time::timeout_at(deadline, state.conn_tracker.wait()).await;
    acceptor.stop(deadline).await;
    state.cluster.leave(flushed).await;
    // Rooms flush what they accepted, then exit once empty.
    ctx.shutdown.cancel();
    ctx.tracker.close();
    if tokio::time::timeout_at(deadline, ctx.tracker.wait())
        .await
        .is_err()
    {
        tracing::error!("grace period ended before every room flushed its store writes");
    } else {
        tracing::info!("shutdown complete");
    }
}

async fn probe_store(ctx: Arc<RoomCtx>, cluster: Arc<Cluster>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(STORE_PROBE_INTERVAL);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = matches!(
            tokio::time::timeout(ctx.config.store_timeout, ctx.store.check()).await,
            Ok(Ok(()))
        );
        if ok != ctx.store_healthy() {
            if ok {
                tracing::info!(store = ctx.store.name(), "store reachable again");
            } else {
                tracing::warn!(store = ctx.store.name(), "store unreachable");
            }
        }
        ctx.set_store_healthy(ok);
        let ready = is_ready(&ctx, &cluster);
        metrics::gauge!(m::READY).set(if ready { 1.0 } else { 0.0 });
    }
}
