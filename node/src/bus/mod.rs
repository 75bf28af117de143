//! Cross-shard traffic between nodes.
//!
//! Today one kind of traffic crosses nodes: an HTTP publish that lands on a node that does
//! not own the room is forwarded to the owner and answered from there (see `redis.rs`).

pub mod redis;
