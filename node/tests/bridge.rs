//! Bridged rooms cost per node, not per member, and stay exact per member: real chat-node
//! processes, a router, the real Redis and CQL server. Members connect to node 1 with a
//! home room there and join a room that node 2 owns; node 2 sends each frame once to node
//! 1, which fans it out. Judged by what every member received against what a member on the
//! owner received, and by the nodes' bus counters.

mod support;

use common::{ClientFrame, MessageId, RoomId};
use support::cluster::*;
use support::*;

/// Connects to node 1 with a home room there and joins `room` (owned elsewhere) over the
/// socket, with `since`.
async fn bridged(
    c: &Cluster,
    home: &str,
    room: &str,
    user: &str,
    since: Option<MessageId>,
) -> Client {
    let mut m = Client::joined(c.nodes[&1].addr, home, user).await;
    m.send_join(room, since).await;
    m.expect_joined().await;
    m
}

/// Posts `n` messages to `room` on its owner, one after another; returns their ids.
async fn post(owner: std::net::SocketAddr, room: &str, tag: &str, n: usize) -> Vec<MessageId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let body = format!(r#"{{"cid":"{tag}{i}","body":"{tag} {i}"}}"#);
        let (status, answer) = http_post(
            owner,
            &format!("/v1/rooms/{room}/messages?user=poster"),
            &body,
        )
        .await;
        assert_eq!(status, 201, "{answer}");
        ids.push(
            json(&answer)["id"]
                .as_str()
                .expect("id")
                .parse()
                .expect("id"),
        );
    }
    ids
}

/// Two nodes and a router (with `node_args`): `<tag>-home` on node 1, where bridged members
/// connect, and `<tag>-room` on node 2, the room they join through the bridge.
async fn two_rooms(tag: &str, node_args: &[&str]) -> (Cluster, String, String) {
    let c = Cluster::start_with(tag, 2, 1, node_args).await;
    let home = c.room_on(&format!("{tag}-home"), 1).await;
    let room = c.room_on(&format!("{tag}-room"), 2).await;
    (c, home, room)
}

/// Waits until `owner` proxies `n` bridged members (`what` names the wait).
async fn proxies_become(owner: std::net::SocketAddr, n: f64, what: &str) {
    eventually(what, || async move {
        metric(owner, "chat_node_bridge_proxies").await == n
    })
    .await;
}

/// How many bus publishes `owner` makes while `n` messages are [`post`]ed to `room`.
async fn publishes_while_posting(
    owner: std::net::SocketAddr,
    room: &str,
    tag: &str,
    n: usize,
) -> f64 {
    let before = metric(owner, "chat_node_bus_published_total").await;
    post(owner, room, tag, n).await;
    metric(owner, "chat_node_bus_published_total").await - before
}

