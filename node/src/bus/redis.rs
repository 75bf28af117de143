//! Request/reply between nodes over Redis pub/sub.
//!
//! Every node subscribes to its own inbox channel, `<prefix>:inbox:<node id>`. A node that
//! receives an HTTP publish for a room owned elsewhere publishes a `send` request to the
//! owner's inbox and waits for the `reply` in its own. The owner runs the send through the
//! room like any other (ordering, dedupe, ack after the store write) and replies with the
//! id or an error code.
//!
//! Pub/sub is at-most-once: a request or reply can be lost (Redis restarting, a subscriber
//! reconnecting). The design leans on what the product already guarantees instead of
//! adding delivery machinery: a forwarded send waits at most a bounded time, then answers
//! `node_unavailable` ("retry with the same cid"), and the retry is deduplicated by the
//! owner's cid window, so a lost reply never yields two stored messages. A request published
//! to an inbox nobody subscribes to (Redis returns 0 receivers) fails at once.
//!
//! The same inbox carries the binary batches of other nodes' links (`link.rs`, `wire.rs`),
//! told apart by their first byte. One channel per node, used alone, so the names need no
//! hash tags under Redis Cluster's sharded pub/sub (`SPUBLISH`/`SSUBSCRIBE` on the same
//! names).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{metrics as m, ClientMsgId, ErrorCode, MessageId, RoomId, UserId};
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::wire::Batch;
use crate::room::Accepted;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub(crate) enum Envelope {
    /// Store and fan out this message in `room`, then reply to `from_node`.
    Send {
        req: u64,
        from_node: u16,
        room: RoomId,
        user: UserId,
        cid: ClientMsgId,
        body: String,
    },
    /// The answer to request `req`.
    Reply {
        req: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<MessageId>,
        #[serde(default)]
        duplicate: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorCode>,
    },
}

type Waiters = Mutex<HashMap<u64, oneshot::Sender<Result<Accepted, ErrorCode>>>>;

/// Longest a publish or a subscription may take before it counts as failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(2);

/// What a future of the inbox resolves with.
pub(crate) type Handled<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where what arrives on this node's inbox goes (`bridge.rs` implements it): the transport
/// never reaches into rooms or bridges itself.
pub(crate) trait Inbox: Send + Sync {
    /// A batch of another node's link.
    fn batch(&self, batch: Batch) -> Handled<'_, ()>;
    /// A send forwarded by another node for a room this node should own.
    fn send(
        &self,
        room: RoomId,
        user: UserId,
        cid: ClientMsgId,
        body: String,
    ) -> Handled<'static, Result<Accepted, ErrorCode>>;
    /// The subscription was lost: what arrived meanwhile is gone.
    fn lost(&self);
}

/// This node's end of the bus.
pub struct Bus {
    prefix: String,
    me: u16,
    publisher: ConnectionManager,
    next_req: AtomicU64,
    waiting: Waiters,
    up: AtomicBool,
    /// This process's incarnation on the links (a restarted node starts new ones).
    epoch: u64,
    stop: CancellationToken,
    /// Where what arrives goes, once the node exists: the inbox is subscribed before the
    /// node joins the ring (a peer that sees it in the ring can reach it at once); what
    /// arrives before waits in the subscription until the node is attached.
    inbox: std::sync::OnceLock<std::sync::Weak<dyn Inbox>>,
    attached: tokio::sync::Notify,
}

impl Bus {
    fn inbox(prefix: &str, node: u16) -> String {
        format!("{prefix}:inbox:{node}")
    }

    /// Connects, subscribes to this node's inbox, and serves it until `stop`.
    pub async fn start(
        redis_url: &str,
        prefix: &str,
        me: u16,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Bus>> {
        let client = redis::Client::open(redis_url)?;
        let publisher = client.get_connection_manager().await?;
        let bus = Arc::new(Bus {
            prefix: prefix.to_owned(),
            me,
            publisher,
            next_req: AtomicU64::new(1),
            waiting: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            epoch: new_epoch(),
            stop: stop.clone(),
            inbox: std::sync::OnceLock::new(),
            attached: tokio::sync::Notify::new(),
        });
        let first = subscribe(&client, &Bus::inbox(prefix, me)).await?;
        bus.set_up(true);
        let span = tracing::info_span!("bus", node = me);
        tokio::spawn(serve_inbox(bus.clone(), client, first, stop).instrument(span));
        Ok(bus)
    }

    /// Hands the bus what its inbox delivers to (see the `inbox` field).
    pub(crate) fn attach(&self, inbox: std::sync::Weak<dyn Inbox>) {
        let _ = self.inbox.set(inbox);
        self.attached.notify_one();
    }

    fn receiver(&self) -> Option<Arc<dyn Inbox>> {
        self.inbox.get().and_then(std::sync::Weak::upgrade)
    }

    /// Whether the inbox subscription is live.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Relaxed);
        metrics::gauge!(m::BUS_UP).set(if up { 1.0 } else { 0.0 });
    }

