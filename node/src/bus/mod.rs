//! Cross-shard traffic between nodes, over Redis.
//!
//! `redis.rs` owns the transport (each node's inbox channel, requests and replies) and
//! forwards HTTP publishes that land on a non-owner. `bridge.rs` lets a WebSocket
//! connection on one node join rooms owned by others.

pub mod bridge;
pub mod redis;
