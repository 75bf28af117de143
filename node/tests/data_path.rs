//! The node's data path over real sockets: ordering, isolation, slow consumers, acks,
//! dedupe, the `since` seam, HTTP publish and history, shutdown and metrics.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use common::{ClientFrame, ErrorCode, MessageId, PresenceEvent, RoomId, ServerFrame};
use support::*;

fn room(s: &str) -> RoomId {
    RoomId::new(s).expect("room")
}

#[tokio::test]
async fn two_clients_exchange_messages_in_order() {
    let node = TestNode::start(config()).await;
    let mut a = node.connect("duo", "alice").await;
    assert_eq!(a.expect_joined().await, None);
    let mut b = node.joined("duo", "bob").await;
    for i in 0..50 {
        let (who, c) = if i % 2 == 0 {
            ("a", &mut a)
        } else {
            ("b", &mut b)
        };
        c.send_text("duo", &format!("{who}{i}"), &format!("hello {i}"))
            .await;
    }
    for c in [&mut a, &mut b] {
        let mut last = MessageId(0);
        let mut bodies = Vec::new();
        for _ in 0..50 {
            let m = c.message().await;
            assert!(m.id > last, "ids increase");
            last = m.id;
            bodies.push(m.body);
        }
        // Each sender's messages arrive in the order sent; both members see one order.
        let a_order: Vec<_> = bodies
            .iter()
            .filter(|b| b.ends_with(['0', '2', '4', '6', '8']))
            .collect();
        let mut sorted = a_order.clone();
        sorted.sort_by_key(|b| b[6..].parse::<u32>().unwrap_or(0));
        assert_eq!(a_order, sorted);
    }
    node.stop().await;
}

#[tokio::test]
async fn members_see_one_order_and_rooms_are_isolated() {
    let node = TestNode::start(config()).await;
    let mut clients = Vec::new();
    for r in 0..3 {
        for u in 0..3 {
            let mut c = node
                .connect(&format!("iso-{r}"), &format!("u{r}-{u}"))
                .await;
            c.expect_joined().await;
            clients.push((r, c));
        }
    }
    for (i, (r, c)) in clients.iter_mut().enumerate() {
        for k in 0..10 {
            c.send_text(
                &format!("iso-{r}"),
                &format!("c{i}-{k}"),
                &format!("room {r} from {i} #{k}"),
            )
            .await;
        }
    }
    let mut orders: Vec<Vec<Vec<MessageId>>> = vec![Vec::new(); 3];
    for (r, c) in clients.iter_mut() {
        let mut ids = Vec::new();
        for _ in 0..30 {
            let m = c.message().await;
            assert_eq!(m.room, room(&format!("iso-{r}")), "message crossed rooms");
            assert!(m.body.starts_with(&format!("room {r} ")), "{}", m.body);
            ids.push(m.id);
        }
        orders[*r].push(ids);
    }
    for per_room in orders {
        assert!(
            per_room.windows(2).all(|w| w[0] == w[1]),
            "members saw different orders"
        );
    }
    node.stop().await;
}

/// User `slow` joined to `room` over a socket with a small receive buffer, so that a
/// reader that stalls fills up quickly.
async fn small_buffered(node: &TestNode, room: &str) -> Client {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(node.addr).await.expect("connect");
    let path = format!("/ws?room={room}&user=slow");
    let mut slow = Client::connect_stream(stream, node.addr, &path)
        .await
        .expect("slow connects");
    slow.expect_joined().await;
    slow
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_the_others_get_everything() {
    let mut config = config_with_rate(NO_LIMIT, NO_LIMIT);
    config.outbound_queue = 16;
    let node = TestNode::start(config).await;
    let mut slow = small_buffered(&node, "slowroom").await;
    let mut readers = Vec::new();
    for i in 0..3 {
        let c = node.joined("slowroom", &format!("fast{i}")).await;
        readers.push(c);
    }
    // Publish over HTTP, four at a time, so the sender itself is no member to fall behind.
    let total = 3000;
    let body = "x".repeat(3000);
    let addr = node.addr;
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let body = body.clone();
            tokio::spawn(async move {
                for i in (p..total).step_by(4) {
                    let payload = format!(r#"{{"cid":"m{i}","body":"{body}"}}"#);
                    let (status, answer) =
                        http_post(addr, "/v1/rooms/slowroom/messages?user=sender", &payload).await;
                    assert_eq!(status, 201, "{answer}");
                }
            })
        })
        .collect();
    let readers: Vec<_> = readers
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut last = MessageId(0);
                for _ in 0..total {
                    let m = c.message().await;
                    assert!(m.id > last);
                    last = m.id;
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.expect("every publish acked");
    }
    for r in readers {
        r.await.expect("reader got every message in order");
    }
    eventually("slow consumer counted", || async {
        metric(node.addr, "chat_node_slow_consumer_disconnects_total").await >= 1.0
    })
    .await;
    // The slow client, reading again after a pause (3 s: longer than the close used to get,
    // within the 10 s write timeout), finds the slow-consumer close code after its messages,
    // not a bare EOF.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(slow.closed().await, 4000);
    node.stop().await;
}

