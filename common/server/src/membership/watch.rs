//! Watching membership: the ring, every member's record, and who departed when.
//!
//! One task per process re-reads every member key on a timer and whenever the membership
//! channel announces a change. What it publishes:
//! - the [`Ring`] of active members (routers need only this);
//! - a [`View`]: the ring, the records of every registered member (active and draining,
//!   with the ring version each has applied), and the members that departed without
//!   leaving, each with the instant after which its rooms may safely be taken over.
//!
//! A member is dropped from the ring only after a full TTL unseen on this watcher's clock,
//! so a Redis that restarted empty does not move rooms before the members re-register. A
//! departed member's rooms wait until its lease has certainly ended: its key's absence
//! proves that when this is the Redis that held the key (the lease always ends before the
//! key can expire), while after a Redis restart (its `run_id` changed) the key may have
//! been lost early, and a full TTL more is waited. On top of that comes the configured
//! `departure_wait`, the time its last store writes may still take to land.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{MemberRecord, MemberState, MembershipConfig, MembershipError};
use common::ring::{NodeInfo, Ring};

/// A member that vanished without leaving gracefully.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Departed {
    pub node: NodeInfo,
    /// Its rooms may be served by others from this instant on.
    pub safe_after: Instant,
}

/// Everything a node needs to decide whether it may take over rooms.
#[derive(Debug, Clone)]
pub struct View {
    pub ring: Arc<Ring>,
    /// When this watcher first saw the current ring version.
    pub ring_since: Instant,
    /// Registered members (active and draining), by id, as last read.
    pub members: BTreeMap<u16, MemberRecord>,
    /// Members that departed without leaving, until their rooms are safe to take.
    pub departed: Vec<Departed>,
    /// Whether the last read reached Redis.
    pub redis_ok: bool,
}

impl View {
    /// A view of a fixed ring whose members have all applied it.
    pub fn settled(ring: Ring) -> View {
        let version = ring.version();
        let members = ring
            .nodes()
            .iter()
            .map(|n| {
                let mut r = MemberRecord::new(n.clone());
                r.applied = Some(version);
                (n.id, r)
            })
            .collect();
        View {
            ring: Arc::new(ring),
            ring_since: Instant::now(),
            members,
            departed: Vec::new(),
            redis_ok: true,
        }
    }

    /// What decides a change worth publishing: the ring, every record, the departures.
    fn same_as(&self, other: &View) -> bool {
        self.ring.version() == other.ring.version()
            && self.members == other.members
            && self.departed == other.departed
            && self.redis_ok == other.redis_ok
    }
}

/// A live view of the ring, kept current by a background task.
#[derive(Clone)]
pub struct RingWatch {
    pub ring: watch::Receiver<Arc<Ring>>,
    pub view: watch::Receiver<Arc<View>>,
    redis_ok: Arc<AtomicBool>,
}

impl RingWatch {
    pub fn current(&self) -> Arc<Ring> {
        self.ring.borrow().clone()
    }

    pub fn current_view(&self) -> Arc<View> {
        self.view.borrow().clone()
    }

    /// Whether the last reconcile reached Redis.
    pub fn redis_ok(&self) -> bool {
        self.redis_ok.load(Ordering::Relaxed)
    }

