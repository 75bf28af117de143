//! A link: this node's one ordered, numbered stream to one peer node, over the peer's inbox.
//!
//! Everything bridged from this node to a peer goes through its link: room broadcasts for
//! the peer's members (once per frame, however many members the peer has in the room),
//! frames for one of its connections, and this node's own requests for rooms the peer
//! owns. Rooms and connections only queue [`Item`]s, never waiting; one writer task per
//! link takes whatever is queued, encodes it into one batch (`wire.rs`) and publishes it,
//! so a busy link sends several items per publish and a quiet one sends each at once.
//!
//! Pub/sub may lose a batch, and a full queue loses an item. Either way the link is
//! *broken*: it refuses items until the writer has forgotten everything bridged with the
//! peer (`Bridges::reset_peer`: its members here are dropped, this node's connections
//! bridged to its rooms are closed with 4002); then it tells the peer to do the same with a
//! `Reset`, which leads every batch until the peer has heard one. The peer notices a lost
//! batch on its own, by the numbering. Nothing is retried item by item: the clients resume
//! with `since` and resend with the same `cid`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use common::metrics as m;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::wire::{self, Item};

/// Items a link holds before it counts as broken.
const QUEUE: usize = 8192;
/// Items per batch, at most.
const BATCH_ITEMS: usize = 1024;
/// A batch stops growing once its payload passes this.
const BATCH_BYTES: usize = 512 * 1024;
/// Batches remembered for [`Link::covered_by`].
const SENT_KEPT: usize = 4096;
/// An idle link sends an empty batch this often, so a lost batch is noticed by its
/// number within this time even when nothing else follows it.
const HEARTBEAT: Duration = Duration::from_secs(5);

/// What a publish resolves with: how many subscribers heard it.
pub(crate) type Published<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<u64, redis::RedisError>> + Send + 'a>,
>;

/// What a link's writer needs of the node above it: its identity on the bus, a way to
/// publish to a peer's inbox, and what to do when the link broke (`Bridges` implements it,
/// so a link never reaches into the bridges or the transport itself).
pub(crate) trait Carrier: Send + Sync {
    fn me(&self) -> u16;
    /// This process's incarnation on the links.
    fn epoch(&self) -> u64;
    fn publish<'a>(&'a self, peer: u16, payload: &'a [u8]) -> Published<'a>;
    /// Forgets everything bridged with `peer` after the link to it broke, and returns the
    /// `Reset` to tell it.
    fn reset(&self, peer: u16, reason: &'static str) -> Item;
}

pub(crate) struct Link {
    peer: u16,
    tx: mpsc::Sender<Item>,
    /// Items queued so far; queueing holds the lock so the count follows queue order.
    pushed: Mutex<u64>,
    /// The last item (by that count) in each recent batch, by batch number.
    sent: Mutex<VecDeque<(u64, u64)>>,
    broken: AtomicBool,
    /// Why it broke, for the reset counter.
    reason: Mutex<&'static str>,
    wake: Notify,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("peer", &self.peer).finish()
    }
}

impl Link {
    /// A link to `peer` and its writer task.
    pub(crate) fn start(
        peer: u16,
        carrier: Weak<dyn Carrier>,
        stop: CancellationToken,
    ) -> Arc<Link> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let link = Arc::new(Link {
            peer,
            tx,
            pushed: Mutex::new(0),
            sent: Mutex::new(VecDeque::new()),
            broken: AtomicBool::new(false),
            reason: Mutex::new(""),
            wake: Notify::new(),
        });
        let node = carrier.upgrade().map(|c| c.me());
        let span = tracing::info_span!(parent: None, "link", node, peer);
        tokio::spawn(write(link.clone(), rx, carrier, stop).instrument(span));
        link
    }

    pub(crate) fn peer(&self) -> u16 {
        self.peer
    }

    /// Queues an item without waiting; false when it was not queued (the link is broken,
    /// or breaks now because its queue is full).
    pub(crate) fn push(&self, item: Item) -> bool {
        self.push_counted(item).is_some()
    }

    /// [`Link::push`], returning the item's place in the link's order (see
    /// [`Link::covered_by`]).
    pub(crate) fn push_counted(&self, item: Item) -> Option<u64> {
        if self.broken.load(Ordering::Acquire) {
            return None;
        }
        let Ok(mut pushed) = self.pushed.lock() else {
            return None;
        };
        match self.tx.try_send(item) {
            Ok(()) => {
                *pushed += 1;
                Some(*pushed)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                drop(pushed);
                self.break_link("overflow");
                None
            }
            Err(mpsc::error::TrySendError::Closed(_)) => None,
        }
    }

    /// The last item (by [`Link::push_counted`]'s count) that batches up to `seq` carried;
    /// `None` when that is not known any more (treat every item as covered).
    pub(crate) fn covered_by(&self, seq: u64) -> Option<u64> {
        let sent = self.sent.lock().ok()?;
        let oldest = sent.front()?;
        if seq < oldest.0 {
            return None;
        }
        let i = sent.partition_point(|(s, _)| *s <= seq);
        sent.get(i.checked_sub(1)?).map(|(_, last)| *last)
    }

    fn record(&self, seq: u64, last: u64) {
        if let Ok(mut sent) = self.sent.lock() {
            if sent.len() >= SENT_KEPT {
                sent.pop_front();
            }
            sent.push_back((seq, last));
        }
    }

    /// Queues an item, waiting for room: only for a replay, which may wait on one client.
    pub(crate) async fn push_wait(&self, item: Item) -> bool {
        if self.broken.load(Ordering::Acquire) {
            return false;
        }
        let Ok(permit) = self.tx.reserve().await else {
            return false;
        };
        let Ok(mut pushed) = self.pushed.lock() else {
            return false;
        };
        permit.send(item);
        *pushed += 1;
        true
    }

    /// How full the queue is, 0.0 to 1.0.
    pub(crate) fn fill_ratio(&self) -> f64 {
        1.0 - self.tx.capacity() as f64 / QUEUE as f64
    }

    /// Items waiting to be published.
    pub(crate) fn queued(&self) -> usize {
        QUEUE - self.tx.capacity()
    }

    fn break_link(&self, reason: &'static str) {
        if !self.broken.swap(true, Ordering::AcqRel) {
            if let Ok(mut r) = self.reason.lock() {
                *r = reason;
            }
            self.wake.notify_one();
        }
    }
}

