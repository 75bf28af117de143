//! A node's lease on its membership: the span of time in which it may act as an owner.
//!
//! The lease is held locally and measured on the monotonic clock: each confirmed renewal
//! of the membership key extends it to the instant the renewal was *sent* plus the TTL,
//! minus a safety margin, so it always ends before the key can expire in Redis (the key's
//! TTL starts when Redis applies the write, which is later). Nothing but a confirmed
//! renewal extends it, so a process that was paused, or cut off from Redis, finds its lease
//! over the moment it runs again, before it touches anything it queued meanwhile.
//!
//! Each registration period has its own *incarnation*: once a lease has lapsed it never
//! becomes valid again under the same incarnation; the node must quiesce and register
//! anew. Checks are two atomic loads and a clock read, cheap enough for every send.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// A shared view of one node's lease. Clones see the same lease.
#[derive(Clone, Debug)]
pub struct Lease(Arc<State>);

#[derive(Debug)]
struct State {
    /// Reference point for `until_ns`.
    base: Instant,
    /// The lease is valid while `now < base + until_ns`; 0 means no lease.
    until_ns: AtomicU64,
    /// The current registration period; 0 until the first registration.
    incarnation: AtomicU64,
    /// Woken when a period begins or ends (extensions only move the end later).
    changed: tokio::sync::Notify,
}

impl Lease {
    /// A lease that has not been granted yet (incarnation 0, never valid).
    pub fn new() -> Lease {
        Lease(Arc::new(State {
            base: Instant::now(),
            until_ns: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
            changed: tokio::sync::Notify::new(),
        }))
    }

    /// A lease that never ends: a standalone node owns every room.
    pub fn forever() -> Lease {
        let lease = Lease::new();
        lease.0.incarnation.store(1, Ordering::Release);
        lease.0.until_ns.store(u64::MAX, Ordering::Release);
        lease
    }

    /// The current registration period.
    pub fn incarnation(&self) -> u64 {
        self.0.incarnation.load(Ordering::Acquire)
    }

    /// Whether the lease is valid at `now`.
    pub fn is_valid_at(&self, now: Instant) -> bool {
        let until = self.0.until_ns.load(Ordering::Acquire);
        until != 0 && self.nanos(now) < until
    }

    pub fn is_valid(&self) -> bool {
        self.is_valid_at(Instant::now())
    }

    /// Whether `incarnation` is the current one and the lease is valid at `now`.
    pub fn is_valid_for(&self, incarnation: u64, now: Instant) -> bool {
        // Incarnation first: a new period starts only after the old one ended, so a valid
        // lease read after a matching incarnation belongs to that incarnation.
        self.incarnation() == incarnation && self.is_valid_at(now)
    }

    /// When the lease ends, if it is held (`None` when there is none or it never ends).
    pub fn expires_at(&self) -> Option<Instant> {
        match self.0.until_ns.load(Ordering::Acquire) {
            0 | u64::MAX => None,
            ns => Some(self.0.base + Duration::from_nanos(ns)),
        }
    }

    /// How long the lease has left at `now` (zero when lapsed).
    pub fn remaining_at(&self, now: Instant) -> Duration {
        match self.0.until_ns.load(Ordering::Acquire) {
            0 => Duration::ZERO,
            u64::MAX => Duration::MAX,
            ns => Duration::from_nanos(ns.saturating_sub(self.nanos(now))),
        }
    }

    /// Starts a new registration period whose first renewal was sent at `sent`.
    pub fn begin(&self, incarnation: u64, sent: Instant, ttl: Duration, margin: Duration) {
        self.0.until_ns.store(0, Ordering::Release);
        self.0.incarnation.store(incarnation, Ordering::Release);
        self.extend(incarnation, sent, ttl, margin);
        self.0.changed.notify_waiters();
    }