    /// A watch that never changes, for single-node use and tests.
    pub fn fixed(ring: Ring) -> RingWatch {
        let view = View::settled(ring);
        let (tx, rx) = watch::channel(view.ring.clone());
        let (vtx, vrx) = watch::channel(Arc::new(view));
        // Keep the senders alive so receivers never see the channels close.
        std::mem::forget(tx);
        std::mem::forget(vtx);
        RingWatch {
            ring: rx,
            view: vrx,
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
    let mut state = Tracker::new(cfg.clone());
    let first = read(&cfg, &mut conn).await?;
    let view = state.apply(first, Instant::now());
    let (tx, rx) = watch::channel(view.ring.clone());
    let (vtx, vrx) = watch::channel(Arc::new(view));
    let redis_ok = Arc::new(AtomicBool::new(true));
    tokio::spawn(watch_loop(
        cfg,
        client,
        conn,
        state,
        tx,
        vtx,
        redis_ok.clone(),
        stop,
    ));
    Ok(RingWatch {
        ring: rx,
        view: vrx,
        redis_ok,
    })
}

/// One read of Redis: every record under the prefix, and the server's identity.
struct Snapshot {
    records: Vec<MemberRecord>,
    run_id: String,
}

async fn read(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
) -> Result<Snapshot, MembershipError> {
    let limit = cfg.ttl.max(Duration::from_millis(500));
    match tokio::time::timeout(limit, read_now(cfg, conn)).await {
        Ok(r) => r,
        Err(_) => Err(MembershipError::Timeout(limit)),
    }
}

async fn read_now(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
) -> Result<Snapshot, MembershipError> {
    let info: String = redis::cmd("INFO").arg("server").query_async(conn).await?;
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    let pattern = cfg.node_pattern();
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
    let mut records = Vec::new();
    if !keys.is_empty() {
        let values: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(conn).await?;
        for v in values.into_iter().flatten() {
            match serde_json::from_str::<MemberRecord>(&v) {
                Ok(r) => records.push(r),
                Err(e) => tracing::warn!(error = %e, "ignoring an unreadable membership entry"),
            }
        }
    }
    Ok(Snapshot { records, run_id })
}

/// A member as last seen by this watcher.
struct Seen {
    record: MemberRecord,
    at: Instant,
    run_id: String,
    /// The first successful read that did not find it.
    absent_since: Option<Instant>,
}

/// The watcher's memory: pure bookkeeping over snapshots and time, so its rules are
/// unit-tested without Redis.
struct Tracker {
    cfg: MembershipConfig,
    seen: HashMap<u16, Seen>,
    departed: Vec<Departed>,
    /// Members announced as leaving on the channel since the last read.
    left: HashSet<u16>,
    ring: Arc<Ring>,
    ring_since: Instant,
}

impl Tracker {
    fn new(cfg: MembershipConfig) -> Tracker {
        Tracker {
            ring: Arc::new(Ring::new([], cfg.vnodes)),
            cfg,
            seen: HashMap::new(),
            departed: Vec::new(),
            left: HashSet::new(),
            ring_since: Instant::now(),
        }
    }

    fn depart(&mut self, node: NodeInfo, absent_since: Instant, redis_restarted: bool) {
        let lease_over = if redis_restarted {
            absent_since + self.cfg.ttl
        } else {
            absent_since
        };
        let safe_after = lease_over + self.cfg.departure_wait;
        tracing::info!(
            node = node.id,
            incarnation = node.incarnation,
            wait_ms = safe_after
                .saturating_duration_since(Instant::now())
                .as_millis() as u64,
            redis_restarted,
            "member departed without leaving"
        );
        self.departed.push(Departed { node, safe_after });
    }

    /// Folds one successful read in and returns the view after it.
    fn apply(&mut self, snap: Snapshot, now: Instant) -> View {
        let mut present: HashMap<u16, MemberRecord> = HashMap::new();
        for r in snap.records {
            present.insert(r.node.id, r);
        }
        // Records that changed incarnation: the old one is gone. A node that fenced itself
        // says which incarnation it replaces (it stopped serving before registering again);
        // a process that crashed and was restarted at once may still have writes landing:
        // wait them out.
        for (id, rec) in &present {
            if let Some(old) = self.seen.get(id) {
                if old.record.node.incarnation != rec.node.incarnation
                    && old.record.state != MemberState::Left
                    && rec.replaces != Some(old.record.node.incarnation)
                {
                    let node = old.record.node.clone();
                    self.depart(node, now, false);
                }
            }
        }
        let here: HashSet<u16> = present.keys().copied().collect();
        for (id, rec) in present {
            if rec.state == MemberState::Left {
                // Gone gracefully: nobody waits for it.
                self.seen.remove(&id);
                continue;
            }
            self.seen.insert(
                id,
                Seen {
                    record: rec,
                    at: now,
                    run_id: snap.run_id.clone(),
                    absent_since: None,
                },
            );
        }
        let mut gone = Vec::new();
        for (id, s) in self.seen.iter_mut() {
            if here.contains(id) {
                continue;
            }
            if self.left.contains(id) {
                gone.push((*id, None));
                continue;
            }
            let absent_since = *s.absent_since.get_or_insert(now);
            if now.duration_since(s.at) >= self.cfg.ttl {
                gone.push((*id, Some((absent_since, s.run_id != snap.run_id))));
            }
        }
        for (id, how) in gone {
            if let Some(s) = self.seen.remove(&id) {
                if let Some((absent_since, restarted)) = how {
                    self.depart(s.record.node, absent_since, restarted);
                }
            }
        }
        self.left.clear();
        self.departed.retain(|d| d.safe_after > now);
        let ring = Ring::new(
            self.seen
                .values()
                .filter(|s| s.record.state == MemberState::Active)
                .map(|s| s.record.node.clone()),
            self.cfg.vnodes,
        );
        if ring.version() != self.ring.version() {
            self.ring = Arc::new(ring);
            self.ring_since = now;
        }
        self.view(true)
    }

    fn view(&self, redis_ok: bool) -> View {
        View {
            ring: self.ring.clone(),
            ring_since: self.ring_since,
            members: self
                .seen
                .iter()
                .map(|(id, s)| (*id, s.record.clone()))
                .collect(),
            departed: self.departed.clone(),
            redis_ok,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn watch_loop(
    cfg: MembershipConfig,
    client: redis::Client,
    mut conn: ConnectionManager,
    mut state: Tracker,
    tx: watch::Sender<Arc<Ring>>,
    vtx: watch::Sender<Arc<View>>,
    redis_ok: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(cfg.reconcile_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pubsub: Option<redis::aio::PubSubStream> = None;
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
                        state.left.insert(id);
                    }
                }
                // The subscription broke; resubscribe on the next round.
                None => pubsub = None,
            },
            _ = tick.tick() => {}
        }
        match read(&cfg, &mut conn).await {
            Ok(snap) => {
                redis_ok.store(true, Ordering::Relaxed);
                let view = state.apply(snap, Instant::now());
                publish(&tx, &vtx, view);
            }
            Err(e) => {
                if redis_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "membership: redis unreachable; keeping the last ring");
                }
                let view = state.view(false);
                publish(&tx, &vtx, view);
            }
        }
    }
}

