//! A node's own registration: one task writes its record and holds its lease.
//!
//! Every write of the record goes through this task, so the heartbeat, the `applied`
//! version, draining and leaving never race each other. A renewal is `SET ... PX ttl XX`:
//! it only refreshes a key that still exists, and extends the [`Lease`] from the instant
//! it was sent. When the key is gone (it expired, or Redis lost it) or the lease lapsed
//! (the process was paused, Redis was unreachable too long), the task stops writing: the
//! node must fence itself and call [`Registration::rejoin`], which registers a new
//! incarnation. A lapsed incarnation is never written again, so no watcher can mistake a
//! node that came back from a pause for one that never left.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::{Lease, MemberRecord, MemberState, MembershipConfig, MembershipError};
use common::ring::NodeInfo;

/// A handle on this node's registration. Cheap to clone; the writer task stops when the
/// node leaves or every handle is dropped.
#[derive(Clone)]
pub struct Registration {
    cmds: mpsc::Sender<Cmd>,
    lease: Lease,
    me: NodeInfo,
    predecessor: bool,
}

enum Cmd {
    Applied(u64),
    Drain(oneshot::Sender<()>),
    Leave {
        flushed: bool,
        done: oneshot::Sender<()>,
    },
    Rejoin(oneshot::Sender<Result<u64, MembershipError>>),
}

