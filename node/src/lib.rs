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
pub mod hooks;
pub mod http;
pub mod outbound;
pub mod ownership;
pub mod presence;
pub mod reader;
pub mod registry;
pub mod room;
pub mod store;
pub mod telemetry;
pub mod writer;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use common::head::{FirstHead, Prefixed};
use common::{metrics as m, CloseCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::cluster::Cluster;
use crate::config::{Config, StoreKind};
use crate::outbound::ConnHandle;
use crate::registry::{Registry, RoomCtx};
use crate::store::memory::MemoryStore;
use crate::store::scylla::{ScyllaConfig, ScyllaStore};
use crate::store::MessageStore;

pub use crate::config::Config as NodeConfig;

/// How often readiness re-checks the store.
const STORE_PROBE_INTERVAL: Duration = Duration::from_secs(1);

/// State shared by every connection and request of one node.
pub struct NodeState {
    pub config: Arc<Config>,
    pub cluster: Arc<Cluster>,
    /// Cross-shard forwarding; set in cluster mode once the inbox is subscribed.
    pub bus: std::sync::OnceLock<Arc<bus::redis::Bus>>,
    pub registry: Arc<Registry>,
    pub auth: Authenticator,
    /// Users online on this node, mirrored to Redis for cluster-wide presence.
    pub presence: Arc<presence::Presence>,
    pub open_connections: AtomicUsize,
    conn_ids: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<ConnHandle>>>,
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

    fn snapshot_conns(&self) -> Vec<Arc<ConnHandle>> {
        self.conns
            .lock()
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }
}

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

/// Serves until `shutdown` is cancelled, then shuts down gracefully.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
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
    config.validate().map_err(anyhow::Error::msg)?;
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
    telemetry::start(background.clone());
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
        bus.attach(Arc::downgrade(&state));
        bus::bridge::spawn_ring_watch(bus.clone(), state.clone(), background.clone());
        let _ = state.bus.set(bus);
    }
    tracing::info!(
        addr = %local,
        advertise = %cluster.me().addr,
        node = config.node_id,
        store = ctx.store.name(),
        max_connections = config.max_connections,
        "chat-node listening"
    );

    let http_tracker = TaskTracker::new();
    // The listener stays open through the drain so probes and scrapes see `/readyz` turn
    // red (and new upgrades get `going_away`) instead of a refused connection.
    let stop_accepting = CancellationToken::new();
    let acceptor = tokio::spawn(accept_loop(
        listener,
        state.clone(),
        http_tracker.clone(),
        stop_accepting.clone(),
    ));
    shutdown.cancelled().await;
    shutdown_gracefully(&state, &ctx, &http_tracker, stop_accepting, acceptor).await;
    background.cancel();
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<NodeState>,
    http_tracker: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let (stream, _peer) = tokio::select! {
            _ = stop.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let stop = stop.clone();
        http_tracker.spawn(async move {
            let mut stream = stream;
            let head = match common::head::read_first(&mut stream).await {
                FirstHead::Ok(head) => head,
                FirstHead::Refused(answer) => {
                    metrics::counter!(m::BAD_INPUT, "kind" => "bad_http").increment(1);
                    let _ = stream.write_all(&answer).await;
                    let _ = stream.shutdown().await;
                    return;
                }
                FirstHead::Gone => return,
            };
            let svc = service_fn(move |req| http::handle(req, state.clone()));
            let conn = http1::Builder::new()
                .max_buf_size(common::head::MAX_HEAD_BYTES)
                .serve_connection(TokioIo::new(Prefixed::new(head, stream)), svc)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "http connection ended with an error");
                    }
                }
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

async fn shutdown_gracefully(
    state: &Arc<NodeState>,
    ctx: &Arc<RoomCtx>,
    http_tracker: &TaskTracker,
    stop_accepting: CancellationToken,
    acceptor: tokio::task::JoinHandle<()>,
) {
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
        bus.bridges.close_all_proxies(CloseCode::GoingAway);
        // Their closes travel in the links: give the writers a moment to publish them.
        let flushed_by = (tokio::time::Instant::now() + Duration::from_secs(1)).min(deadline);
        while bus.bridges.queued() > 0 && tokio::time::Instant::now() < flushed_by {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    // Anything left (the deadline cut the pacing short) is closed at once.
    for conn in state.snapshot_conns() {
        conn.close(CloseCode::GoingAway);
    }
    state.conn_tracker.close();
    let _ = tokio::time::timeout_at(deadline, state.conn_tracker.wait()).await;
    stop_accepting.cancel();
    let _ = acceptor.await;
    http_tracker.close();
    let _ = tokio::time::timeout_at(deadline, http_tracker.wait()).await;
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

/// Ready to take traffic: the store answers, the node is not draining, and it holds its
/// lease and is in its own ring view (a node that membership lost gets no traffic from
/// routers anyway).
pub fn is_ready(ctx: &RoomCtx, cluster: &Cluster) -> bool {
    ctx.store_healthy() && !ctx.is_draining() && cluster.in_ring()
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
