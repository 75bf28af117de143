//! Redis going away and coming back, with two nodes: forwarded publishes get a clear
//! `node_unavailable` (never a fake ack, never a hang), rooms keep working on their owner,
//! `/readyz` reports the bus, and after Redis restarts the bus resubscribes by itself and
//! forwarding works again without a node restart. Its own test binary: it restarts the
//! local Redis that `deploy/local/test.sh` started.

mod support;

use std::net::SocketAddr;
use std::process::Command;

use common::{MessageId, Ring};
use support::*;

const SERVERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/local/servers.sh");

fn spawn_node(id: u16, prefix: &str) -> Proc {
    let redis = std::env::var("CHAT_REDIS_URL").expect("CHAT_REDIS_URL: run deploy/local/test.sh");
    let mut cmd = node_command();
    cmd.args(["--listen", "127.0.0.1:0", "--insecure-dev-auth"])
        .args(["--node-id", &id.to_string()])
        .args(["--redis-url", &redis, "--redis-prefix", prefix])
        // Long enough that the outage below expires no membership.
        .args(["--membership-ttl", "30s", "--store-timeout", "1s"]);
    Proc::spawn(&mut cmd, &format!("chat-node {id}"))
}

fn servers(cmd: &str) {
    let ok = Command::new("bash")
        .args([SERVERS, cmd, "redis"])
        .status()
        .expect("servers.sh")
        .success();
    assert!(ok, "servers.sh {cmd} redis");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_fails_forwarded_sends_clearly_and_the_bus_recovers() {
    assert!(
        std::env::var("CHAT_REDIS_PID").is_ok(),
        "CHAT_REDIS_PID is not set: this test restarts the local Redis; run deploy/local/test.sh"
    );
    fresh_keyspace().await;
    let prefix = format!("t-bus-{}", std::process::id());
    let a = spawn_node(1, &prefix);
    let b = spawn_node(2, &prefix);
    for n in [&a, &b] {
        let addr = n.addr;
        eventually("both nodes in the ring", || async move {
            let (s, body) = http_get(addr, "/readyz").await;
            s == 200 && json(&body)["cluster"]["ring_size"] == 2
        })
        .await;
    }
    let ring = Ring::new(
        [a.addr, b.addr]
            .iter()
            .enumerate()
            .map(|(i, addr)| common::NodeInfo {
                id: i as u16 + 1,
                addr: addr.to_string(),
                started_at_ms: 0,
                incarnation: 0,
            }),
        common::ring::DEFAULT_VNODES,
    );
    let room = (0..100)
        .map(|i| format!("bus-{i}"))
        .find(|r| ring.owner_id(r) == Some(2))
        .expect("a room on node 2");
    let publish = |addr: SocketAddr, cid: &'static str| {
        let room = room.clone();
        async move {
            http_post(
                addr,
                &format!("/v1/rooms/{room}/messages?user=x"),
                &format!(r#"{{"cid":"{cid}","body":"b"}}"#),
            )
            .await
        }
    };
    let home = (0..100)
        .map(|i| format!("home-{i}"))
        .find(|r| ring.owner_id(r) == Some(1))
        .expect("a room on node 1");
    // Forwarded through the bus: node 1 does not own the room.
    let (status, body) = publish(a.addr, "before").await;
    assert_eq!(status, 201, "{body}");
    let before: MessageId = json(&body)["id"].as_str().expect("id").parse().expect("id");
    // A member on node 1 bridged into the room on node 2.
    let mut member = Client::joined(a.addr, &home, "m").await;
    let target = common::RoomId::new(room.clone()).expect("room");
    member
        .send(&common::ClientFrame::Join {
            room: target.clone(),
            since: None,
        })
        .await;
    member.expect_joined().await;

    servers("stop");
    // The bridge may have missed frames: its connection is closed to resume.
    assert_eq!(member.closed().await, 4002);
    eventually("node 1 reports the bus down", || async {
        let (_, body) = http_get(a.addr, "/readyz").await;
        json(&body)["bus"]["ok"] == false
    })
    .await;
    let (status, body) = publish(a.addr, "during").await;
    assert_eq!(status, 503, "a clear error, not an ack: {body}");
    assert_eq!(json(&body)["code"], "node_unavailable");
    // The owner keeps serving its room without Redis.
    let (status, body) = publish(b.addr, "local-during").await;
    assert_eq!(status, 201, "{body}");

    servers("start");
    eventually("node 1's bus resubscribed", || async {
        let (_, body) = http_get(a.addr, "/readyz").await;
        json(&body)["bus"]["ok"] == true
    })
    .await;
    assert_metric_at_least(a.addr, "chat_node_bus_reconnects_total", 1.0).await;
    // Node 2 must be subscribed again too before forwarding can reach it.
    // 201, or 200 if an earlier attempt was stored but its reply was lost.
    eventually("forwarding works again", || async {
        matches!(publish(a.addr, "during").await.0, 200 | 201)
    })
    .await;
    let (_, body) = http_get(b.addr, &format!("/v1/rooms/{room}/messages?user=x")).await;
    let page = json(&body);
    let cids = message_fields(&page, "cid");
    assert_eq!(cids, vec!["before", "local-during", "during"]);
    let ids = message_ids(&page);
    assert!(ids.iter().all(|id| id.node() == 2));
    // The bridged member rejoins with `since` and catches up on what it missed.
    let mut member = Client::joined(a.addr, &home, "m").await;
    member
        .send(&common::ClientFrame::Join {
            room: target,
            since: Some(before),
        })
        .await;
    member.expect_joined().await;
    assert_eq!(member.message().await.id, ids[1], "caught up: local-during");
    assert_eq!(member.message().await.id, ids[2], "caught up: during");
}
