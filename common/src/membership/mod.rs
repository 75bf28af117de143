//! Cluster membership in Redis: nodes register themselves, routers and nodes watch.
//!
//! Each node keeps a key `<prefix>:node:<id>` holding its [`NodeInfo`] alive with a TTL,
//! refreshed at a third of it; on graceful shutdown it deletes the key. Every change is
//! announced on the channel `<prefix>:membership`, and watchers also re-read the keys on a
//! timer, because pub/sub is at-most-once and a crashed node announces nothing: its key
//! simply expires, and the next reconcile drops it (within the TTL plus one interval).
//! While Redis is unreachable a watcher keeps its last ring rather than guess, and a member
//! missing from Redis is dropped only after a full TTL unseen (a graceful leave, announced
//! on the channel, is applied at once).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ring::{NodeInfo, Ring};

mod lease;
pub use lease::Lease;

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub redis_url: String,
    /// Key and channel prefix, so several clusters can share one Redis.
    pub prefix: String,
    /// How long a node stays a member without a heartbeat.
    pub ttl: Duration,
    /// Virtual nodes per node in the ring.
    pub vnodes: u32,
}

impl MembershipConfig {
    fn node_key(&self, id: u16) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:membership", self.prefix)
    }

    fn reconcile_every(&self) -> Duration {
        (self.ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("node id {id} is already registered by {addr}; every node needs its own --node-id")]
    IdInUse { id: u16, addr: String },
}

/// A node's registration; [`Registration::leave`] removes it at once.
pub struct Registration {
    cfg: MembershipConfig,
    me: NodeInfo,
    conn: ConnectionManager,
    stop: CancellationToken,
    heartbeat: tokio::task::JoinHandle<()>,
}

/// Registers `me` and keeps the registration alive until [`Registration::leave`].
pub async fn register(
    cfg: &MembershipConfig,
    me: NodeInfo,
) -> Result<Registration, MembershipError> {
    let client = redis::Client::open(cfg.redis_url.as_str())?;
    let mut conn = client.get_connection_manager().await?;
    let key = cfg.node_key(me.id);
    let value = serde_json::to_string(&me).unwrap_or_default();
    let ttl_ms = cfg.ttl.as_millis() as u64;
    // Refuse an id that another live node holds: two nodes minting ids with the same node
    // bits could collide. The same address is this node restarting, which is fine.
    let existing: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
    if let Some(other) = existing.and_then(|v| serde_json::from_str::<NodeInfo>(&v).ok()) {
        if other.addr != me.addr {
            return Err(MembershipError::IdInUse {
                id: me.id,
                addr: other.addr,
            });
        }
    }
    redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .arg("PX")
        .arg(ttl_ms)
        .query_async::<()>(&mut conn)
        .await?;
    redis::cmd("PUBLISH")
        .arg(cfg.channel())
        .arg(format!("join:{}", me.id))
        .query_async::<()>(&mut conn)
        .await?;
    let stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(conn.clone(), key, value, cfg.ttl, stop.clone()));
    Ok(Registration {
        cfg: cfg.clone(),
        me,
        conn,
        stop,
        heartbeat,
    })
}

async fn heartbeat(
    mut conn: ConnectionManager,
    key: String,
    value: String,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let r = redis::cmd("SET")
            .arg(&key)
            .arg(&value)
            .arg("PX")
            .arg(ttl.as_millis() as u64)
            .query_async::<()>(&mut conn)
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "membership heartbeat failed");
        }
    }
}

impl Registration {
    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    /// Leaves the cluster now: the key is deleted and watchers are told.
    pub async fn leave(mut self) {
        self.stop.cancel();
        let _ = (&mut self.heartbeat).await;
        let key = self.cfg.node_key(self.me.id);
        let _ = redis::cmd("DEL")
            .arg(&key)
            .query_async::<()>(&mut self.conn)
            .await;
        let _ = redis::cmd("PUBLISH")
            .arg(self.cfg.channel())
            .arg(format!("leave:{}", self.me.id))
            .query_async::<()>(&mut self.conn)
            .await;
    }
}

/// A live view of the ring, kept current by a background task.
#[derive(Clone)]
pub struct RingWatch {
    pub ring: watch::Receiver<Arc<Ring>>,
    redis_ok: Arc<AtomicBool>,
}

impl RingWatch {
    pub fn current(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    /// Whether the last reconcile reached Redis.
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
    }