/// The newest stored message of `room` (0 when it has none), from the owner's history.
async fn newest(owner: std::net::SocketAddr, room: &str) -> u64 {
    let (status, body) = http_get(
        owner,
        &format!("/v1/rooms/{room}/messages?user=probe&limit=1"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    json(&body)["messages"][0]["id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or(0)
}

/// Reads messages of `room` until `n` have arrived; fails on a duplicate or a step back.
async fn read_ids(m: &mut Client, room: &str, n: usize) -> Vec<MessageId> {
    let mut ids: Vec<MessageId> = Vec::with_capacity(n);
    while ids.len() < n {
        let msg = m.message().await;
        if msg.room.as_str() != room {
            continue;
        }
        if let Some(last) = ids.last() {
            assert!(
                msg.id > *last,
                "in order, no duplicate: {} after {last}",
                msg.id
            );
        }
        ids.push(msg.id);
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_bridged_members_on_one_node_cost_one_publish_per_frame() {
    let (c, home, room) = two_rooms("fifty", &["--presence", "false"]).await;
    let mut members = Vec::new();
    for i in 0..50 {
        members.push(bridged(&c, &home, &room, &format!("m{i}"), None).await);
    }
    let owner = c.nodes[&2].addr;
    proxies_become(owner, 50.0, "50 proxies on the owner").await;
    let published = metric(owner, "chat_node_bus_published_total").await;
    let received = metric(c.nodes[&1].addr, "chat_node_bus_received_total").await;
    let readers: Vec<_> = members
        .into_iter()
        .map(|mut m| {
            let room = room.clone();
            tokio::spawn(async move { read_ids(&mut m, &room, 40).await })
        })
        .collect();
    // One at a time (each waits for its 201), so no batching can hide a publish per member.
    let sent = post(owner, &room, "f", 40).await;
    for r in readers {
        assert_eq!(
            r.await.expect("reader"),
            sent,
            "every member got every message, in order"
        );
    }
    let published = metric(owner, "chat_node_bus_published_total").await - published;
    let received = metric(c.nodes[&1].addr, "chat_node_bus_received_total").await - received;
    // 40 frames, one publish each (the per-member design published 2,000). Besides: the
    // last joins' `follow` markers may still be on their way when the count starts, and an
    // idle link's heartbeat may fall in the window.
    assert!(
        published <= 44.0,
        "{published} publishes for 40 frames to 50 members"
    );
    assert!(
        received <= 44.0,
        "{received} bus messages on the members' node"
    );
    assert!(published >= 1.0);
    assert_eq!(
        metric(c.nodes[&1].addr, "chat_node_bridge_resets_total").await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridged_members_joining_with_since_mid_stream_see_no_gap_and_no_duplicate() {
    // A small recent window, so most joins are served from the store while live frames
    // wait for the member on the owner: the seam is the owner's, through the stream.
    let (c, home, room) = two_rooms("seam", &["--recent-per-room", "20"]).await;
    let owner = c.nodes[&2].addr;
    let mut reference = Client::joined(owner, &room, "ref").await;
    let before = post(owner, &room, "a", 60).await;
    let poster = {
        let room = room.clone();
        tokio::spawn(async move { post(owner, &room, "b", 240).await })
    };
    // Join while messages flow, each from a different point: deep in the store, at the
    // window's edge, inside it, and at the newest id seen.
    let mut joiners = Vec::new();
    for (i, since) in [before[0], before[30], before[45], before[59]]
        .into_iter()
        .enumerate()
    {
        joiners.push((
            since,
            bridged(&c, &home, &room, &format!("j{i}"), Some(since)).await,
        ));
        // The next joiner comes in after more of the stream has been stored (or all of it).
        let stored_now = newest(owner, &room).await;
        eventually("more messages stored before the next join", || {
            let room = room.clone();
            let done = poster.is_finished();
            async move { done || newest(owner, &room).await > stored_now }
        })
        .await;
    }
    let after = poster.await.expect("poster");
    let all: Vec<MessageId> = before.iter().chain(after.iter()).copied().collect();
    assert_eq!(read_ids(&mut reference, &room, all.len()).await, all);
    for (since, mut j) in joiners {
        let expected: Vec<MessageId> = all.iter().copied().filter(|id| *id > since).collect();
        let got = read_ids(&mut j, &room, expected.len()).await;
        assert_eq!(
            got, expected,
            "joined after {since}: every later message once, in order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_bridged_member_is_closed_without_hurting_its_neighbours() {
    let (c, home, room) = two_rooms(
        "slow",
        &[
            "--outbound-queue",
            "64",
            "--send-rate",
            "100000",
            "--send-burst",
            "100000",
            "--presence",
            "false",
        ],
    )
    .await;
    let requester = c.nodes[&1].addr;
    // A small receive buffer, and it never reads.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let stream = socket.connect(requester).await.expect("connect");
    let mut slow = Client::connect_stream(stream, requester, &format!("/ws?room={home}&user=slow"))
        .await
        .expect("slow");
    slow.expect_joined().await;
    slow.send_join(&room, None).await;
    slow.expect_joined().await;
    let mut fast = Vec::new();
    for i in 0..2 {
        fast.push(bridged(&c, &home, &room, &format!("fast{i}"), None).await);
    }
    let owner = c.nodes[&2].addr;
    let local = Client::joined(owner, &room, "local").await;
    fast.push(local);
    let total = 1500;
    let body = "x".repeat(3000);
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (body, room) = (body.clone(), room.clone());
            tokio::spawn(async move {
                for i in (p..total).step_by(4) {
                    let payload = format!(r#"{{"cid":"m{i}","body":"{body}"}}"#);
                    let path = format!("/v1/rooms/{room}/messages?user=sender");
                    let (status, answer) = http_post(owner, &path, &payload).await;
                    assert_eq!(status, 201, "{answer}");
                }
            })
        })
        .collect();
    let readers: Vec<_> = fast
        .into_iter()
        .map(|mut m| {
            let room = room.clone();
            tokio::spawn(async move { read_ids(&mut m, &room, total).await.len() })
        })
        .collect();
    for p in publishers {
        p.await.expect("every publish acked");
    }
    for r in readers {
        assert_eq!(r.await.expect("reader"), total);
    }
    eventually("the slow member closed on its own node", || async move {
        metric(requester, "chat_node_slow_consumer_disconnects_total").await >= 1.0
    })
    .await;
    assert_eq!(
        slow.closed().await,
        4000,
        "the slow-consumer close code reaches it"
    );
    // Its neighbours were never at risk: the link between the nodes was not reset.
    assert_eq!(
        metric(requester, "chat_node_bridge_resets_total").await,
        0.0
    );
    assert_eq!(metric(owner, "chat_node_bridge_resets_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interest_ends_when_the_last_member_leaves_and_when_its_node_exits() {
    let (mut c, home, room) = two_rooms("interest", &["--presence", "false"]).await;
    let owner = c.nodes[&2].addr;
    let target = RoomId::new(room.clone()).expect("room");
    let mut members = Vec::new();
    for i in 0..5 {
        members.push(bridged(&c, &home, &room, &format!("m{i}"), None).await);
    }
    post(owner, &room, "x", 3).await;
    for m in &mut members {
        read_ids(m, &room, 3).await;
        m.send(&ClientFrame::Leave {
            room: target.clone(),
        })
        .await;
        assert!(matches!(
            m.frame_skip_presence().await,
            common::ServerFrame::Left { .. }
        ));
    }
    proxies_become(owner, 0.0, "no proxies left on the owner").await;
    let published = publishes_while_posting(owner, &room, "y", 20).await;
    assert!(
        published <= 1.0,
        "{published} publishes for a room with no remote members"
    );

    // Members again, then their node exits: the owner forgets them when it leaves the ring.
    for i in 0..5 {
        members.push(bridged(&c, &home, &room, &format!("n{i}"), None).await);
    }
    proxies_become(owner, 5.0, "proxies again").await;
    c.nodes.get_mut(&1).expect("node 1").kill9();
    proxies_become(owner, 0.0, "proxies of the departed node dropped").await;
    let published = publishes_while_posting(owner, &room, "z", 20).await;
    assert!(
        published <= 1.0,
        "{published} publishes after the members' node exited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_bridges_again_without_resetting_its_new_members() {
    let (mut c, home, room) = two_rooms("restart", &["--presence", "false"]).await;
    let owner = c.nodes[&2].addr;
    // The owner's link to node 1 gets going (and numbered) with a first process there.
    let mut before = bridged(&c, &home, &room, "before", None).await;
    post(owner, &room, "a", 5).await;
    read_ids(&mut before, &room, 5).await;
    // Killed and started again at once on its address, as a supervisor does: the owner
    // never sees it leave the ring.
    let addr = c.nodes[&1].addr.to_string();
    c.nodes.get_mut(&1).expect("node 1").kill9();
    c.add_node_at(1, &addr);
    c.wait_ring_size(2).await;
    // A member of the new process: the owner's link is older than it, which must not read
    // as a lost batch (that would close this member with 4002).
    let mut after = bridged(&c, &home, &room, "after", None).await;
    let sent = post(owner, &room, "b", 5).await;
    assert_eq!(read_ids(&mut after, &room, 5).await, sent);
    let requester = c.nodes[&1].addr;
    assert_eq!(
        metric(requester, "chat_node_bridge_resets_total{reason=\"gap\"}").await,
        0.0
    );
}