/// A client stalls; its writer blocks; 3 s later its queue fills and it is closed as slow.
/// Reading again 6 s after that (9 s into the stall, past the 8 s write timeout counted from
/// the stall, within it counted from the close), it gets its last batch and then the 4000
/// close frame, not a bare EOF: the close restarts the wait.
#[tokio::test]
async fn a_slow_consumer_that_reads_again_within_the_write_timeout_gets_its_close_frame() {
    let mut config = config();
    config.outbound_queue = 64;
    config.max_body_bytes = 60_000;
    config.write_timeout = Duration::from_secs(8);
    let node = TestNode::start(config).await;
    let mut slow = small_buffered(&node, "stall").await;
    // A reading member tells when the slow one is gone (its presence `leave`); the slow
    // consumer counter is shared by every node of this test binary.
    let mut watcher = node.joined("stall", "watcher").await;
    let (gone_tx, mut gone) = tokio::sync::watch::channel(false);
    let watching = tokio::spawn(async move {
        loop {
            if let ServerFrame::Presence {
                user,
                event: PresenceEvent::Leave,
                ..
            } = watcher.frame().await
            {
                if user.as_str() == "slow" {
                    let _ = gone_tx.send(true);
                    return;
                }
            }
        }
    });
    let body = "x".repeat(60_000);
    let publish = |from: usize, to: usize| {
        let body = body.clone();
        let addr = node.addr;
        async move {
            for i in from..to {
                let payload = format!(r#"{{"cid":"m{i}","body":"{body}"}}"#);
                let (status, answer) =
                    http_post(addr, "/v1/rooms/stall/messages?user=sender", &payload).await;
                assert_eq!(status, 201, "{answer}");
            }
        }
    };
    // 3 MB: more than the sockets buffer, fewer frames than the queue holds.
    publish(0, 50).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!*gone.borrow(), "closed before its queue was full");
    publish(50, 200).await;
    tokio::time::timeout(WAIT, gone.wait_for(|g| *g))
        .await
        .expect("the slow member left within the wait")
        .expect("watcher");
    watching.await.expect("watcher");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut got = 0;
    let code = loop {
        match slow.next().await {
            Event::Frame(ServerFrame::Message(_)) => got += 1,
            Event::Frame(_) => {}
            Event::Close(code) => break code,
        }
    };
    assert_eq!(code, 4000, "after {got} messages");
    node.stop().await;
}

#[tokio::test]
async fn acks_come_once_durable_and_a_resent_cid_is_stored_once() {
    let node = TestNode::start(config()).await;
    let mut a = node.joined("acks", "alice").await;
    let mut b = node.joined("acks", "bob").await;
    a.send_text("acks", "c-1", "first").await;
    let (cid, id, dup) = a.ack().await;
    assert_eq!((cid.as_str(), dup), ("c-1", false));
    // The same cid again, as after a timeout: the same id, flagged duplicate, nothing new.
    a.send_text("acks", "c-1", "first").await;
    let (_, id2, dup2) = a.ack().await;
    assert_eq!((id2, dup2), (id, true));
    // Also after a reconnect.
    drop(a);
    let mut a = node.joined("acks", "alice").await;
    a.send_text("acks", "c-1", "first").await;
    let (_, id3, dup3) = a.ack().await;
    assert_eq!((id3, dup3), (id, true));
    // The same cid from another user is a different message.
    b.send_text("acks", "c-1", "bob's").await;
    let m = b.message().await;
    assert_eq!(m.body, "first");
    let m2 = b.message().await;
    assert_eq!(m2.body, "bob's");
    assert_ne!(m2.id, id);
    let (status, body) = http_get(node.addr, "/v1/rooms/acks/messages?user=alice").await;
    assert_eq!(status, 200);
    let page = json(&body);
    let ids: Vec<_> = messages_of(&page).iter().map(|m| m["id"].clone()).collect();
    assert_eq!(ids.len(), 2, "{body}");
    assert_eq!(ids[0], serde_json::json!(id.to_string()));
    node.stop().await;
}