    /// A watch that never changes, for single-node use and tests.
    pub fn fixed(ring: Ring) -> RingWatch {
        let (tx, rx) = watch::channel(Arc::new(ring));
        // Keep the sender alive so receivers never see the channel close.
        std::mem::forget(tx);
        RingWatch {
            ring: rx,
            redis_ok: Arc::new(AtomicBool::new(true)),
        }
    }
}

/// Starts watching membership. The first ring is read before this returns, so callers
/// start with a real view (an error if Redis cannot be reached at all).
pub async fn watch(
    cfg: MembershipConfig,
    stop: CancellationToken,
) -> Result<RingWatch, MembershipError> {
    let client = redis::Client::open(cfg.redis_url.as_str())?;
    let mut conn = client.get_connection_manager().await?;
    let first = read_ring(&cfg, &mut conn).await?;
    let (tx, rx) = watch::channel(Arc::new(first));
    let redis_ok = Arc::new(AtomicBool::new(true));
    tokio::spawn(watch_loop(cfg, client, conn, tx, redis_ok.clone(), stop));
    Ok(RingWatch { ring: rx, redis_ok })
}

async fn read_ring(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
) -> Result<Ring, redis::RedisError> {
    Ok(Ring::new(read_members(cfg, conn).await?, cfg.vnodes))
}

async fn read_members(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
) -> Result<Vec<NodeInfo>, redis::RedisError> {
    let pattern = format!("{}:node:*", cfg.prefix);
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(200)
            .query_async(conn)
            .await?;
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    let mut nodes = Vec::new();
    if !keys.is_empty() {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        for v in values.into_iter().flatten() {
            match serde_json::from_str::<NodeInfo>(&v) {
                Ok(n) => nodes.push(n),
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable membership entry"),
            }
        }
    }
    Ok(nodes)
}

async fn watch_loop(
    cfg: MembershipConfig,
    client: redis::Client,
    mut conn: ConnectionManager,
    tx: watch::Sender<Arc<Ring>>,
    redis_ok: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(cfg.reconcile_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pubsub: Option<redis::aio::PubSubStream> = None;
    let mut last_seen: HashMap<u16, (NodeInfo, tokio::time::Instant)> = tx
        .borrow()
        .nodes()
        .iter()
        .map(|n| (n.id, (n.clone(), tokio::time::Instant::now())))
        .collect();
    let mut left: HashSet<u16> = HashSet::new();
    loop {
        if pubsub.is_none() {
            pubsub = subscribe(&client, &cfg).await;
        }
        let notified = async {
            match pubsub.as_mut() {
                Some(s) => Some(s.next().await),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            msg = notified => match msg.flatten() {
                Some(msg) => {
                    let text: String = msg.get_payload().unwrap_or_default();
                    if let Some(id) = text.strip_prefix("leave:").and_then(|id| id.parse().ok()) {
                        left.insert(id);
                    }
                }
                // The subscription broke; resubscribe on the next round.
                None => pubsub = None,
            },
            _ = tick.tick() => {}
        }
        match read_members(&cfg, &mut conn).await {
            Ok(present) => {
                redis_ok.store(true, Ordering::Relaxed);
                // A member leaves the ring only after it has been missing for a full TTL
                // on this watcher's clock: a Redis that restarted empty (its keys gone
                // until the next heartbeats) must not move every room twice. A graceful
                // leave announces itself and is applied at once.
                let now = tokio::time::Instant::now();
                for n in present {
                    last_seen.insert(n.id, (n, now));
                }
                last_seen.retain(|id, (_, seen)| {
                    !left.contains(id) && now.duration_since(*seen) < cfg.ttl
                });
                left.clear();
                let ring = Ring::new(last_seen.values().map(|(n, _)| n.clone()), cfg.vnodes);
                if ring.version() != tx.borrow().version() {
                    tracing::info!(nodes = ring.len(), version = ring.version(), "ring changed");
                    tx.send_replace(Arc::new(ring));
                }
            }
            Err(e) => {
                if redis_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "membership: redis unreachable; keeping the last ring");
                }
            }
        }
    }
}

async fn subscribe(
    client: &redis::Client,
    cfg: &MembershipConfig,
) -> Option<redis::aio::PubSubStream> {
    let mut pubsub = client.get_async_pubsub().await.ok()?;
    pubsub.subscribe(cfg.channel()).await.ok()?;
    Some(pubsub.into_on_message())
}
