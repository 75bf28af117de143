//! Webhooks: every stored message of the rooms they apply to, POSTed to the app's endpoint,
//! at least once, in id order per room, after it is durable, signed.
//!
//! The store is the queue. A room's owner delivers what the store holds after the room's
//! cursor (`hook_cursors` in the store), page by page, and moves the cursor on (saved at
//! most once a second while deliveries succeed; the pages come from what the room's writes
//! just stored when they follow on, from the store otherwise); a message
//! whose attempts or age run out goes to the dead-letter table and the cursor passes it. A
//! room has a cursor row from its first write after it was last caught up until a quiet
//! spell after it caught up again: written alongside that write (an ack waits for both), so
//! a node that dies with deliveries pending leaves a row, and the next owner — woken by the
//! sweep of rooms with rows ([`sweep`]) — resumes from it. What the old owner delivered after
//! its last cursor write comes again: receivers dedupe by message id.
//!
//! This module does the I/O of delivering and owns its bounds: node-wide attempts in flight
//! (`--webhook-concurrency`), a timeout per attempt, one page in memory per room. It never
//! holds up a room: a room's writes wait only for the cursor row when it is missing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::id::now_ms;
use common::{metrics as m, ChatMessage, MessageId, RoomId, UserId};
use hmac::{Hmac, Mac};
use http::{header, Request};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{watch, Mutex, Notify, Semaphore};

use crate::config::{Config, Endpoint};
use crate::ownership::Grant;
use crate::store::{DeadLetter, HistoryQuery, HookCursor, MessageStore, PageFrom, StoreError};

/// The header carrying `sha256=<hex HMAC-SHA256 of the body with the shared secret>`.
pub const SIGNATURE_HEADER: &str = "x-chat-signature";
/// Messages read from the store per delivery page.
const PAGE: usize = 100;
/// A caught-up room keeps its cursor row this long before clearing it, so a busy room does
/// not write and delete its row for every message.
const CLEAR_AFTER: Duration = Duration::from_secs(5);
/// Wait after a failed store call before trying again.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// Messages a room keeps in memory for its delivery, handed over by its writes; past this
/// (the endpoint is slow or failing) the delivery reads them back from the store.
const BUFFERED_MAX: usize = 1000;
/// A room saves its cursor at most this often while its deliveries succeed (a crash
/// redelivers at most this much); every failed attempt saves at once.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// The body of a delivery.
#[derive(Serialize)]
struct Payload<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    message: &'a ChatMessage,
    /// Users connected to the room when the delivery was made (first ones by name, at most
    /// `room::PRESENCE_LIST_MAX`), so the app can notify the others.
    online: &'a [UserId],
    attempt: u32,
}

/// Why an attempt failed, for the retry metric's `kind`.
#[derive(Debug)]
pub struct Failed {
    kind: &'static str,
    pub message: String,
}

/// The node's webhook client and policy.
pub struct Webhooks {
    endpoint: Endpoint,
    secret: Vec<u8>,
    prefixes: Vec<String>,
    client: Client<HttpConnector, Full<Bytes>>,
    slots: Semaphore,
    timeout: Duration,
    max_attempts: u32,
    max_age: Duration,
    backoff: Duration,
    backoff_max: Duration,
    pub sweep: Duration,
}