/// A fresh incarnation: Unix ms, strictly increasing within the process.
fn next_incarnation() -> u64 {
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = common::id::now_ms();
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// Registers `me` under a new incarnation and holds its lease until [`Registration::leave`].
///
/// Fails when another live node (another address) holds the id. A record left by an
/// earlier process at the same address that did not leave gracefully is noted
/// ([`Registration::had_predecessor`]): its last writes may still be landing.
pub async fn register(
    cfg: &MembershipConfig,
    me: NodeInfo,
) -> Result<Registration, MembershipError> {
    let client = redis::Client::open(cfg.redis_url.as_str())?;
    let mut conn = client.get_connection_manager().await?;
    let record = MemberRecord::new(NodeInfo {
        incarnation: next_incarnation(),
        ..me
    });
    let lease = Lease::new();
    let predecessor = claim(cfg, &mut conn, &record).await?;
    let sent = Instant::now();
    write(cfg, &mut conn, &record, false).await?;
    lease.begin(record.node.incarnation, sent, cfg.ttl, cfg.lease_margin());
    announce(cfg, &mut conn, &format!("join:{}", record.node.id)).await;
    let (tx, rx) = mpsc::channel(16);
    let me = record.node.clone();
    tokio::spawn(writer(cfg.clone(), conn, record, lease.clone(), rx));
    Ok(Registration {
        cmds: tx,
        lease,
        me,
        predecessor,
    })
}

/// Refuses an id another live node holds: two nodes minting ids with the same node bits
/// could collide. The same address is this node restarting. Returns whether a previous
/// incarnation at this address is still registered and did not leave.
async fn claim(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
    record: &MemberRecord,
) -> Result<bool, MembershipError> {
    let limit = cfg.renew_every().max(Duration::from_millis(200));
    let mut get = redis::cmd("GET");
    get.arg(cfg.node_key(record.node.id));
    let existing: Option<String> = match tokio::time::timeout(limit, get.query_async(conn)).await {
        Ok(r) => r?,
        // Across a partition a reply can take as long as TCP does to give up.
        Err(_) => return Err(MembershipError::Timeout(limit)),
    };
    let Some(other) = existing.and_then(|v| serde_json::from_str::<MemberRecord>(&v).ok()) else {
        return Ok(false);
    };
    if other.node.addr != record.node.addr && other.state != MemberState::Left {
        return Err(MembershipError::IdInUse {
            id: record.node.id,
            addr: other.node.addr,
        });
    }
    Ok(other.state != MemberState::Left && other.node.incarnation != record.node.incarnation)
}

/// Writes the record with the TTL; with `only_if_present`, only over a key that exists.
/// Returns false when the key was absent (nothing was written).
async fn write(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
    record: &MemberRecord,
    only_if_present: bool,
) -> Result<bool, MembershipError> {
    let value = serde_json::to_string(record).unwrap_or_default();
    let mut cmd = redis::cmd("SET");
    cmd.arg(cfg.node_key(record.node.id))
        .arg(value)
        .arg("PX")
        .arg(cfg.ttl.as_millis() as u64);
    if only_if_present {
        cmd.arg("XX");
    }
    // A frozen Redis must not hold the heartbeat: a renewal that takes longer than this
    // could not have kept the lease anyway.
    let limit = cfg.renew_every().max(Duration::from_millis(200));
    match tokio::time::timeout(limit, cmd.query_async::<Option<String>>(conn)).await {
        Ok(Ok(reply)) => Ok(reply.is_some()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(MembershipError::Timeout(limit)),
    }
}

async fn announce(cfg: &MembershipConfig, conn: &mut ConnectionManager, what: &str) {
    let mut cmd = redis::cmd("PUBLISH");
    cmd.arg(cfg.channel()).arg(what);
    // At most once: watchers re-read on a timer anyway.
    let _ = tokio::time::timeout(cfg.renew_every(), cmd.query_async::<()>(conn)).await;
}

async fn writer(
    cfg: MembershipConfig,
    mut conn: ConnectionManager,
    mut record: MemberRecord,
    lease: Lease,
    mut cmds: mpsc::Receiver<Cmd>,
) {
    let mut tick = tokio::time::interval(cfg.renew_every());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let id = record.node.id;
    let mut warned = false;
    loop {
        let cmd = tokio::select! {
            cmd = cmds.recv() => match cmd {
                Some(cmd) => Some(cmd),
                // Every handle is gone: the node is gone.
                None => return,
            },
            _ = tick.tick() => None,
        };
        let mut announcement = None;
        match cmd {
            None => {}
            Some(Cmd::Applied(version)) => {
                if record.applied == Some(version) {
                    continue;
                }
                record.applied = Some(version);
                announcement = Some(format!("applied:{id}"));
            }
            Some(Cmd::Drain(done)) => {
                record.state = MemberState::Draining;
                renew(&cfg, &mut conn, &record, &lease, &mut warned).await;
                announce(&cfg, &mut conn, &format!("drain:{id}")).await;
                let _ = done.send(());
                continue;
            }
            Some(Cmd::Leave { flushed, done }) => {
                if lease.is_valid() {
                    if flushed {
                        // Every room was handed over: say so, and let the key expire.
                        record.state = MemberState::Left;
                        let _ = write(&cfg, &mut conn, &record, true).await;
                    } else {
                        // Writes may still be landing: look like a crash to the others,
                        // who then wait out the departure before taking the rooms.
                        let mut del = redis::cmd("DEL");
                        del.arg(cfg.node_key(id));
                        let _ = tokio::time::timeout(
                            cfg.renew_every(),
                            del.query_async::<()>(&mut conn),
                        )
                        .await;
                    }
                    announce(&cfg, &mut conn, &format!("leave:{id}")).await;
                }
                lease.end();
                let _ = done.send(());
                return;
            }
            Some(Cmd::Rejoin(done)) => {
                let result = rejoin(&cfg, &mut conn, &mut record, &lease).await;
                if result.is_ok() {
                    warned = false;
                    announce(&cfg, &mut conn, &format!("join:{id}")).await;
                }
                let _ = done.send(result);
                continue;
            }
        }
        if renew(&cfg, &mut conn, &record, &lease, &mut warned).await {
            if let Some(what) = announcement {
                announce(&cfg, &mut conn, &what).await;
            }
        }
    }
}

/// One renewal of the current incarnation. Returns whether the record was written.
async fn renew(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
    record: &MemberRecord,
    lease: &Lease,
    warned: &mut bool,
) -> bool {
    let incarnation = record.node.incarnation;
    let sent = Instant::now();
    // A lapsed incarnation is never written again (see the module doc).
    if !lease.is_valid_for(incarnation, sent) {
        return false;
    }
    match write(cfg, conn, record, true).await {
        Ok(true) => {
            if !lease.extend(incarnation, sent, cfg.ttl, cfg.lease_margin()) {
                tracing::warn!(
                    node = record.node.id,
                    "membership renewal came back after the lease had lapsed"
                );
            }
            *warned = false;
            true
        }
        Ok(false) => {
            // The key expired or Redis lost it: others may already have dropped us, so this
            // incarnation is over even if our own clock says otherwise.
            tracing::warn!(
                node = record.node.id,
                "membership key vanished from redis; the lease is over"
            );
            lease.end();
            false
        }
        Err(e) => {
            if !*warned {
                tracing::warn!(node = record.node.id, error = %e, "membership renewal failed");
                *warned = true;
            }
            false
        }
    }
}

async fn rejoin(
    cfg: &MembershipConfig,
    conn: &mut ConnectionManager,
    record: &mut MemberRecord,
    lease: &Lease,
) -> Result<u64, MembershipError> {
    lease.end();
    let mut next = record.clone();
    next.replaces = Some(record.node.incarnation);
    next.node.incarnation = next_incarnation();
    next.state = MemberState::Active;
    next.applied = None;
    claim(cfg, conn, &next).await?;
    let sent = Instant::now();
    write(cfg, conn, &next, false).await?;
    lease.begin(next.node.incarnation, sent, cfg.ttl, cfg.lease_margin());
    *record = next;
    Ok(record.node.incarnation)
}

impl Registration {
    /// This node as registered (with its first incarnation).
    pub fn me(&self) -> &NodeInfo {
        &self.me
    }

    /// The lease this registration holds.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Whether an earlier incarnation at this address was still registered (a crash and a
    /// quick restart): its writes may still be landing.
    pub fn had_predecessor(&self) -> bool {
        self.predecessor
    }

    /// Publishes that this node has applied ring `version` (handed over what it lost).
    pub async fn set_applied(&self, version: u64) {
        let _ = self.cmds.send(Cmd::Applied(version)).await;
    }

    /// Takes this node out of the ring while it hands its rooms over (shutdown).
    pub async fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Drain(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Leaves for good and ends the lease. With `flushed`, every room was handed over and
    /// others may take them at once; otherwise they wait as after a crash.
    pub async fn leave(&self, flushed: bool) {
        let (done, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Leave { flushed, done }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Registers a new incarnation after the lease lapsed; the node must have stopped
    /// serving every room of the old one first. Returns the new incarnation.
    pub async fn rejoin(&self) -> Result<u64, MembershipError> {
        let (tx, rx) = oneshot::channel();
        self.cmds
            .send(Cmd::Rejoin(tx))
            .await
            .map_err(|_| MembershipError::Timeout(Duration::ZERO))?;
        rx.await
            .unwrap_or(Err(MembershipError::Timeout(Duration::ZERO)))
    }
}