    /// Resolves at the next [`Lease::begin`] or [`Lease::end`] after it is first polled.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.0.changed.notified()
    }

    /// Records a confirmed renewal of `incarnation` that was sent at `sent`. A renewal sent
    /// after the lease had already lapsed extends nothing: a lapse is final for its
    /// incarnation. Returns whether the lease is valid afterwards.
    pub fn extend(&self, incarnation: u64, sent: Instant, ttl: Duration, margin: Duration) -> bool {
        if self.incarnation() != incarnation {
            return false;
        }
        let until = self.0.until_ns.load(Ordering::Acquire);
        let sent_ns = self.nanos(sent);
        // The first renewal of a period (until == 0) starts it; later ones only while the
        // lease is still valid, both when they were sent and now that they are confirmed:
        // once anyone may have seen it lapse, it stays lapsed.
        if until != 0 && (sent_ns >= until || self.nanos(Instant::now()) >= until) {
            return false;
        }
        let new = sent_ns.saturating_add(ttl.saturating_sub(margin).as_nanos() as u64);
        self.0.until_ns.fetch_max(new.max(1), Ordering::AcqRel);
        self.is_valid_at(Instant::now())
    }

    /// Ends the lease now (a graceful leave, or a lapse noticed elsewhere).
    pub fn end(&self) {
        self.0.until_ns.store(0, Ordering::Release);
        self.0.changed.notify_waiters();
    }

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.0.base).as_nanos() as u64
    }
}

impl Default for Lease {
    fn default() -> Self {
        Lease::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);
    const MARGIN: Duration = Duration::from_millis(500);

    #[tokio::test(start_paused = true)]
    async fn a_lease_ends_a_margin_before_the_key_could_expire() {
        let lease = Lease::new();
        assert!(!lease.is_valid());
        let sent = Instant::now();
        lease.begin(7, sent, TTL, MARGIN);
        assert!(lease.is_valid_for(7, Instant::now()));
        assert!(!lease.is_valid_for(8, Instant::now()));
        tokio::time::advance(TTL - MARGIN - Duration::from_millis(1)).await;
        assert!(lease.is_valid());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!lease.is_valid(), "valid at sent + ttl - margin");
    }

    #[tokio::test(start_paused = true)]
    async fn renewals_extend_from_when_they_were_sent() {
        let lease = Lease::new();
        lease.begin(1, Instant::now(), TTL, MARGIN);
        tokio::time::advance(Duration::from_secs(2)).await;
        let sent = Instant::now();
        // The reply took 1 s: the lease counts from the send, not the reply.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(lease.extend(1, sent, TTL, MARGIN));
        assert_eq!(
            lease.remaining_at(Instant::now()),
            TTL - MARGIN - Duration::from_secs(1)
        );
        // An older renewal confirmed late never shortens it.
        lease.extend(1, sent - Duration::from_secs(2), TTL, MARGIN);
        assert_eq!(lease.expires_at(), Some(sent + TTL - MARGIN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lapse_is_final_for_its_incarnation() {
        let lease = Lease::new();
        lease.begin(1, Instant::now(), TTL, MARGIN);
        // Paused past the lease: a renewal sent now, and confirmed, revives nothing.
        tokio::time::advance(TTL).await;
        assert!(!lease.is_valid());
        assert!(!lease.extend(1, Instant::now(), TTL, MARGIN));
        assert!(!lease.is_valid());
        // Nor does one sent while it was valid but confirmed only after it had lapsed.
        assert!(!lease.extend(1, Instant::now() - Duration::from_secs(1), TTL, MARGIN));
        // Only a new registration period gives a lease again.
        lease.begin(2, Instant::now(), TTL, MARGIN);
        assert!(lease.is_valid_for(2, Instant::now()));
        assert!(!lease.is_valid_for(1, Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn forever_never_ends_and_end_ends() {
        let lease = Lease::forever();
        tokio::time::advance(Duration::from_secs(86_400 * 365)).await;
        assert!(lease.is_valid_for(1, Instant::now()));
        assert_eq!(lease.expires_at(), None);
        lease.end();
        assert!(!lease.is_valid());
    }
}
