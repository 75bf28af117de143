//! One grep follows a message: with `CHAT_LOG=debug`, every line a message causes (the
//! reader taking the send, the bridge to the owner, the owner's bus, room, store and ack)
//! names the message's cid and carries the spans of its node, connection and room. Real
//! chat-node processes, a router, the real Redis and CQL server.

mod support;

use common::{ClientFrame, RoomId};
use serde_json::Value;
use support::cluster::*;
use support::*;

/// The JSON log lines of `proc` that mention `needle`.
fn lines_with(proc: &Proc, needle: &str) -> Vec<Value> {
    let log = proc.log.lock().expect("log");
    log.iter()
        .filter(|l| l.contains(needle))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The line whose message is `what`, with the names of the spans it was logged in.
fn find<'a>(lines: &'a [Value], what: &str) -> (&'a Value, Vec<String>) {
    let line = lines
        .iter()
        .find(|l| l["fields"]["message"] == what)
        .unwrap_or_else(|| panic!("no {what:?} line in {lines:#?}"));
    let spans = line["spans"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| s["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    (line, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_grep_for_a_cid_follows_a_bridged_send_through_both_nodes() {
    // The nodes inherit it: the default filter (info) keeps the spans, debug the events.
    std::env::set_var("CHAT_LOG", "debug");
    let c = Cluster::start("logs", 2, 1).await;
    let home = c.room_on("logs-home", 1).await;
    let room = c.room_on("logs-room", 2).await;
    let mut alice = Client::connect(c.nodes[&1].addr, &format!("/ws?room={home}&user=alice"))
        .await
        .expect("connect");
    alice.expect_joined().await;
    alice
        .send(&ClientFrame::Join {
            room: RoomId::new(&room).expect("room"),
            since: None,
        })
        .await;
    alice.expect_joined().await;
    let cid = format!("trace-{}", std::process::id());
    alice.send_text(&room, &cid, "follow me").await;
    let (acked, id, _) = alice.ack().await;
    assert_eq!(acked, cid);

    let (requester, owner) = (&c.nodes[&1], &c.nodes[&2]);
    eventually("the owner logged the ack", || async {
        lines_with(owner, &cid)
            .iter()
            .any(|l| l["fields"]["message"] == "acked")
    })
    .await;

    // The requesting node: the reader took it inside the connection's span, and the bridge
    // sent it on to the owner.
    let mine = lines_with(requester, &cid);
    let (line, spans) = find(&mine, "send received");
    assert_eq!(spans, ["conn"], "{line}");
    assert_eq!(line["spans"][0]["node"], 1, "{line}");
    assert_eq!(line["spans"][0]["user"], "alice", "{line}");
    assert!(line["spans"][0]["conn"].is_u64(), "{line}");
    let (line, _) = find(&mine, "send bridged to the owner");
    assert_eq!(line["fields"]["owner"], 2, "{line}");

    // The owner: its bus took the bridged send, its room accepted it (with the id the
    // client was acked), the store wrote it, and the room acked it, each line in the
    // room's span on node 2.
    let theirs = lines_with(owner, &cid);
    let (line, spans) = find(&theirs, "bridged send received");
    assert_eq!(spans, ["bus"], "{line}");
    assert_eq!(line["spans"][0]["node"], 2, "{line}");
    for what in ["accepted", "stored", "acked"] {
        let (line, spans) = find(&theirs, what);
        assert_eq!(spans, ["room"], "{what}: {line}");
        assert_eq!(line["spans"][0]["room"], room.as_str(), "{what}: {line}");
        assert_eq!(line["spans"][0]["node"], 2, "{what}: {line}");
    }
    let (line, _) = find(&theirs, "accepted");
    assert_eq!(line["fields"]["id"], id.to_string(), "{line}");
}