impl Webhooks {
    /// `None` when no `--webhook-url` is set (validated before this is called).
    pub fn from_config(cfg: &Config) -> Option<Arc<Webhooks>> {
        let endpoint = Endpoint::parse(cfg.webhook_url.as_deref()?)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(cfg.webhook_timeout));
        connector.set_nodelay(true);
        Some(Arc::new(Webhooks {
            endpoint,
            secret: cfg.webhook_secret.clone().unwrap_or_default().into_bytes(),
            prefixes: cfg
                .webhook_rooms
                .iter()
                .map(|p| p.trim().to_owned())
                .filter(|p| !p.is_empty())
                .collect(),
            client: Client::builder(TokioExecutor::new()).build(connector),
            slots: Semaphore::new(cfg.webhook_concurrency.max(1)),
            timeout: cfg.webhook_timeout,
            max_attempts: cfg.webhook_max_attempts.max(1),
            max_age: cfg.webhook_max_age,
            backoff: cfg.webhook_backoff,
            backoff_max: cfg.webhook_backoff_max,
            sweep: cfg.webhook_sweep,
        }))
    }

    pub fn applies_to(&self, room: &RoomId) -> bool {
        self.prefixes.is_empty() || self.prefixes.iter().any(|p| room.as_str().starts_with(p))
    }

    /// `sha256=<hex>` of `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        sign(&self.secret, body)
    }

    /// One attempt: a 2xx answer within the timeout is success.
    pub async fn attempt(
        &self,
        msg: &ChatMessage,
        online: &[UserId],
        attempt: u32,
    ) -> Result<(), Failed> {
        let body = serde_json::to_vec(&Payload {
            kind: "message",
            message: msg,
            online,
            attempt,
        })
        .map_err(|e| Failed {
            kind: "connect",
            message: format!("encoding the delivery: {e}"),
        })?;
        let signature = self.sign(&body);
        let req = Request::post(self.endpoint.uri.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature)
            .header("idempotency-key", msg.id.to_string())
            .header("x-chat-room", msg.room.as_str())
            .header("x-chat-attempt", attempt.to_string())
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| Failed {
                kind: "connect",
                message: format!("building the request: {e}"),
            })?;
        let _slot = self.slots.acquire().await.map_err(|_| Failed {
            kind: "connect",
            message: "shutting down".into(),
        })?;
        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Err(_) => Err(Failed {
                kind: "timeout",
                message: format!("no answer within {:?}", self.timeout),
            }),
            Ok(Err(e)) => Err(Failed {
                kind: "connect",
                message: format!("{e:#}"),
            }),
            Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
            Ok(Ok(resp)) => Err(Failed {
                kind: "status",
                message: format!("HTTP {}", resp.status().as_u16()),
            }),
        }
    }

    /// The wait after the `attempts`-th failure: doubling from `--webhook-backoff`, at most
    /// `--webhook-backoff-max`, and a random half of it taken off so retries spread.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doubled = self
            .backoff
            .saturating_mul(1u32 << attempts.saturating_sub(1).min(20));
        let full = doubled.min(self.backoff_max);
        full.mul_f64(0.5 + fastrand::f64() * 0.5)
    }

    /// Whether a message that failed `attempts` times goes to the dead-letter table.
    fn gives_up(&self, msg: &ChatMessage, attempts: u32) -> bool {
        let age = Duration::from_millis(now_ms().saturating_sub(msg.ts));
        attempts >= self.max_attempts || age >= self.max_age
    }
}

/// `sha256=<hex HMAC-SHA256 of body with secret>`, the value of [`SIGNATURE_HEADER`].
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length: this cannot fail.
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + digest.len() * 2);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Stored messages the delivery has not reached, as the room's writes handed them over:
/// every stored message of the room above `base` is in `buf`, in id order.
#[derive(Default)]
struct Queue {
    base: Option<MessageId>,
    buf: std::collections::VecDeque<ChatMessage>,
    /// A write stored a message at or below the durable head (a failed write retried after
    /// later ones were stored, maybe after they were delivered): the delivery goes back to
    /// just before it, and delivers what follows again rather than miss it.
    rewind: Option<MessageId>,
}

/// What a room's writes and its delivery task share.
struct Shared {
    room: RoomId,
    queue: std::sync::Mutex<Queue>,
    /// Whether the store has the room's cursor row; held across a write that needs it, so
    /// the row is never cleared while such a write is on its way.
    row: Mutex<bool>,
    /// The room's newest message the store has confirmed.
    durable: watch::Sender<MessageId>,
    delivered: AtomicU64,
    /// Caught up and the row cleared: the room may go idle.
    idle: AtomicBool,
    idle_changed: Notify,
}

