//! Rooms follow their members: an empty room's task ends after the idle timeout, so
//! memory tracks live rooms. Its own test binary, because the rooms gauge is
//! process-wide and other tests would move it.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn idle_empty_rooms_are_dropped_and_come_back_with_their_history() {
    let mut config = config();
    config.room_idle_timeout = Duration::from_millis(200);
    let node = TestNode::start(config).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let mut c = node.joined(&format!("life-{i}"), "u").await;
        c.send_text(&format!("life-{i}"), "c1", "remember me").await;
        c.ack().await;
        clients.push(c);
    }
    assert_eq!(metric(node.addr, "chat_node_rooms_active").await, 5.0);
    drop(clients);
    eventually("every room dropped", || async {
        metric(node.addr, "chat_node_rooms_active").await == 0.0
    })
    .await;
    // A new owner task starts on demand, with the room's head and dedupe state restored.
    let mut c = node.connect("life-0", "u").await;
    let head = c.expect_joined().await;
    assert!(head.is_some(), "head restored from the store");
    c.send_text("life-0", "c1", "remember me").await;
    let (_, id, duplicate) = c.ack().await;
    assert!(duplicate, "cid remembered across the room's restart");
    assert_eq!(Some(id), head);
    node.stop().await;
}
