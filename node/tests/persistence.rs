//! Messages live in the real CQL store: they survive a node restart, `since` replays them
//! from the store on the new node, and a retried cid is still recognised there.

mod support;

use support::*;

#[tokio::test]
async fn messages_history_and_dedupe_survive_a_node_restart() {
    let room = format!("restart-{}", std::process::id());
    let node = TestNode::start(config()).await;
    let mut c = node.joined(&room, "alice").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        c.send_text(&room, &format!("r{i}"), &format!("before restart {i}"))
            .await;
    }
    for _ in 0..20 {
        ids.push(c.ack().await.1);
    }
    drop(c);
    node.stop().await;

    // A new process-level node (different node id) on the same keyspace.
    let mut cfg = config();
    cfg.node_id = 7;
    let node = TestNode::start(cfg).await;
    let (status, body) = http_get(
        node.addr,
        &format!("/v1/rooms/{room}/messages?limit=100&user=x"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stored = message_ids(&json(&body));
    assert_eq!(stored, ids);

    let mut c = Client::connect(
        node.addr,
        &format!("/ws?room={room}&user=alice&since={}", ids[4]),
    )
    .await
    .expect("reconnect");
    assert_eq!(
        c.expect_joined().await,
        Some(ids[19]),
        "head restored from the store"
    );
    for want in &ids[5..] {
        assert_eq!(c.message().await.id, *want);
    }
    // The retry of an acked cid, after the restart, is the same message.
    c.send_text(&room, "r3", "before restart 3").await;
    let (cid, id, duplicate) = c.ack().await;
    assert_eq!((cid.as_str(), id, duplicate), ("r3", ids[3], true));
    // New messages continue after the old ones, with the new node's id.
    c.send_text(&room, "after", "after restart").await;
    let m = c.message().await;
    assert!(m.id > ids[19]);
    assert_eq!(m.id.node(), 7);
    node.stop().await;
}