/// A room's webhook delivery: held by its driver, stopped when dropped.
pub(crate) struct RoomHook {
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for RoomHook {
    fn drop(&mut self) {
        self.task.abort();
        if !self.shared.idle.load(Ordering::Relaxed) {
            metrics::gauge!(m::WEBHOOK_ROOMS_BEHIND).decrement(1.0);
        }
    }
}

/// Where a room's delivery starts: its stored cursor, or (none stored: nothing pending)
/// its head.
pub(crate) fn start_at(cursor: Option<&HookCursor>, head: MessageId) -> (MessageId, bool) {
    match cursor {
        Some(c) => (c.delivered, true),
        None => (head, false),
    }
}

impl RoomHook {
    /// Starts delivering `room` from `cursor` (read from the store when the room loaded).
    pub(crate) fn start(
        hooks: Arc<Webhooks>,
        store: Arc<dyn MessageStore>,
        room: RoomId,
        grant: Grant,
        cursor: Option<HookCursor>,
        head: MessageId,
        online_now: Online,
    ) -> RoomHook {
        let (delivered, marked) = start_at(cursor.as_ref(), head);
        let idle = delivered >= head && !marked;
        if !idle {
            metrics::gauge!(m::WEBHOOK_ROOMS_BEHIND).increment(1.0);
        }
        let shared = Arc::new(Shared {
            room,
            queue: std::sync::Mutex::new(Queue::default()),
            row: Mutex::new(marked),
            durable: watch::Sender::new(head),
            delivered: AtomicU64::new(delivered.0),
            idle: AtomicBool::new(idle),
            idle_changed: Notify::new(),
        });
        let attempts = cursor.map_or(0, |c| c.attempts);
        let task = tokio::spawn(deliver(
            shared.clone(),
            hooks,
            store,
            grant,
            attempts,
            online_now,
        ));
        RoomHook { shared, task }
    }

    /// Runs a store write of `batch` (`append`); when the store has no cursor row for the
    /// room, writes one alongside, and the write counts as done only if both are. What is
    /// stored is handed to the delivery.
    pub(crate) async fn persist(
        &self,
        store: &dyn MessageStore,
        append: impl std::future::Future<Output = Result<(), StoreError>>,
        batch: &[ChatMessage],
    ) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return append.await;
        };
        let s = &self.shared;
        let mut marked = s.row.lock().await;
        let (appended, mut mark) = if *marked {
            (append.await, Ok(()))
        } else {
            let cursor = HookCursor {
                delivered: MessageId(s.delivered.load(Ordering::Relaxed)),
                attempts: 0,
                last_error: String::new(),
            };
            tokio::join!(append, store.set_hook_cursor(&s.room, cursor))
        };
        if mark.is_ok() {
            *marked = true;
        }
        // What was appended is delivered even if the row was not written: the store has it.
        if appended.is_ok() {
            // One write is in flight per room and the row lock is held: nothing else moves
            // the durable head meanwhile.
            let prev = *s.durable.borrow();
            if first.id <= prev {
                let to = MessageId(first.id.0.saturating_sub(1));
                if let Ok(mut q) = s.queue.lock() {
                    q.rewind = Some(q.rewind.map_or(to, |r| r.min(to)));
                    q.buf.clear();
                    q.base = None;
                }
                // The rewind must outlive this node before the ack: the cursor goes back too.
                let cursor = HookCursor {
                    delivered: to.min(MessageId(s.delivered.load(Ordering::Relaxed))),
                    attempts: 0,
                    last_error: String::new(),
                };
                mark = store.set_hook_cursor(&s.room, cursor).await;
                s.durable.send_modify(|d| {
                    bump(d, last.id);
                });
            } else {
                if let Ok(mut q) = s.queue.lock() {
                    if q.buf.is_empty() {
                        q.base = Some(prev);
                    }
                    if q.base.is_some() && q.buf.len() + batch.len() <= BUFFERED_MAX {
                        q.buf.extend(batch.iter().cloned());
                    } else {
                        q.buf.clear();
                        q.base = None;
                    }
                }
                s.durable.send_if_modified(|d| bump(d, last.id));
            }
        }
        let result = appended.and(mark);
        if s.idle.swap(false, Ordering::Relaxed) {
            metrics::gauge!(m::WEBHOOK_ROOMS_BEHIND).increment(1.0);
            s.idle_changed.notify_one();
        }
        result
    }

    /// Caught up, nothing pending in the store: the room may go idle.
    pub(crate) fn is_idle(&self) -> bool {
        self.shared.idle.load(Ordering::Relaxed)
    }

    /// Resolves when [`RoomHook::is_idle`] may have changed.
    pub(crate) async fn idle_changed(&self) {
        self.shared.idle_changed.notified().await
    }
}

