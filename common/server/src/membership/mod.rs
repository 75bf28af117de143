//! Cluster membership in Redis: nodes register themselves and hold a lease; routers and
//! nodes watch.
//!
//! Each node keeps a key `<prefix>:node:<id>` holding its [`MemberRecord`] alive with a TTL,
//! renewed every quarter of it with `SET ... XX`, so a renewal never recreates a key that
//! expired or vanished. A confirmed renewal extends the node's [`Lease`]; a node whose
//! lease has lapsed stops renewing, quiesces, and registers anew under a fresh
//! *incarnation* (see `lease.rs`). The record also carries the ring version the node has
//! fully applied (`applied`): a node taking over rooms waits until every member has applied
//! its ring, which is how a new owner learns that the old one let go without any per-room
//! traffic. Every change is announced on the channel `<prefix>:membership`, and watchers
//! also re-read the keys on a timer, because pub/sub is at-most-once and a crashed node
//! announces nothing: its key simply expires.
//!
//! A watcher keeps its last ring while Redis is unreachable rather than guess, and drops a
//! member missing from Redis only after a full TTL unseen; a graceful leave (the record
//! turns `left`) is applied at once. A member that vanished without leaving is reported as
//! *departed* with the instant after which its rooms may safely be taken over: when its
//! lease has certainly ended, plus the time its last store writes may still take.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use common::ring::NodeInfo;

mod lease;
mod registration;
mod watch;

pub use lease::Lease;
pub use registration::{register, Registration};
pub use watch::{watch, Departed, RingWatch, View};

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub redis_url: String,
    /// Key and channel prefix, so several clusters can share one Redis.
    pub prefix: String,
    /// How long a node stays a member without a heartbeat.
    pub ttl: Duration,
    /// Virtual nodes per node in the ring.
    pub vnodes: u32,
    /// How long after a departed member's lease has certainly ended its rooms may still
    /// receive its writes (a node sets its store timeout; routers, which take over nothing,
    /// leave it at zero).
    pub departure_wait: Duration,
}

impl MembershipConfig {
    fn node_key(&self, id: u16) -> String {
        format!("{}:node:{id}", self.prefix)
    }

    fn node_pattern(&self) -> String {
        format!("{}:node:*", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:membership", self.prefix)
    }

    fn reconcile_every(&self) -> Duration {
        (self.ttl / 2).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }

    /// Renewals per TTL: a lease survives three lost or slow renewals in a row.
    pub fn renew_every(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_millis(25))
    }

    /// A lease ends this long before the key it stands for could expire in Redis: room for
    /// clocks that tick at slightly different rates.
    pub fn lease_margin(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("node id {id} is already registered by {addr}; every node needs its own --node-id")]
    IdInUse { id: u16, addr: String },
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
}

/// What a member is doing, as its record says.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Serving: part of the ring.
    #[default]
    Active,
    /// Shutting down: out of the ring, but still handing its rooms over; others wait for
    /// its `applied` like any member's.
    Draining,
    /// Gone gracefully, every room handed over: nobody waits for it.
    Left,
}

/// A member's key in Redis. Older readers see the flattened [`NodeInfo`] fields and ignore
/// the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    #[serde(flatten)]
    pub node: NodeInfo,
    #[serde(default)]
    pub state: MemberState,
    /// The ring version this member has fully applied: it handed over every room it does
    /// not own in that ring. Absent for members that predate fencing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied: Option<u64>,
    /// The incarnation of this node that this one replaces, which had stopped serving
    /// every room before this one registered (its lease lapsed and the node fenced
    /// itself): nobody needs to wait out its writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<u64>,
}

impl MemberRecord {
    pub fn new(node: NodeInfo) -> MemberRecord {
        MemberRecord {
            node,
            state: MemberState::Active,
            applied: None,
            replaces: None,
        }
    }
}
