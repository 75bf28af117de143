//! chat-router: the chat cluster's stateless front door.
//!
//! [`run`] watches cluster membership in Redis, builds the same consistent-hash ring as every
//! node and router (`common::ring`), and sends each room's traffic to the node that owns it:
//! WebSocket upgrades are proxied (or redirected with a 307) and the room API is forwarded
//! over pooled connections. It keeps no room or session state, so any number of routers can
//! run side by side and a client may use any of them. It must not decide placement by itself:
//! the owner is always `Ring::owner` over the membership the nodes registered.
//! `main.rs` only parses config and wires signals; tests call `run` directly on port 0.

pub mod config;
pub mod demo;
pub mod http;
pub mod proxy;
pub mod telemetry;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chat_server::http::Acceptor;
use chat_server::membership::{self, RingWatch};
use common::{metrics as m, Ring};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use crate::config::Config as RouterConfig;
use crate::config::Config;

/// How long cut splices get to unwind after the grace period before `run` returns anyway.
const CUT_UNWIND: Duration = Duration::from_secs(1);
/// Retry bounds for reaching Redis the first time; one attempt may take this long.
const WATCH_ATTEMPT: Duration = Duration::from_secs(5);
const WATCH_RETRY_MIN: Duration = Duration::from_millis(250);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(5);

/// State shared by every request of one router.
pub struct RouterState {
    pub config: Arc<Config>,
    /// Set once the first membership read succeeded; until then the ring is empty.
    ring: OnceLock<RingWatch>,
    empty: Arc<Ring>,
    draining: AtomicBool,
    pub(crate) upstream: proxy::Upstream,
}

impl RouterState {
    /// The current ring (empty until membership has been read once).
    pub fn ring(&self) -> Arc<Ring> {
        match self.ring.get() {
            Some(w) => w.current(),
            None => self.empty.clone(),
        }
    }

    /// Whether the last membership read reached Redis.
    pub fn redis_ok(&self) -> bool {
        self.ring.get().is_some_and(RingWatch::redis_ok)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Ready: a non-empty ring and not shutting down.
    pub fn is_ready(&self) -> bool {
        !self.is_draining() && !self.ring().is_empty()
    }
}

impl chat_server::Server for Config {
    const NAME: &'static str = "chat-router";

    fn check(&self) -> Result<(), chat_server::InvalidConfig> {
        self.validate()
    }

    fn listen(&self) -> SocketAddr {
        self.listen
    }

    fn flags(&self) -> &chat_server::binary::ServerFlags {
        &self.server
    }

    async fn serve(self, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
        run(self, listener, shutdown).await
    }
}

/// Serves until `shutdown` is cancelled, then shuts down gracefully: stop accepting, turn
/// `/readyz` red, let in-flight requests finish, and cut WebSocket splices still open when
/// the grace period ends (their clients reconnect through another router).
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate()?;
    let config = Arc::new(config);
    let background = CancellationToken::new();
    chat_server::telemetry::start(telemetry::describe_all, background.clone());
    let state = Arc::new(RouterState {
        upstream: proxy::Upstream::new(config.clone()),
        config: config.clone(),
        ring: OnceLock::new(),
        empty: Arc::new(Ring::new([], config.vnodes)),
        draining: AtomicBool::new(false),
    });
    metrics::gauge!(m::ROUTER_READY).set(0.0);
    tokio::spawn(follow_membership(state.clone(), background.clone()));

    let local = listener.local_addr()?;
    tracing::info!(
        addr = %local,
        redis_prefix = %config.redis_prefix,
        redirect = config.redirect,
        "chat-router listening"
    );
    let acceptor = {
        let state = state.clone();
        Acceptor::start(
            listener,
            || {},
            move |req, peer| http::handle(req, state.clone(), peer),
        )
    };
    shutdown.cancelled().await;
    shutdown_gracefully(&state, acceptor).await;
    background.cancel();
    Ok(())
}

/// Reads membership (retrying until Redis answers), then mirrors the ring into metrics.
async fn follow_membership(state: Arc<RouterState>, stop: CancellationToken) {
    let mut backoff = WATCH_RETRY_MIN;
    // Until Redis answers the router has no ring: /readyz stays red and room traffic gets
    // 503, which is the truth. Warn once, not on every retry.
    let mut warned = false;
    let watch = loop {
        let attempt = tokio::time::timeout(
            WATCH_ATTEMPT,
            membership::watch(state.config.membership(), stop.child_token()),
        )
        .await;
        match attempt {
            Ok(Ok(w)) => break w,
            Ok(Err(e)) => {
                if !warned {
                    tracing::warn!(error = %e, "membership: cannot read from redis yet; retrying");
                    warned = true;
                }
            }
            Err(_) => {
                if !warned {
                    tracing::warn!(attempt_timeout = ?WATCH_ATTEMPT, "membership: redis did not answer; retrying");
                    warned = true;
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(WATCH_RETRY_MAX);
    };
    let mut rx = watch.ring.clone();
    if state.ring.set(watch).is_err() {
        return;
    }
    loop {
        let ring = rx.borrow_and_update().clone();
        tracing::info!(nodes = ring.len(), version = ring.version(), "router ring");
        metrics::gauge!(m::ROUTER_RING_NODES).set(ring.len() as f64);
        // Lossy above 2^53, but equal digests stay equal: enough to spot disagreeing routers.
        metrics::gauge!(m::ROUTER_RING_VERSION).set(ring.version() as f64);
        metrics::gauge!(m::ROUTER_READY).set(if state.is_ready() { 1.0 } else { 0.0 });
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                metrics::counter!(m::ROUTER_RING_CHANGES).increment(1);
            }
        }
    }
}

async fn shutdown_gracefully(state: &Arc<RouterState>, acceptor: Acceptor) {
    let grace = state.config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    state.draining.store(true, Ordering::Relaxed);
    metrics::gauge!(m::ROUTER_READY).set(0.0);
    tracing::info!(?grace, "shutting down: no new connections");
    if !acceptor.stop(deadline).await {
        tracing::warn!("grace period ended with HTTP requests in flight");
    }
    state.upstream.finish_splices(deadline, CUT_UNWIND).await;
    tracing::info!("shutdown complete");
}