async fn write(
    link: Arc<Link>,
    mut rx: mpsc::Receiver<Item>,
    carrier: Weak<dyn Carrier>,
    stop: CancellationToken,
) {
    let mut seq = 0u64;
    // Items taken off the queue so far (the same count as `Link::pushed`).
    let mut taken = 0u64;
    let mut buf = Vec::with_capacity(64 * 1024);
    // The peer has not heard our last reset yet: every batch starts with it until it has
    // (a batch that starts with a reset is taken whatever its number, see `on_batch`).
    let mut reset_pending: Option<Item> = None;
    // One timer for the heartbeat, pushed back after every batch (not one per wake-up).
    let heartbeat = tokio::time::sleep(HEARTBEAT);
    tokio::pin!(heartbeat);
    loop {
        if link.broken.load(Ordering::Acquire) {
            // Whatever is queued follows the loss: the reset covers it.
            while rx.try_recv().is_ok() {
                taken += 1;
            }
            let Some(bus) = carrier.upgrade() else {
                return;
            };
            let reason = link.reason.lock().map(|r| *r).unwrap_or("");
            let reset = bus.reset(link.peer, reason);
            link.broken.store(false, Ordering::Release);
            // Tell the peer now, retrying while Redis cannot be reached, with the same
            // number each time so a reset that arrived but timed out is not taken twice.
            // If nobody hears it (0 receivers: the peer is down or resubscribing), the
            // next batch carries it.
            seq += 1;
            let mut backoff = Duration::from_millis(50);
            loop {
                wire::start(&mut buf, bus.me(), bus.epoch(), seq);
                wire::put_item(&mut buf, &reset);
                wire::finish(&mut buf, 1);
                match bus.publish(link.peer, &buf).await {
                    Ok(heard) => {
                        reset_pending = (heard == 0).then_some(reset);
                        break;
                    }
                    Err(_) if !rx.is_empty() => {
                        reset_pending = Some(reset);
                        break;
                    }
                    Err(_) => {}
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            link.record(seq, taken);
            continue;
        }
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = link.wake.notified() => continue,
            item = rx.recv() => match item { Some(i) => Some(i), None => return },
            () = &mut heartbeat => None,
        };
        heartbeat
            .as_mut()
            .reset(tokio::time::Instant::now() + HEARTBEAT);
        let Some(bus) = carrier.upgrade() else { return };
        seq += 1;
        wire::start(&mut buf, bus.me(), bus.epoch(), seq);
        let mut n = 0u32;
        if let Some(reset) = &reset_pending {
            wire::put_item(&mut buf, reset);
            n += 1;
        }
        if let Some(first) = first {
            wire::put_item(&mut buf, &first);
            taken += 1;
            n += 1;
            while (n as usize) < BATCH_ITEMS && buf.len() < BATCH_BYTES {
                match rx.try_recv() {
                    Ok(item) => {
                        wire::put_item(&mut buf, &item);
                        taken += 1;
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            metrics::histogram!(m::BUS_BATCH_ITEMS).record(f64::from(n));
        }
        wire::finish(&mut buf, n);
        link.record(seq, taken);
        match bus.publish(link.peer, &buf).await {
            Ok(heard) if heard > 0 => reset_pending = None,
            // A heartbeat nobody hears loses nothing; the peer is down or resubscribing.
            Ok(_) if n == 0 => {}
            Ok(_) => link.break_link("unheard"),
            Err(e) => {
                metrics::counter!(m::BUS_ERRORS, "kind" => "publish").increment(1);
                tracing::warn!(error = %e, peer = link.peer, "link publish failed; resetting what is bridged with the peer");
                link.break_link("publish");
            }
        }
        // Shrink a buffer a replay page blew up, so an idle link holds little.
        if buf.capacity() > 4 * BATCH_BYTES {
            buf = Vec::with_capacity(64 * 1024);
        }
    }
}