fn publish(tx: &watch::Sender<Arc<Ring>>, vtx: &watch::Sender<Arc<View>>, view: View) {
    if view.ring.version() != tx.borrow().version() {
        tracing::info!(
            nodes = view.ring.len(),
            version = view.ring.version(),
            "ring changed"
        );
        tx.send_replace(view.ring.clone());
    }
    if !view.same_as(&vtx.borrow()) {
        vtx.send_replace(Arc::new(view));
    }
}

async fn subscribe(
    client: &redis::Client,
    cfg: &MembershipConfig,
) -> Option<redis::aio::PubSubStream> {
    // Bounded: across a partition a connect can hang, and this loop also reconciles.
    let limit = cfg.ttl.max(Duration::from_millis(500));
    tokio::time::timeout(limit, async {
        let mut pubsub = client.get_async_pubsub().await.ok()?;
        pubsub.subscribe(cfg.channel()).await.ok()?;
        Some(pubsub.into_on_message())
    })
    .await
    .ok()
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MembershipConfig {
        MembershipConfig {
            redis_url: String::new(),
            prefix: "t".into(),
            ttl: Duration::from_secs(5),
            vnodes: 16,
            departure_wait: Duration::from_secs(2),
        }
    }

    fn rec(id: u16, incarnation: u64, state: MemberState, applied: Option<u64>) -> MemberRecord {
        MemberRecord {
            node: NodeInfo {
                id,
                addr: format!("10.0.0.{id}:7001"),
                started_at_ms: 0,
                incarnation,
            },
            state,
            applied,
            replaces: None,
        }
    }

    fn snap(records: Vec<MemberRecord>, run_id: &str) -> Snapshot {
        Snapshot {
            records,
            run_id: run_id.into(),
        }
    }

    fn ids(view: &View) -> Vec<u16> {
        view.ring.nodes().iter().map(|n| n.id).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_vanished_member_leaves_the_ring_after_a_ttl_and_waits_out_its_writes() {
        let mut t = Tracker::new(cfg());
        let a = rec(1, 10, MemberState::Active, None);
        let b = rec(2, 20, MemberState::Active, None);
        let v = t.apply(snap(vec![a.clone(), b.clone()], "r1"), Instant::now());
        assert_eq!(ids(&v), [1, 2]);
        // Node 2's key expires: it stays in the ring for a TTL on our clock.
        tokio::time::advance(Duration::from_secs(1)).await;
        let first_absent = Instant::now();
        let v = t.apply(snap(vec![a.clone()], "r1"), first_absent);
        assert_eq!(ids(&v), [1, 2]);
        assert!(v.departed.is_empty());
        tokio::time::advance(Duration::from_secs(4)).await;
        let v = t.apply(snap(vec![a.clone()], "r1"), Instant::now());
        assert_eq!(ids(&v), [1]);
        // Same Redis: the absence proves the lease ended; only the writes are waited out,
        // counted from when the absence was first seen: here that was 4 s ago, more than
        // the 2 s wait, so nothing is left to wait for by the time it leaves the ring.
        assert!(v.departed.is_empty());
        assert!(!v.members.contains_key(&2));

        // With a longer write wait the departure is reported until it is safe.
        let mut t = Tracker::new(MembershipConfig {
            departure_wait: Duration::from_secs(10),
            ..cfg()
        });
        t.apply(snap(vec![a.clone(), b], "r1"), Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        let first_absent = Instant::now();
        t.apply(snap(vec![a.clone()], "r1"), first_absent);
        tokio::time::advance(Duration::from_secs(4)).await;
        let v = t.apply(snap(vec![a.clone()], "r1"), Instant::now());
        assert_eq!(ids(&v), [1]);
        assert_eq!(v.departed.len(), 1);
        assert_eq!(v.departed[0].node.id, 2);
        assert_eq!(
            v.departed[0].safe_after,
            first_absent + Duration::from_secs(10)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_redis_restart_an_absence_proves_nothing_and_a_ttl_more_is_waited() {
        let mut t = Tracker::new(cfg());
        let a = rec(1, 10, MemberState::Active, None);
        let b = rec(2, 20, MemberState::Active, None);
        t.apply(snap(vec![a.clone(), b.clone()], "r1"), Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Redis came back empty (a new run_id); node 1 re-registered, node 2 did not.
        let back = Instant::now();
        let v = t.apply(snap(vec![a.clone()], "r2"), back);
        assert_eq!(
            ids(&v),
            [1, 2],
            "a restart empty must not move rooms at once"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        let v = t.apply(snap(vec![a.clone()], "r2"), Instant::now());
        assert_eq!(ids(&v), [1]);
        assert_eq!(
            v.departed[0].safe_after,
            back + Duration::from_secs(5) + Duration::from_secs(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_graceful_leave_is_applied_at_once_and_waits_for_nothing() {
        let mut t = Tracker::new(cfg());
        let a = rec(1, 10, MemberState::Active, None);
        let b = rec(2, 20, MemberState::Active, None);
        t.apply(snap(vec![a.clone(), b.clone()], "r1"), Instant::now());
        // Draining: out of the ring, still a member whose `applied` others wait for.
        let draining = rec(2, 20, MemberState::Draining, Some(7));
        let v = t.apply(snap(vec![a.clone(), draining], "r1"), Instant::now());
        assert_eq!(ids(&v), [1]);
        assert_eq!(v.members[&2].applied, Some(7));
        let left = rec(2, 20, MemberState::Left, Some(7));
        let v = t.apply(snap(vec![a.clone(), left], "r1"), Instant::now());
        assert!(!v.members.contains_key(&2));
        assert!(v.departed.is_empty());
        // Announced on the channel, then the key is gone: also graceful.
        t.apply(snap(vec![a.clone(), b.clone()], "r1"), Instant::now());
        t.left.insert(2);
        let v = t.apply(snap(vec![a.clone()], "r1"), Instant::now());
        assert_eq!(ids(&v), [1]);
        assert!(v.departed.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_incarnation_changes_the_version_and_the_old_one_is_waited_out() {
        let mut t = Tracker::new(cfg());
        let a = rec(1, 10, MemberState::Active, None);
        let v1 = t.apply(
            snap(vec![a.clone(), rec(2, 20, MemberState::Active, None)], "r1"),
            Instant::now(),
        );
        let v2 = t.apply(
            snap(vec![a.clone(), rec(2, 21, MemberState::Active, None)], "r1"),
            Instant::now(),
        );
        assert_eq!(ids(&v2), [1, 2]);
        assert_ne!(v1.ring.version(), v2.ring.version());
        assert_eq!(v2.departed.len(), 1);
        assert_eq!(v2.departed[0].node.incarnation, 20);
        tokio::time::advance(Duration::from_secs(2)).await;
        let v3 = t.apply(
            snap(vec![a, rec(2, 21, MemberState::Active, None)], "r1"),
            Instant::now(),
        );
        assert!(v3.departed.is_empty(), "pruned once safe");
        // A node that fenced itself names the incarnation it replaces: nothing to wait for.
        let mut again = rec(2, 22, MemberState::Active, None);
        again.replaces = Some(21);
        let v4 = t.apply(
            snap(vec![rec(1, 10, MemberState::Active, None), again], "r1"),
            Instant::now(),
        );
        assert!(v4.departed.is_empty());
        assert_ne!(v4.ring.version(), v3.ring.version());
    }
}