    pub(crate) fn me(&self) -> u16 {
        self.me
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    pub(crate) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub(crate) async fn publish(
        &self,
        node: u16,
        env: &Envelope,
    ) -> Result<u64, redis::RedisError> {
        let payload = serde_json::to_vec(env).unwrap_or_default();
        self.publish_raw(node, &payload).await
    }

    /// Publishes `payload` to `node`'s inbox; returns how many subscribers got it.
    pub(crate) async fn publish_raw(
        &self,
        node: u16,
        payload: &[u8],
    ) -> Result<u64, redis::RedisError> {
        let mut conn = self.publisher.clone();
        let cmd = redis::cmd("PUBLISH")
            .arg(Bus::inbox(&self.prefix, node))
            .arg(payload)
            .clone();
        // The connection manager reconnects after a failed command, so the first command
        // after a Redis restart fails on the dead socket: try once more. A repeated request
        // is harmless (the owner dedupes by cid; a second reply finds no waiter). Bounded:
        // across a partition a publish would otherwise wait for TCP to give up.
        let attempt = async {
            match cmd.query_async(&mut conn).await {
                Ok(n) => Ok(n),
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    cmd.query_async(&mut conn).await
                }
                Err(e) => Err(e),
            }
        };
        let receivers: u64 = match tokio::time::timeout(PUBLISH_TIMEOUT, attempt).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "publish timed out",
                )))
            }
        };
        metrics::counter!(m::BUS_PUBLISHED).increment(1);
        metrics::counter!(m::BUS_PUBLISHED_BYTES).increment(payload.len() as u64);
        Ok(receivers)
    }

    /// Forwards a send to the room's owner and waits for its answer, at most `wait`.
    pub async fn forward_send(
        &self,
        owner: u16,
        room: RoomId,
        user: UserId,
        cid: ClientMsgId,
        body: String,
        wait: Duration,
    ) -> Result<Accepted, ErrorCode> {
        if !self.is_up() {
            return Err(ErrorCode::NodeUnavailable);
        }
        let started = Instant::now();
        let req = self.next_req.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(req, tx);
        }
        tracing::debug!(%room, %cid, owner, "forwarding send");
        let env = Envelope::Send {
            req,
            from_node: self.me,
            room,
            user,
            cid,
            body,
        };
        // One deadline for the whole exchange: a frozen Redis must not hang the caller.
        let exchange = async {
            match self.publish(owner, &env).await {
                Err(e) => {
                    metrics::counter!(m::BUS_ERRORS, "kind" => "publish").increment(1);
                    tracing::warn!(error = %e, owner, "bus publish failed");
                    Err(ErrorCode::NodeUnavailable)
                }
                // Nobody listens on the owner's inbox: it is gone or not subscribed yet.
                Ok(0) => Err(ErrorCode::NodeUnavailable),
                Ok(_) => rx.await.unwrap_or(Err(ErrorCode::NodeUnavailable)),
            }
        };
        let outcome = match tokio::time::timeout(wait, exchange).await {
            Ok(result) => result,
            Err(_) => {
                metrics::counter!(m::BUS_ERRORS, "kind" => "timeout").increment(1);
                Err(ErrorCode::NodeUnavailable)
            }
        };
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&req);
        }
        metrics::histogram!(m::CROSS_SHARD_SECONDS).record(started.elapsed().as_secs_f64());
        outcome
    }

    fn complete(&self, req: u64, result: Result<Accepted, ErrorCode>) {
        let waiter = self.waiting.lock().ok().and_then(|mut w| w.remove(&req));
        if let Some(tx) = waiter {
            let _ = tx.send(result);
        }
    }
}