fn bump(durable: &mut MessageId, last: MessageId) -> bool {
    if last > *durable {
        *durable = last;
        true
    } else {
        false
    }
}

/// A room's delivery loop: runs until its room drops the [`RoomHook`].
async fn deliver(
    s: Arc<Shared>,
    hooks: Arc<Webhooks>,
    store: Arc<dyn MessageStore>,
    grant: Grant,
    mut attempts: u32,
    online_now: Online,
) {
    let mut durable_rx = s.durable.subscribe();
    let mut last_saved = tokio::time::Instant::now();
    loop {
        if let Some(to) = s.queue.lock().ok().and_then(|mut q| q.rewind.take()) {
            s.delivered.fetch_min(to.0, Ordering::Relaxed);
        }
        let delivered = MessageId(s.delivered.load(Ordering::Relaxed));
        let durable = *durable_rx.borrow_and_update();
        if durable <= delivered {
            caught_up(&s, store.as_ref(), &mut durable_rx).await;
            continue;
        }
        let page = match buffered(&s, delivered) {
            Some(page) => page,
            None => match store
                .read(
                    &s.room,
                    HistoryQuery {
                        after: Some(delivered),
                        before: Some(MessageId(durable.0.saturating_add(1))),
                        limit: PAGE,
                        from: PageFrom::Oldest,
                    },
                )
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(room = %s.room, error = %e, "webhook: reading the messages to deliver failed");
                    tokio::time::sleep(STORE_RETRY).await;
                    continue;
                }
            },
        };
        if page.is_empty() {
            // Nothing stored up to the head (expired by the TTL, or fenced away): past it.
            s.delivered.store(durable.0, Ordering::Relaxed);
            continue;
        }
        let mut online = (online_now)().await;
        metrics::gauge!(m::WEBHOOK_QUEUE).increment(page.len() as f64);
        let mut left = page.len();
        for msg in &page {
            let rewinding = s.queue.lock().is_ok_and(|q| q.rewind.is_some());
            if rewinding {
                break;
            }
            let to = Target {
                hooks: &hooks,
                store: store.as_ref(),
                grant: &grant,
                online_now: &online_now,
            };
            if !deliver_one(&s, &to, msg, &mut online, &mut attempts).await {
                metrics::gauge!(m::WEBHOOK_QUEUE).decrement(left as f64);
                return;
            }
            left -= 1;
            metrics::gauge!(m::WEBHOOK_QUEUE).decrement(1.0);
            s.delivered.store(msg.id.0, Ordering::Relaxed);
        }
        metrics::gauge!(m::WEBHOOK_QUEUE).decrement(left as f64);
        if last_saved.elapsed() >= SAVE_EVERY {
            let delivered = MessageId(s.delivered.load(Ordering::Relaxed));
            save_cursor(&s, store.as_ref(), delivered, 0, "").await;
            last_saved = tokio::time::Instant::now();
        }
    }
}