/// `since` under concurrent sends: the joiner gets every message after `since` exactly
/// once, in order, across the replay/live seam. Run twice: served from the room's recent
/// window, and (window of 4) from the store while live messages keep coming.
async fn since_seam(recent_per_room: usize, room_name: &str) {
    let mut config = config_with_rate(NO_LIMIT, NO_LIMIT);
    config.recent_per_room = recent_per_room;
    let node = TestNode::start(config).await;
    let mut writer = node.joined(room_name, "writer").await;
    for i in 0..100 {
        writer
            .send_text(room_name, &format!("pre{i}"), &format!("pre {i}"))
            .await;
    }
    let mut since = MessageId(0);
    for i in 0..100 {
        let (_, id, _) = writer.ack().await;
        if i == 29 {
            since = id;
        }
    }
    let addr = node.addr;
    let rn = room_name.to_string();
    // Keep sending while the reader joins.
    let writing = tokio::spawn(async move {
        for i in 0..300 {
            writer
                .send_text(&rn, &format!("live{i}"), &format!("live {i}"))
                .await;
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for _ in 0..300 {
            writer.ack().await;
        }
        writer
    });
    let mut reader = Client::connect(
        addr,
        &format!("/ws?room={room_name}&user=reader&since={since}"),
    )
    .await
    .expect("reader connects");
    let head = reader.expect_joined().await.expect("room has a head");
    assert!(head > since);
    let _writer = writing.await.expect("writer");
    let (status, body) = http_get(
        addr,
        &format!("/v1/rooms/{room_name}/messages?after={since}&limit=1000&user=x"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let expected = message_fields(&json(&body), "id");
    assert_eq!(expected.len(), 370, "70 older + 300 live stored");
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    while got.len() < expected.len() {
        let m = reader.message().await;
        assert!(seen.insert(m.id), "duplicate {:?} at the seam", m.id);
        got.push(m.id.to_string());
    }
    assert_eq!(got, expected, "gap or reorder at the seam");
    node.stop().await;
}

#[tokio::test]
async fn since_replays_from_the_recent_window_without_gap_or_duplicate() {
    since_seam(1024, "seam-mem").await;
}

#[tokio::test]
async fn since_replays_from_the_store_without_gap_or_duplicate() {
    since_seam(4, "seam-store").await;
}

#[tokio::test]
async fn join_and_leave_over_the_socket() {
    let node = TestNode::start(config()).await;
    let mut a = node.joined("home", "alice").await;
    a.send(&ClientFrame::Join {
        room: room("second"),
        since: None,
    })
    .await;
    a.expect_joined().await;
    a.send_text("second", "s1", "in second").await;
    assert_eq!(a.message().await.room, room("second"));
    a.send(&ClientFrame::Leave {
        room: room("second"),
    })
    .await;
    loop {
        match a.frame().await {
            ServerFrame::Left { room: r } => {
                assert_eq!(r, room("second"));
                break;
            }
            ServerFrame::Ack { .. } | ServerFrame::Presence { .. } => continue,
            f => panic!("expected left, got {f:?}"),
        }
    }
    a.send_text("second", "s2", "after leaving").await;
    assert_eq!(a.error().await, (ErrorCode::NotJoined, Some("s2".into())));
    node.stop().await;
}

#[tokio::test]
async fn http_publish_acks_once_durable_and_dedupes() {
    let node = TestNode::start(config()).await;
    let mut member = node.joined("api", "watcher").await;
    let publish = || {
        http_post(
            node.addr,
            "/v1/rooms/api/messages?user=bot",
            r#"{"cid":"b1","body":"from a bot"}"#,
        )
    };
    let (status, body) = publish().await;
    assert_eq!(status, 201, "{body}");
    let first = json(&body);
    assert_eq!(first["duplicate"], false);
    let (status, body) = publish().await;
    assert_eq!(status, 200, "{body}");
    let again = json(&body);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["duplicate"], true);
    let m = member.message().await;
    assert_eq!((m.body.as_str(), m.from.as_str()), ("from a bot", "bot"));
    assert_eq!(serde_json::json!(m.id.to_string()), first["id"]);
    // History pages back from `before` and forward from `after`.
    for i in 0..5 {
        let (s, _) = http_post(
            node.addr,
            "/v1/rooms/api/messages?user=bot",
            &format!(r#"{{"cid":"p{i}","body":"{i}"}}"#),
        )
        .await;
        assert_eq!(s, 201);
    }
    let (_, body) = http_get(node.addr, "/v1/rooms/api/messages?limit=2&user=x").await;
    let newest = json(&body);
    let bodies = message_fields(&newest, "body");
    assert_eq!(bodies, vec!["3", "4"]);
    assert_eq!(newest["has_more"], true);
    let oldest_id = newest["messages"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (_, body) = http_get(
        node.addr,
        &format!("/v1/rooms/api/messages?before={oldest_id}&limit=10&user=x"),
    )
    .await;
    let older = json(&body);
    assert_eq!(older["messages"].as_array().expect("arr").len(), 4);
    assert_eq!(older["has_more"], false);
    let (_, body) = http(
        node.addr,
        "GET",
        &format!(
            "/v1/rooms/api/messages?after={}&limit=2&user=x",
            first["id"].as_str().expect("id")
        ),
        None,
    )
    .await;
    let fwd = message_fields(&json(&body), "body");
    assert_eq!(fwd, vec!["0", "1"]);
    node.stop().await;
}

#[tokio::test]
async fn shutdown_closes_clients_with_going_away() {
    let node = TestNode::start(config()).await;
    let mut a = node.joined("bye", "alice").await;
    a.send_text("bye", "last", "before shutdown").await;
    a.ack().await;
    node.shutdown.cancel();
    assert_eq!(a.closed().await, 1001);
    tokio::time::timeout(WAIT, node.task)
        .await
        .expect("node exits within the grace period")
        .expect("task")
        .expect("run");
}

#[tokio::test]
async fn metrics_show_the_traffic() {
    let node = TestNode::start(config()).await;
    let mut a = node.joined("metered", "alice").await;
    for i in 0..5 {
        a.send_text("metered", &format!("m{i}"), "x").await;
    }
    for _ in 0..5 {
        a.ack().await;
    }
    let (status, text) = http_get(node.addr, "/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "chat_node_connections_opened_total",
        "chat_node_messages_received_total{source=\"ws\"}",
        "chat_node_messages_delivered_total",
        "chat_node_ack_seconds_bucket",
        "chat_node_fanout_seconds_bucket",
        "chat_node_rooms_active",
        "chat_node_connections ",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics");
    }
    assert_metric_at_least(
        node.addr,
        "chat_node_messages_received_total{source=\"ws\"}",
        5.0,
    )
    .await;
    assert_metric_at_least(node.addr, "chat_node_messages_delivered_total", 5.0).await;
    let (status, body) = http_get(node.addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["ready"], true);
    let (status, _) = http_get(node.addr, "/healthz").await;
    assert_eq!(status, 200);
    node.stop().await;
}

#[tokio::test]
async fn client_pings_are_answered_with_pongs() {
    use fastwebsockets::{Frame, OpCode, Payload};
    let node = TestNode::start(config()).await;
    let mut c = node.joined("pings", "alice").await;
    c.ws.write_frame(Frame::new(
        true,
        OpCode::Ping,
        None,
        Payload::Borrowed(b"are you there"),
    ))
    .await
    .expect("ping");
    let pong = loop {
        let f = tokio::time::timeout(WAIT, c.ws.read_frame())
            .await
            .expect("answer")
            .expect("frame");
        if f.opcode == OpCode::Pong {
            break f.payload.to_vec();
        }
    };
    assert_eq!(pong, b"are you there");
    node.stop().await;
}

#[tokio::test]
async fn a_ping_frame_is_answered_with_a_pong() {
    let node = TestNode::start(config()).await;
    let mut c = node.joined("ping-room", "alice").await;
    for _ in 0..3 {
        c.send_raw(br#"{"type":"ping"}"#).await;
        assert_eq!(c.frame().await, ServerFrame::Pong);
    }
    node.stop().await;
}