/// A nonzero number unlikely to repeat across restarts of the same node id.
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(common::id::now_ms());
    h.write_u32(std::process::id());
    h.finish() | 1
}

async fn subscribe(
    client: &redis::Client,
    channel: &str,
) -> redis::RedisResult<redis::aio::PubSubStream> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok(pubsub.into_on_message())
    };
    match tokio::time::timeout(PUBLISH_TIMEOUT, attempt).await {
        Ok(r) => r,
        Err(_) => Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "subscribe timed out",
        ))),
    }
}

async fn serve_inbox(
    bus: Arc<Bus>,
    client: redis::Client,
    mut stream: redis::aio::PubSubStream,
    stop: CancellationToken,
) {
    let channel = Bus::inbox(&bus.prefix, bus.me);
    let mut backoff = Duration::from_millis(100);
    while bus.inbox.get().is_none() {
        tokio::select! {
            _ = stop.cancelled() => return,
            () = bus.attached.notified() => {}
        }
    }
    loop {
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                msg = stream.next() => msg,
            };
            let Some(msg) = msg else { break };
            metrics::counter!(m::BUS_RECEIVED).increment(1);
            let payload = msg.get_payload_bytes();
            if payload.first() == Some(&super::wire::MAGIC) {
                let Some(inbox) = bus.receiver() else {
                    continue;
                };
                match super::wire::decode(bytes::Bytes::copy_from_slice(payload)) {
                    Ok(batch) => inbox.batch(batch).await,
                    Err(e) => {
                        metrics::counter!(m::BUS_ERRORS, "kind" => "decode").increment(1);
                        tracing::warn!(error = %e, "undecodable link batch");
                    }
                }
                continue;
            }
            match serde_json::from_slice::<Envelope>(payload) {
                Ok(Envelope::Reply {
                    req,
                    id,
                    duplicate,
                    error,
                }) => {
                    let result = match (id, error) {
                        (Some(id), None) => Ok(Accepted { id, duplicate }),
                        (_, Some(code)) => Err(code),
                        (None, None) => Err(ErrorCode::Internal),
                    };
                    bus.complete(req, result);
                }
                Ok(Envelope::Send {
                    req,
                    from_node,
                    room,
                    user,
                    cid,
                    body,
                }) => {
                    let Some(inbox) = bus.receiver() else {
                        continue;
                    };
                    let bus = bus.clone();
                    let span = tracing::info_span!("forwarded", %room, from = from_node);
                    tracing::debug!(parent: &span, %cid, "forwarded send received");
                    let forwarded = inbox.send(room, user, cid, body);
                    tokio::spawn(async move {
                        let result = forwarded.await;
                        let reply = match result {
                            Ok(a) => Envelope::Reply {
                                req,
                                id: Some(a.id),
                                duplicate: a.duplicate,
                                error: None,
                            },
                            Err(code) => Envelope::Reply {
                                req,
                                id: None,
                                duplicate: false,
                                error: Some(code),
                            },
                        };
                        if let Err(e) = bus.publish(from_node, &reply).await {
                            metrics::counter!(m::BUS_ERRORS, "kind" => "publish").increment(1);
                            tracing::warn!(error = %e, "bus reply failed; the sender will time out and retry");
                        }
                    }.instrument(span));
                }
                Err(e) => {
                    metrics::counter!(m::BUS_ERRORS, "kind" => "decode").increment(1);
                    tracing::warn!(error = %e, "undecodable bus message");
                }
            }
        }
        // The subscription ended: Redis went away. Bridged connections may have missed
        // frames: close them so their clients resume with `since`. Resubscribe with backoff.
        bus.set_up(false);
        if let Some(inbox) = bus.receiver() {
            inbox.lost();
        }
        tracing::warn!("bus subscription lost; reconnecting");
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match subscribe(&client, &channel).await {
                Ok(s) => {
                    stream = s;
                    bus.set_up(true);
                    metrics::counter!(m::BUS_RECONNECTS).increment(1);
                    tracing::info!("bus subscription restored");
                    backoff = Duration::from_millis(100);
                    break;
                }
                Err(_) => backoff = (backoff * 2).min(Duration::from_secs(5)),
            }
        }
    }
}