/// The next page from what the room's writes handed over, when it follows `delivered`
/// exactly; `None` when the store must be read.
fn buffered(s: &Shared, delivered: MessageId) -> Option<Vec<ChatMessage>> {
    let mut q = s.queue.lock().ok()?;
    let base = q.base?;
    if base < delivered {
        // The store was read past the buffer's start: drop what was delivered from it.
        while q.buf.front().is_some_and(|m| m.id <= delivered) {
            q.buf.pop_front();
        }
        q.base = Some(delivered);
    } else if base > delivered {
        return None;
    }
    let n = q.buf.len().min(PAGE);
    let page: Vec<ChatMessage> = q.buf.drain(..n).collect();
    if let Some(last) = page.last() {
        q.base = Some(last.id);
    }
    (!page.is_empty()).then_some(page)
}

/// What one delivery needs besides the room's shared state.
#[derive(Clone, Copy)]
struct Target<'a> {
    hooks: &'a Webhooks,
    store: &'a dyn MessageStore,
    grant: &'a Grant,
    online_now: &'a Online,
}

/// Delivers one message, retrying until the endpoint takes it or it is dead-lettered.
/// False when the room's grant lapsed (the next owner delivers from the stored cursor).
async fn deliver_one(
    s: &Shared,
    to: &Target<'_>,
    msg: &ChatMessage,
    online: &mut Vec<UserId>,
    attempts: &mut u32,
) -> bool {
    let Target {
        hooks,
        store,
        grant,
        online_now,
    } = *to;
    let mut retrying = false;
    loop {
        if !grant.is_valid() {
            return false;
        }
        // A retry says who is online at its own time.
        if retrying {
            *online = (online_now)().await;
        }
        retrying = true;
        *attempts += 1;
        let failed = match hooks.attempt(msg, online, *attempts).await {
            Ok(()) => {
                metrics::counter!(m::WEBHOOK_DELIVERED).increment(1);
                let age = now_ms().saturating_sub(msg.ts) as f64 / 1000.0;
                metrics::histogram!(m::WEBHOOK_DELIVERY_SECONDS).record(age);
                *attempts = 0;
                return true;
            }
            Err(failed) => failed,
        };
        if hooks.gives_up(msg, *attempts) {
            let dead = DeadLetter {
                message: msg.clone(),
                attempts: *attempts,
                last_error: failed.message.clone(),
                dead_at: now_ms(),
            };
            while let Err(e) = store.put_dead_letter(&dead).await {
                tracing::warn!(room = %s.room, error = %e, "webhook: writing a dead letter failed");
                tokio::time::sleep(STORE_RETRY).await;
                if !grant.is_valid() {
                    return false;
                }
            }
            metrics::counter!(m::WEBHOOK_DEAD_LETTERED).increment(1);
            tracing::warn!(room = %s.room, id = %msg.id, attempts = *attempts, error = %failed.message, "webhook: delivery given up; moved to the dead-letter table");
            *attempts = 0;
            return true;
        }
        metrics::counter!(m::WEBHOOK_RETRIES, "kind" => failed.kind).increment(1);
        tracing::info!(room = %s.room, id = %msg.id, attempt = *attempts, error = %failed.message, "webhook: attempt failed; retrying");
        // The attempt count outlives this node: the next owner goes on counting.
        let before = MessageId(msg.id.0.saturating_sub(1))
            .max(MessageId(s.delivered.load(Ordering::Relaxed)));
        save_cursor(s, store, before, *attempts, &failed.message).await;
        tokio::time::sleep(hooks.backoff(*attempts)).await;
    }
}

/// Records the cursor (the row stays: deliveries may follow).
async fn save_cursor(
    s: &Shared,
    store: &dyn MessageStore,
    delivered: MessageId,
    attempts: u32,
    error: &str,
) {
    let mut marked = s.row.lock().await;
    // A write went back below what this task has delivered, and saved that cursor itself.
    if s.queue.lock().is_ok_and(|q| q.rewind.is_some()) {
        return;
    }
    let cursor = HookCursor {
        delivered,
        attempts,
        last_error: error.to_owned(),
    };
    match store.set_hook_cursor(&s.room, cursor).await {
        Ok(()) => *marked = true,
        // Not fatal: the next write (or a restart) redelivers from the older cursor.
        Err(e) => tracing::warn!(room = %s.room, error = %e, "webhook: saving the cursor failed"),
    }
}

