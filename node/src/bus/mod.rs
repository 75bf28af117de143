//! Cross-shard traffic between nodes, over Redis.
//!
//! Layered so that each file only looks down: `wire.rs` encodes the binary batches;
//! `link.rs` is one node's ordered stream to another, published through a `Carrier`;
//! `redis.rs` is the transport (each node's inbox channel, forwarded sends and their
//! replies), handing what arrives to an `Inbox`; `bridge.rs` is on top: it owns the
//! transport and the links, implements both traits, and lets a WebSocket connection on one
//! node join rooms owned by others, at a cost per node a room spans rather than per member.

pub mod bridge;
pub(crate) mod link;
pub mod redis;
pub(crate) mod wire;
