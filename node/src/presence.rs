//! Who is online, cluster-wide: each node marks the users it has connections for in Redis,
//! and any node answers "is this user online, and since when".
//!
//! A user's key is a hash, `{prefix}:presence:{user}`, with one field per node that has the
//! user connected: `since_ms:seen_ms`. A node writes its field when the user's first
//! connection to it opens, deletes it when the last one closes, and rewrites every field it
//! holds each third of `--user-presence-ttl`, renewing the key's expiry. A reader counts a
//! field only if it was seen within the TTL, so a crashed node's users age out even while
//! another node keeps the key alive. Writes go through a bounded queue to one task: the
//! connection path never waits on Redis, and when Redis is away the periodic rewrite puts
//! everything back once it returns.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::id::now_ms;
use common::{metrics as m, UserId};
use redis::aio::ConnectionManager;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Queued presence writes before new ones are dropped (the periodic rewrite repairs them).
const QUEUE: usize = 4096;
/// Users written per pipeline in a periodic rewrite.
const CHUNK: usize = 500;

enum Op {
    Online(UserId, u64),
    Offline(UserId),
}

struct Local {
    connections: u32,
    since: u64,
}

/// The node's side of user presence; standalone (no Redis) it answers from its own users.
pub struct Presence {
    users: Mutex<HashMap<UserId, Local>>,
    tx: Option<mpsc::Sender<Op>>,
    redis: OnceLock<ConnectionManager>,
    prefix: String,
    node: u16,
    ttl: Duration,
}

/// The answer to `GET /v1/users/{user}/presence`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct UserStatus {
    pub user: UserId,
    pub online: bool,
    /// Unix ms since when the user has been connected without a break on some node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    /// The nodes the user is connected to.
    pub nodes: Vec<u16>,
}