/// Caught up with the store: after a quiet spell the room's row is cleared and the room may
/// go idle; returns when there is something new to deliver.
async fn caught_up(
    s: &Shared,
    store: &dyn MessageStore,
    durable_rx: &mut watch::Receiver<MessageId>,
) {
    let quiet = tokio::time::timeout(CLEAR_AFTER, durable_rx.changed())
        .await
        .is_err();
    if !quiet {
        return;
    }
    {
        let mut marked = s.row.lock().await;
        let delivered = MessageId(s.delivered.load(Ordering::Relaxed));
        let rewinding = s.queue.lock().is_ok_and(|q| q.rewind.is_some());
        if rewinding || *durable_rx.borrow() > delivered {
            return;
        }
        if *marked {
            match store.clear_hook_cursor(&s.room).await {
                Ok(()) => *marked = false,
                Err(e) => {
                    tracing::warn!(room = %s.room, error = %e, "webhook: clearing the cursor failed");
                    return;
                }
            }
        }
        if !s.idle.swap(true, Ordering::Relaxed) {
            metrics::gauge!(m::WEBHOOK_ROOMS_BEHIND).decrement(1.0);
            s.idle_changed.notify_one();
        }
    }
    let _ = durable_rx.changed().await;
}

/// Asks the room who is connected now, for a delivery's `online` (the room supplies it,
/// so deliveries never reach into the room).
pub(crate) type Online = Arc<
    dyn Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<UserId>> + Send>>
        + Send
        + Sync,
>;

/// Every `--webhook-sweep`, wakes the rooms this node owns that have a cursor row and are
/// not running here, so deliveries a crashed or departed owner left resume.
pub async fn sweep(
    hooks: Arc<Webhooks>,
    store: Arc<dyn MessageStore>,
    wake: impl Fn(RoomId) + Send + 'static,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(hooks.sweep);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        match store.hook_rooms(10_000).await {
            Ok(rooms) => {
                for room in rooms.into_iter().filter(|r| hooks.applies_to(r)) {
                    wake(room);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "webhook: listing rooms with pending deliveries failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn endpoints_are_plain_http_with_a_host() {
        assert!(Endpoint::parse("http://127.0.0.1:8080/hook").is_some());
        assert!(Endpoint::parse("http://bots.internal/chat").is_some());
        assert!(Endpoint::parse("https://bots.example.com/").is_none());
        assert!(Endpoint::parse("/relative").is_none());
        assert!(Endpoint::parse("not a url").is_none());
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_max() {
        let mut cfg = Config::for_tests();
        cfg.webhook_url = Some("http://127.0.0.1:9/h".into());
        cfg.webhook_secret = Some("0123456789abcdef".into());
        cfg.webhook_backoff = Duration::from_millis(100);
        cfg.webhook_backoff_max = Duration::from_millis(1000);
        let hooks = Webhooks::from_config(&cfg).expect("configured");
        for _ in 0..100 {
            let b1 = hooks.backoff(1);
            assert!(b1 >= Duration::from_millis(50) && b1 <= Duration::from_millis(100));
            let b3 = hooks.backoff(3);
            assert!(b3 >= Duration::from_millis(200) && b3 <= Duration::from_millis(400));
            let b9 = hooks.backoff(9);
            assert!(b9 >= Duration::from_millis(500) && b9 <= Duration::from_millis(1000));
            assert!(hooks.backoff(40) <= Duration::from_millis(1000));
        }
    }

    #[test]
    fn a_room_without_a_cursor_starts_at_its_head() {
        let c = HookCursor {
            delivered: MessageId(7),
            attempts: 2,
            last_error: "HTTP 500".into(),
        };
        assert_eq!(start_at(Some(&c), MessageId(9)), (MessageId(7), true));
        assert_eq!(start_at(None, MessageId(9)), (MessageId(9), false));
    }
}
