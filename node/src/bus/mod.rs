//! Cross-shard traffic between nodes, over Redis.
//!
//! `redis.rs` owns the transport (each node's inbox channel, requests and replies) and
//! forwards HTTP publishes that land on a non-owner. `link.rs` is one node's ordered stream
//! to another, in the binary batches of `wire.rs`; `bridge.rs` uses the links to let a
//! WebSocket connection on one node join rooms owned by others, at a cost per node a room
//! spans rather than per member.

pub mod bridge;
pub(crate) mod link;
pub mod redis;
pub(crate) mod wire;