impl Presence {
    /// With `redis` (cluster mode), the writer must be started with [`run`].
    pub fn new(prefix: &str, node: u16, ttl: Duration, redis: bool) -> (Presence, Option<Writer>) {
        let (tx, rx) = if redis {
            let (tx, rx) = mpsc::channel(QUEUE);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let presence = Presence {
            users: Mutex::new(HashMap::new()),
            tx,
            redis: OnceLock::new(),
            prefix: prefix.to_owned(),
            node,
            ttl,
        };
        (presence, rx.map(|rx| Writer { rx }))
    }

    fn key(&self, user: &UserId) -> String {
        format!("{}:presence:{}", self.prefix, user.as_str())
    }

    /// A connection of `user` opened on this node.
    pub fn connected(&self, user: &UserId) {
        let Ok(mut users) = self.users.lock() else {
            return;
        };
        let entry = users.entry(user.clone()).or_insert(Local {
            connections: 0,
            since: now_ms(),
        });
        entry.connections += 1;
        if entry.connections == 1 {
            metrics::gauge!(m::PRESENCE_USERS).increment(1.0);
            self.queue(Op::Online(user.clone(), entry.since));
        }
    }

    /// A connection of `user` closed on this node.
    pub fn disconnected(&self, user: &UserId) {
        let Ok(mut users) = self.users.lock() else {
            return;
        };
        let Some(entry) = users.get_mut(user) else {
            return;
        };
        entry.connections -= 1;
        if entry.connections == 0 {
            users.remove(user);
            metrics::gauge!(m::PRESENCE_USERS).decrement(1.0);
            self.queue(Op::Offline(user.clone()));
        }
    }

    fn queue(&self, op: Op) {
        if let Some(tx) = &self.tx {
            // Full: dropped; the next periodic rewrite (or the TTL) corrects it.
            let _ = tx.try_send(op);
        }
    }

    fn snapshot(&self) -> Vec<(UserId, u64)> {
        self.users
            .lock()
            .map(|u| u.iter().map(|(k, v)| (k.clone(), v.since)).collect())
            .unwrap_or_default()
    }

    fn local(&self, user: &UserId) -> Option<u64> {
        self.users.lock().ok()?.get(user).map(|l| l.since)
    }

    /// Whether `user` is online anywhere in the cluster. `Err` when Redis cannot be asked.
    pub async fn lookup(&self, user: &UserId) -> Result<UserStatus, String> {
        let fields: HashMap<String, String> = match (&self.tx, self.redis.get()) {
            (None, _) => {
                let since = self.local(user);
                return Ok(UserStatus {
                    user: user.clone(),
                    online: since.is_some(),
                    since,
                    nodes: since.map(|_| vec![self.node]).unwrap_or_default(),
                });
            }
            (Some(_), None) => return Err("not connected to Redis yet".into()),
            (Some(_), Some(redis)) => {
                let mut redis = redis.clone();
                redis::cmd("HGETALL")
                    .arg(self.key(user))
                    .query_async(&mut redis)
                    .await
                    .map_err(|e| format!("reading presence from Redis: {e}"))?
            }
        };
        Ok(status(user, &fields, now_ms(), self.ttl))
    }
}

/// Reads a user's fields: fresh ones (seen within `ttl` of `now`) count.
fn status(user: &UserId, fields: &HashMap<String, String>, now: u64, ttl: Duration) -> UserStatus {
    let ttl = ttl.as_millis() as u64;
    let mut since: Option<u64> = None;
    let mut nodes = Vec::new();
    for (node, value) in fields {
        let Some((s, seen)) = value.split_once(':') else {
            continue;
        };
        let (Ok(node), Ok(s), Ok(seen)) =
            (node.parse::<u16>(), s.parse::<u64>(), seen.parse::<u64>())
        else {
            continue;
        };
        if now.saturating_sub(seen) >= ttl {
            continue;
        }
        nodes.push(node);
        since = Some(since.map_or(s, |x| x.min(s)));
    }
    nodes.sort_unstable();
    UserStatus {
        user: user.clone(),
        online: !nodes.is_empty(),
        since,
        nodes,
    }
}

/// The receiving end of the presence write queue.
pub struct Writer {
    rx: mpsc::Receiver<Op>,
}

/// Connects the presence writer's Redis client (at start-up, like the bus: a node that
/// cannot reach Redis does not start in cluster mode).
pub async fn connect(redis_url: &str) -> redis::RedisResult<ConnectionManager> {
    redis::Client::open(redis_url)?
        .get_connection_manager()
        .await
}

/// Writes presence to Redis until `shutdown`, then deletes this node's fields.
pub async fn run(
    presence: Arc<Presence>,
    writer: Writer,
    conn: ConnectionManager,
    shutdown: CancellationToken,
) {
    let mut rx = writer.rx;
    let _ = presence.redis.set(conn.clone());
    let mut conn = conn;
    let field = presence.node.to_string();
    let expire_ms = presence.ttl.as_millis() as u64;
    let mut tick = tokio::time::interval(presence.ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            op = rx.recv() => {
                let Some(op) = op else { return };
                let mut pipe = redis::pipe();
                match op {
                    Op::Online(user, since) => {
                        mark(&mut pipe, &presence.key(&user), &field, since, now_ms(), expire_ms);
                    }
                    Op::Offline(user) => {
                        pipe.hdel(presence.key(&user), &field).ignore();
                    }
                }
                if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                    tracing::debug!(error = %e, "presence: write failed; the next rewrite repairs it");
                }
            }
            _ = tick.tick() => {
                let now = now_ms();
                for chunk in presence.snapshot().chunks(CHUNK) {
                    let mut pipe = redis::pipe();
                    for (user, since) in chunk {
                        mark(&mut pipe, &presence.key(user), &field, *since, now, expire_ms);
                    }
                    if let Err(e) = pipe.query_async::<()>(&mut conn).await {
                        tracing::debug!(error = %e, "presence: rewrite failed");
                        break;
                    }
                }
            }
            () = shutdown.cancelled() => {
                // Leaving: this node's users are offline here now (they reconnect elsewhere).
                for chunk in presence.snapshot().chunks(CHUNK) {
                    let mut pipe = redis::pipe();
                    for (user, _) in chunk {
                        pipe.hdel(presence.key(user), &field).ignore();
                    }
                    let _ = pipe.query_async::<()>(&mut conn).await;
                }
                return;
            }
        }
    }
}

/// This node's field of a user's key, `since:seen`, and the key's expiry renewed.
fn mark(pipe: &mut redis::Pipeline, key: &str, field: &str, since: u64, seen: u64, expire_ms: u64) {
    pipe.hset(key, field, format!("{since}:{seen}"))
        .ignore()
        .cmd("PEXPIRE")
        .arg(key)
        .arg(expire_ms)
        .ignore();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_older_than_the_ttl_do_not_count() {
        let user = UserId::new("ana").expect("user");
        let ttl = Duration::from_secs(30);
        let fields: HashMap<String, String> = [
            ("1".to_owned(), "1000:100000".to_owned()),
            ("2".to_owned(), "500:60000".to_owned()), // seen 40 s ago: its node is gone
            ("3".to_owned(), "2000:99000".to_owned()),
            ("x".to_owned(), "garbage".to_owned()),
        ]
        .into();
        let s = status(&user, &fields, 100_000, ttl);
        assert!(s.online);
        assert_eq!(s.nodes, vec![1, 3]);
        assert_eq!(s.since, Some(1000));
        let gone = status(&user, &fields, 200_000, ttl);
        assert!(!gone.online);
        assert_eq!(gone.since, None);
    }

    #[test]
    fn standalone_counts_connections() {
        let (p, writer) = Presence::new("t", 4, Duration::from_secs(30), false);
        assert!(writer.is_none());
        let u = UserId::new("bo").expect("user");
        p.connected(&u);
        p.connected(&u);
        p.disconnected(&u);
        assert!(p.local(&u).is_some());
        p.disconnected(&u);
        assert!(p.local(&u).is_none());
    }
}
