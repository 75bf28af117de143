//! The router's answer to "who owns this room?" (`GET /v1/rooms/{room}/owner`), which
//! `cross-shard`, `rebalance --bridged` and the cluster cost accounting use to learn where
//! rooms live and which nodes exist. It asks only the router it is given, bounded in time;
//! it decides nothing about rooms itself.

use std::time::Duration;

use serde::Serialize;

use crate::http::HttpClient;

const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the router says a room lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub id: u64,
    pub addr: String,
}

/// What the router's `GET /v1/rooms/{room}/owner` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    pub owner: Owner,
    /// Nodes in that router's ring.
    pub ring_size: u64,
}

/// Asks the router at `http` which node owns `room` (bounded in time); an error when the
/// answer is not a 200 with a node id (e.g. `--url` is a node, not a router).
pub async fn lookup(http: &mut HttpClient, room: &str) -> anyhow::Result<Lookup> {
    let a = http
        .request(
            "GET",
            &format!("/v1/rooms/{room}/owner"),
            None,
            LOOKUP_TIMEOUT,
        )
        .await?;
    if a.status != 200 {
        anyhow::bail!(
            "owner of {room}: HTTP {} {} (is --url a router?)",
            a.status,
            String::from_utf8_lossy(&a.body)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&a.body)?;
    Ok(Lookup {
        owner: Owner {
            id: v["node"]["id"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("owner of {room}: no node id"))?,
            addr: v["node"]["addr"].as_str().unwrap_or_default().to_owned(),
        },
        ring_size: v["ring_size"].as_u64().unwrap_or(0),
    })
}
