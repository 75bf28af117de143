//! A real store outage mid-traffic: the local CQL server is frozen with SIGSTOP, then
//! thawed with SIGCONT. Sends during the outage get errors, never acks; `/readyz` turns red
//! and green again by itself; every acked message is in the store afterwards, read back
//! directly from it. Its own test binary: freezing the server would stall other tests.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_node::store::scylla::{ScyllaConfig, ScyllaStore};
use chat_node::store::{HistoryQuery, MessageStore, PageFrom};
use common::{MessageId, RoomId};
use support::*;

/// The local CQL server's pid, exported by `deploy/local/test.sh` when it started the
/// server. Without it this test cannot cause an outage and fails.
fn cql_pid() -> String {
    std::env::var("CHAT_CQL_PID").unwrap_or_else(|_| {
        panic!("CHAT_CQL_PID is not set: the outage test freezes the local CQL server; run deploy/local/test.sh")
    })
}

fn signal(sig: &str, pid: &str) {
    let ok = Command::new("kill")
        .args([sig, pid])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Publishes `cid` until the node acks it (201/200) or `deadline`; returns the id and how
/// many refusals it saw.
async fn publish_until_acked(
    addr: std::net::SocketAddr,
    room: &str,
    cid: &str,
    deadline: tokio::time::Instant,
    refused: &AtomicU32,
) -> (MessageId, u32) {
    let mut refusals = 0;
    let mut pace = tokio::time::interval(Duration::from_millis(100));
    loop {
        let body = format!(r#"{{"cid":"{cid}","body":"payload {cid}"}}"#);
        let (status, answer) = http_post(
            addr,
            &format!("/v1/rooms/{room}/messages?user=writer"),
            &body,
        )
        .await;
        match status {
            200 | 201 => {
                let id = json(&answer)["id"]
                    .as_str()
                    .expect("id")
                    .parse()
                    .expect("id");
                return (id, refusals);
            }
            503 => {
                let code = json(&answer)["code"].as_str().unwrap_or("").to_string();
                assert!(
                    code == "store_unavailable" || code == "overloaded",
                    "unexpected refusal {answer}"
                );
                refusals += 1;
                refused.fetch_add(1, Ordering::Relaxed);
            }
            other => panic!("unexpected status {other}: {answer}"),
        }
        assert!(tokio::time::Instant::now() < deadline, "{cid} never acked");
        pace.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_store_gets_errors_not_acks_and_nothing_acked_is_lost() {
    let pid = cql_pid();
    let mut cfg = config();
    cfg.store_timeout = Duration::from_secs(1);
    let node = TestNode::start(cfg).await;
    let addr = node.addr;
    let room = format!("outage-{}", std::process::id());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);

    // Four publishers, 60 messages each, running through the outage.
    let refused = Arc::new(AtomicU32::new(0));
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let room = room.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                let mut acked = HashMap::new();
                let mut refusals = 0;
                for i in 0..60 {
                    let cid = format!("p{p}-{i}");
                    let (id, r) = publish_until_acked(addr, &room, &cid, deadline, &refused).await;
                    refusals += r;
                    acked.insert(cid, id);
                }
                (acked, refusals)
            })
        })
        .collect();

    // Let traffic flow, then freeze the server until the node reports it.
    eventually("some messages acked", || async {
        let (_, body) = http_get(addr, &format!("/v1/rooms/{room}/messages?limit=20&user=x")).await;
        json(&body)["messages"]
            .as_array()
            .is_some_and(|m| m.len() >= 20)
    })
    .await;
    signal("-STOP", &pid);
    let frozen = async {
        eventually("readyz red while the store is frozen", || async {
            http_get(addr, "/readyz").await.0 == 503
        })
        .await;
        // Keep it frozen until several sends have been refused.
        eventually("sends refused during the outage", || async {
            refused.load(Ordering::Relaxed) >= 8
        })
        .await;
    };
    // Thaw even if the wait above fails, so the server is never left frozen.
    let outcome = tokio::time::timeout(WAIT, frozen).await;
    signal("-CONT", &pid);
    assert!(outcome.is_ok(), "readyz did not turn red within the wait");
    eventually("readyz green again", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;

    let mut acked = HashMap::new();
    let mut refusals = 0;
    for p in publishers {
        let (a, r) = p.await.expect("publisher");
        acked.extend(a);
        refusals += r;
    }
    assert_eq!(acked.len(), 240);
    assert!(refusals > 0, "the outage refused some sends");

    // Read the store itself: every acked message is there, once, under its acked id.
    let store = ScyllaStore::connect(&ScyllaConfig {
        nodes: cql_nodes(),
        keyspace: keyspace(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
        consistency: scylla::statement::Consistency::LocalQuorum,
        bucket: Duration::from_secs(86_400),
        max_inflight: 4,
        request_timeout: Duration::from_secs(10),
        message_ttl: Duration::ZERO,
    })
    .await
    .expect("connect");
    let rows = store
        .read(
            &RoomId::new(room.clone()).expect("room"),
            HistoryQuery {
                after: Some(MessageId(0)),
                before: None,
                limit: 10_000,
                from: PageFrom::Oldest,
            },
        )
        .await
        .expect("read back");
    let mut by_cid = HashMap::new();
    for m in &rows {
        assert!(
            by_cid.insert(m.cid.to_string(), m.id).is_none(),
            "cid {} stored twice",
            m.cid
        );
    }
    for (cid, id) in &acked {
        assert_eq!(
            by_cid.get(cid),
            Some(id),
            "acked {cid} missing or under another id"
        );
    }
    node.stop().await;
}
