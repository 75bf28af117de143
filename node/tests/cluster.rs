//! The cluster with real processes: a router, three (then four) chat-node processes, the
//! real Redis for membership and the real CQL server. Rooms spread over the nodes; routers
//! agree on every owner; a node joining moves about a quarter of the rooms, and a node
//! killed with SIGKILL loses its rooms to the others, and a node paused (SIGSTOP) past its
//! lease is fenced when it runs again (SIGCONT): it stores nothing it had queued, its
//! clients move to the real owner. In every case clients reconnect through the router,
//! resume with `since`, and no acked message is lost or stored twice, and no client misses
//! a stored message.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{MessageId, ServerFrame};
use support::cluster::*;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_spread_over_nodes_and_routers_agree_on_owners() {
    let c = Cluster::start("spread", 3, 2).await;
    let mut per_node: HashMap<u16, usize> = HashMap::new();
    for i in 0..300 {
        let room = format!("spread-{i}");
        let a = c.owner(c.routers[0].addr, &room).await;
        let b = c.owner(c.routers[1].addr, &room).await;
        assert_eq!(a, b, "routers disagree on {room}");
        *per_node.entry(a).or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "every node owns rooms: {per_node:?}");
    assert!(
        per_node.values().all(|&n| n >= 50),
        "rooms spread: {per_node:?}"
    );
    // Traffic through the router lands on the owner: message ids carry its node id.
    for i in 0..6 {
        let room = format!("spread-{i}");
        let owner = c.owner(c.router(), &room).await;
        let mut client = Client::connect(c.router(), &format!("/ws?room={room}&user=u{i}"))
            .await
            .expect("via router");
        client.expect_joined().await;
        client.send_text(&room, "c1", "hello").await;
        assert_eq!(client.message().await.id.node(), owner);
    }
    // A node asked directly for a room it does not own answers 421 with the owner.
    let room = "spread-0";
    let owner = c.owner(c.router(), room).await;
    let other = c
        .nodes
        .iter()
        .find(|(id, _)| **id != owner)
        .expect("another node")
        .1
        .addr;
    let (status, body) = http_get(other, &format!("/v1/rooms/{room}/messages?user=x")).await;
    assert_eq!(status, 421, "{body}");
    assert_eq!(json(&body)["owner"], c.nodes[&owner].addr.to_string());
    let (status, body) = http_post(
        other,
        &format!("/v1/rooms/{room}/messages?user=x"),
        r#"{"cid":"wrong-node","body":"x"}"#,
    )
    .await;
    assert_eq!(
        status, 201,
        "a publish to a non-owner is forwarded to the owner: {body}"
    );
    let first = json(&body);
    let id: MessageId = first["id"].as_str().expect("id").parse().expect("id");
    assert_eq!(id.node(), owner, "stored by the owner");
    let bus_before = metric(other, "chat_node_bus_published_total").await;
    let (status, body) = http_post(
        other,
        &format!("/v1/rooms/{room}/messages?user=x"),
        r#"{"cid":"wrong-node","body":"x"}"#,
    )
    .await;
    assert_eq!(status, 200, "the retry is a duplicate: {body}");
    assert_eq!(json(&body)["id"], first["id"]);
    assert!(metric(other, "chat_node_bus_published_total").await > bus_before);
    // A publish on the owner itself causes no bus traffic there.
    let owner_addr = c.nodes[&owner].addr;
    let owner_bus = metric(owner_addr, "chat_node_bus_published_total").await;
    let (status, _) = http_post(
        owner_addr,
        &format!("/v1/rooms/{room}/messages?user=x"),
        r#"{"cid":"local","body":"x"}"#,
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(
        metric(owner_addr, "chat_node_bus_published_total").await,
        owner_bus
    );
    let (_, body) = http_get(owner_addr, &format!("/v1/rooms/{room}/messages?user=x")).await;
    let cids = message_fields(&json(&body), "cid");
    assert_eq!(
        cids.iter().filter(|c| *c == "wrong-node").count(),
        1,
        "{cids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_leaves_the_ring_and_closes_clients_with_going_away() {
    let mut c = Cluster::start("term", 3, 1).await;
    let victim = 3u16;
    let mut rooms = Vec::new();
    for i in 0..100 {
        let room = format!("term-{i}");
        if c.owner(c.router(), &room).await == victim {
            rooms.push(room);
        }
        if rooms.len() == 3 {
            break;
        }
    }
    let mut clients = Vec::new();
    for room in &rooms {
        let mut client = Client::joined(c.router(), room, "t").await;
        client.send_text(room, "before", "before SIGTERM").await;
        client.ack().await;
        clients.push(client);
    }
    let pid = c.nodes[&victim].child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    for client in &mut clients {
        assert_eq!(
            client.closed().await,
            1001,
            "shutdown closes with going_away, not room_moved"
        );
    }
    c.wait_ring_size(2).await;
    let status = c
        .nodes
        .get_mut(&victim)
        .expect("victim")
        .child
        .wait()
        .expect("wait");
    assert_eq!(status.code(), Some(0));
    // The rooms are served elsewhere now, with their history.
    for room in &rooms {
        assert_ne!(c.owner(c.router(), room).await, victim);
        let (status, body) = http(
            c.router(),
            "GET",
            &format!("/v1/rooms/{room}/messages?user=x"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(json(&body)["messages"][0]["cid"], "before");
    }
}

/// One member per room sending through the router, reconnecting and resuming as needed.
struct Member {
    room: String,
    next: u32,
    acked: Vec<(String, MessageId)>,
    seen: Vec<MessageId>,
    reconnects: u32,
    /// Reconnects because the connection went silent with a send waiting.
    stalls: u32,
    /// When the last reconnect completed (joined again).
    resumed_at: Option<tokio::time::Instant>,
    /// A connection that answers nothing for this long while a send waits is dead, as a
    /// real client would decide: it reconnects through the router and resends.
    dead_after: Duration,
}

impl Member {
    async fn connect(&mut self, router: SocketAddr) -> Client {
        let since = self
            .seen
            .last()
            .map(|id| format!("&since={id}"))
            .unwrap_or_default();
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut pace = tokio::time::interval(Duration::from_millis(100));
        loop {
            // Right after a change the router may still point at a node that is gone (502)
            // or that has just handed the room over (421): retry until the ring settles.
            match Client::connect(
                router,
                &format!("/ws?room={}&user=m-{}{since}", self.room, self.room),
            )
            .await
            {
                Ok(mut client) => loop {
                    // A connection that dies before `joined` (its node was just killed, so
                    // the router's splice ends with no close frame) is simply retried.
                    let Some(event) = client.try_next().await else {
                        break;
                    };
                    match event {
                        Event::Frame(ServerFrame::Joined { .. }) => return client,
                        Event::Frame(ServerFrame::Presence { .. }) => continue,
                        // The room changed hands between the upgrade and the join (the ring
                        // moved, or the previous owner has not let go yet): reconnect.
                        Event::Frame(ServerFrame::Error { code, .. }) => {
                            assert!(
                                matches!(
                                    code,
                                    common::ErrorCode::RoomMoved
                                        | common::ErrorCode::RoomUnavailable
                                ),
                                "unexpected join refusal {code}"
                            );
                            break;
                        }
                        // Moved again right after joining: reconnect.
                        Event::Close(code) => {
                            assert!(matches!(code, 4001 | 1001), "unexpected close {code}");
                            break;
                        }
                        Event::Frame(f) => panic!("expected joined, got {f:?}"),
                    }
                },
                Err((status, body)) => {
                    assert!(
                        matches!(status, 421 | 502 | 503),
                        "unexpected refusal {status}: {body}"
                    );
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never reconnected",
                self.room
            );
            pace.tick().await;
        }
    }

    /// Sends messages one at a time until `stop`, each acked before the next; a closed
    /// connection is reopened with `since` and the unacked message resent with its cid.
    async fn run(
        mut self,
        router: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
    ) -> Member {
        let mut client = self.connect(router).await;
        // At most 50 sends a second, under the node's default rate limit (100/s).
        let mut pace = tokio::time::interval(Duration::from_millis(20));
        while !stop.is_cancelled() {
            pace.tick().await;
            let cid = format!("c{}", self.next);
            client
                .send_text(&self.room, &cid, &format!("msg {}", self.next))
                .await;
            let acked = loop {
                match tokio::time::timeout(self.dead_after, client.ws.read_frame()).await {
                    Ok(Ok(frame)) if frame.opcode == fastwebsockets::OpCode::Text => {
                        match serde_json::from_slice::<ServerFrame>(&frame.payload).expect("frame")
                        {
                            ServerFrame::Message(m) => self.seen.push(m.id),
                            ServerFrame::Ack { cid: c, id, .. } if c.as_str() == cid => {
                                break Some(id)
                            }
                            ServerFrame::Error { code, .. } => {
                                assert!(
                                    matches!(
                                        code,
                                        common::ErrorCode::RoomMoved
                                            | common::ErrorCode::GoingAway
                                            | common::ErrorCode::RoomUnavailable
                                    ),
                                    "unexpected error {code}"
                                );
                            }
                            _ => {}
                        }
                    }
                    Ok(Ok(frame)) if frame.opcode == fastwebsockets::OpCode::Close => break None,
                    Ok(Ok(_)) => {}
                    Ok(Err(_)) => break None,
                    Err(_) if self.dead_after < WAIT => {
                        self.stalls += 1;
                        break None;
                    }
                    Err(_) => panic!("{}: no answer within the wait", self.room),
                }
            };
            match acked {
                Some(id) => {
                    self.acked.push((cid, id));
                    self.next += 1;
                }
                None => {
                    self.reconnects += 1;
                    client = self.connect(router).await;
                    self.resumed_at = Some(tokio::time::Instant::now());
                }
            }
        }
        self
    }
}

/// Runs members in `rooms` through `change`, then checks every room's history.
async fn churn(
    c: &mut Cluster,
    rooms: &[String],
    change: impl FnOnce(&mut Cluster),
) -> Vec<Member> {
    churn_for(c, rooms, WAIT, 8, change).await
}

/// [`churn`] with members that give up on a silent connection after `dead_after`, and
/// `after` half-seconds of sending after the change.
async fn churn_for(
    c: &mut Cluster,
    rooms: &[String],
    dead_after: Duration,
    after: u32,
    change: impl FnOnce(&mut Cluster),
) -> Vec<Member> {
    let stop = tokio_util::sync::CancellationToken::new();
    let router = c.router();
    let tasks: Vec<_> = rooms
        .iter()
        .map(|room| {
            let m = Member {
                room: room.clone(),
                next: 0,
                acked: Vec::new(),
                seen: Vec::new(),
                reconnects: 0,
                stalls: 0,
                resumed_at: None,
                dead_after,
            };
            tokio::spawn(m.run(router, stop.clone()))
        })
        .collect();
    let mut pace = tokio::time::interval(Duration::from_millis(500));
    pace.tick().await;
    pace.tick().await;
    let changed_at = tokio::time::Instant::now();
    change(c);
    // Keep sending for a while after the change so moved clients resume and carry on.
    for _ in 0..after {
        pace.tick().await;
    }
    stop.cancel();
    let mut members = Vec::new();
    for t in tasks {
        members.push(t.await.expect("member"));
    }
    // A figure for the docs, not an assertion: how long until the last moved client had
    // resumed (printed with --nocapture).
    let moved: Vec<_> = members.iter().filter_map(|m| m.resumed_at).collect();
    if let Some(last) = moved.iter().max() {
        eprintln!(
            "{} of {} clients resumed; the last {:?} after the change",
            moved.len(),
            members.len(),
            last.duration_since(changed_at)
        );
    }
    for m in &members {
        // The whole history, a page at a time.
        let mut stored: Vec<(String, MessageId)> = Vec::new();
        loop {
            let after = stored.last().map_or(0, |(_, id)| id.0);
            let (status, body) = http_get(
                router,
                &format!(
                    "/v1/rooms/{}/messages?after={after}&limit=1000&user=x",
                    m.room
                ),
            )
            .await;
            assert_eq!(status, 200, "{body}");
            let page = json(&body);
            let page: Vec<(String, MessageId)> = message_fields(&page, "cid")
                .into_iter()
                .zip(message_ids(&page))
                .collect();
            let full = page.len() == 1000;
            stored.extend(page);
            if !full {
                break;
            }
        }
        let mut by_cid: HashMap<&String, Vec<MessageId>> = HashMap::new();
        for (cid, id) in &stored {
            by_cid.entry(cid).or_default().push(*id);
        }
        let twice: Vec<String> = by_cid
            .iter()
            .filter(|(_, ids)| ids.len() > 1)
            .map(|(cid, ids)| {
                let ids: Vec<String> = ids
                    .iter()
                    .map(|id| format!("{id} (node {}, at {} ms)", id.node(), id.unix_ms()))
                    .collect();
                format!("{cid}: {}", ids.join(", "))
            })
            .collect();
        assert!(
            twice.is_empty(),
            "{}: cids stored twice: {twice:?}; acked: {:?}",
            m.room,
            m.acked
                .iter()
                .filter(|(c, _)| by_cid.get(c).is_some_and(|ids| ids.len() > 1))
                .collect::<Vec<_>>()
        );
        let stored_map: HashMap<&String, MessageId> =
            stored.iter().map(|(c, id)| (c, *id)).collect();
        for (cid, id) in &m.acked {
            assert_eq!(
                stored_map.get(cid),
                Some(id),
                "{}: acked {cid} lost or re-numbered",
                m.room
            );
        }
        // No gap: the member saw every stored message of its room, in store order. (It may
        // also have seen a message a killed node delivered but never stored; its retry is
        // stored under a new id.)
        let seen: HashSet<MessageId> = m.seen.iter().copied().collect();
        let stored_ids: Vec<MessageId> = stored.iter().map(|(_, id)| *id).collect();
        for id in &stored_ids {
            assert!(
                seen.contains(id),
                "{}: stored {id} never reached the member",
                m.room
            );
        }
        let mut order = Vec::new();
        let mut once = HashSet::new();
        for id in &m.seen {
            if stored_map.values().any(|s| s == id) && once.insert(*id) {
                order.push(*id);
            }
        }
        assert_eq!(order, stored_ids, "{}: reordered", m.room);
        assert!(
            m.acked.len() >= 5,
            "{}: traffic flowed ({} acked)",
            m.room,
            m.acked.len()
        );
    }
    members
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_takes_about_a_quarter_of_the_rooms_and_nothing_acked_is_lost() {
    let mut c = Cluster::start("join", 3, 1).await;
    let rooms: Vec<String> = (0..40).map(|i| format!("join-{i}")).collect();
    let mut before = HashMap::new();
    for r in &rooms {
        before.insert(r.clone(), c.owner(c.router(), r).await);
    }
    let members = churn(&mut c, &rooms, |c| c.add_node(4)).await;
    c.wait_ring_size(4).await;
    let mut moved = 0;
    for m in &members {
        let now = c.owner(c.router(), &m.room).await;
        if now != before[&m.room] {
            moved += 1;
            assert_eq!(now, 4, "{} moved between old nodes", m.room);
            assert!(
                m.reconnects >= 1,
                "{}: moved room's client reconnected",
                m.room
            );
        }
    }
    assert!(
        (4..=18).contains(&moved),
        "about a quarter of 40 rooms moved: {moved}"
    );
}

/// Rooms `<stem>-0` … `<stem>-<n-1>` and the node each is on now.
async fn rooms_and_owners(
    c: &Cluster,
    stem: &str,
    n: usize,
) -> (Vec<String>, HashMap<String, u16>) {
    let rooms: Vec<String> = (0..n).map(|i| format!("{stem}-{i}")).collect();
    let mut owners = HashMap::new();
    for r in &rooms {
        owners.insert(r.clone(), c.owner(c.router(), r).await);
    }
    (rooms, owners)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_loses_its_rooms_and_their_clients_recover() {
    let mut c = Cluster::start("kill", 3, 1).await;
    let (rooms, owners) = rooms_and_owners(&c, "kill", 30).await;
    let victim = 2u16;
    // Its rooms are served again once membership dropped it and its writes are over (TTL
    // plus the store timeout): keep sending long enough after that.
    let members = churn_for(&mut c, &rooms, WAIT, 16, move |c| {
        if let Some(p) = c.nodes.get_mut(&victim) {
            p.kill9();
        }
    })
    .await;
    c.wait_ring_size(2).await;
    for m in &members {
        if owners[&m.room] == victim {
            assert_ne!(c.owner(c.router(), &m.room).await, victim);
            assert!(m.reconnects >= 1, "{}: its client reconnected", m.room);
        }
    }
}

/// A node frozen with SIGSTOP for longer than its lease, while its clients keep sending:
/// they notice the silent connection, reconnect through the router and resend to the
/// interim owner. When the node runs again it finds its lease lapsed before it touches the
/// sends it had queued: nothing of them is stored or acked, its remaining clients are
/// closed with 4001, and it registers again under a new incarnation and takes its rooms
/// back only after the interim owners handed them over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_node_is_fenced_and_its_queued_sends_are_never_stored() {
    let mut c = Cluster::start("pause", 3, 1).await;
    let (rooms, owners) = rooms_and_owners(&c, "pause", 30).await;
    let victim = 2u16;
    let pid = c.nodes[&victim].child.id();
    let members = churn_for(&mut c, &rooms, Duration::from_secs(2), 40, move |_| {
        // The fault itself: the process is frozen for 4 s (the lease is 0.9 s).
        std::thread::spawn(move || {
            signal(pid, "STOP");
            std::thread::sleep(Duration::from_secs(4));
            signal(pid, "CONT");
        });
    })
    .await;
    c.wait_ring_size(3).await;
    let stalled: u32 = members
        .iter()
        .filter(|m| owners[&m.room] == victim)
        .map(|m| m.stalls)
        .sum();
    assert!(stalled >= 1, "clients of the paused node gave up on it");
    let node = c.nodes[&victim].addr;
    let lost = metric(node, "chat_node_lease_lost_total").await;
    assert!(lost >= 1.0, "the paused node counted its lost lease");
    let fenced = metric(node, "chat_node_fenced_total").await;
    eprintln!(
        "paused node: lease lost {lost}, fenced commands {fenced}, stalled clients {stalled}"
    );
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_joins_a_room_owned_by_another_node_through_the_bus() {
    let c = Cluster::start("bridge", 2, 1).await;
    let mut x = None;
    let mut y = None;
    for i in 0..200 {
        let room = format!("bridge-{i}");
        match c.owner(c.router(), &room).await {
            1 if x.is_none() => x = Some(room),
            2 if y.is_none() => y = Some(room),
            _ => {}
        }
    }
    let (x, y) = (x.expect("a room on node 1"), y.expect("a room on node 2"));
    // A lives on node 1 (its first room) and joins Y, owned by node 2, over the socket.
    let mut a = Client::joined(c.router(), &x, "alice").await;
    a.send_join(&y, None).await;
    assert_eq!(a.expect_joined().await, None, "joined Y through the bridge");
    let mut b = Client::joined(c.router(), &y, "bob").await;
    // Bob's messages reach Alice across nodes, in order.
    for i in 0..50 {
        b.send_text(&y, &format!("b{i}"), &format!("from bob {i}"))
            .await;
    }
    let mut last = MessageId(0);
    for i in 0..50 {
        let m = a.message().await;
        assert_eq!(m.room.as_str(), y);
        assert_eq!(m.body, format!("from bob {i}"));
        assert!(m.id > last);
        assert_eq!(m.id.node(), 2, "ordered and stored by the owner");
        last = m.id;
    }
    // Alice's send is acked once durable on the owner, and Bob sees it.
    a.send_text(&y, "a1", "from alice").await;
    let (cid, id, duplicate) = a.ack().await;
    assert_eq!((cid.as_str(), duplicate), ("a1", false));
    assert_eq!(id.node(), 2);
    loop {
        let m = b.message().await;
        if m.cid.as_str() == "a1" {
            assert_eq!(m.id, id);
            break;
        }
    }
    // A retry with the same cid is a duplicate, through the bridge too.
    a.send_text(&y, "a1", "from alice").await;
    assert_eq!(a.ack().await, ("a1".to_string(), id, true));
    // A second connection on node 1 resumes Y with `since` through the bridge.
    let mut a2 = Client::joined(c.router(), &x, "alice2").await;
    a2.send_join(&y, Some(last)).await;
    a2.expect_joined().await;
    let m = a2.message().await;
    assert_eq!(m.id, id, "replayed after `since` with no gap");
    assert!(metric(c.nodes[&1].addr, "chat_node_bus_published_total").await > 0.0);
    assert!(
        metric(c.nodes[&1].addr, "chat_node_bridged_rooms").await >= 2.0,
        "a and a2 bridged"
    );
    assert_metric_at_least(c.nodes[&2].addr, "chat_node_bridge_proxies", 2.0).await;
    // When the bridged connections end, the owner drops their proxies and memberships.
    drop(a);
    drop(a2);
    let owner = c.nodes[&2].addr;
    eventually("proxies dropped on the owner", || async move {
        metric(owner, "chat_node_bridge_proxies").await == 0.0
    })
    .await;
    let requester = c.nodes[&1].addr;
    eventually("bridged rooms forgotten on the requester", || async move {
        metric(requester, "chat_node_bridged_rooms").await == 0.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridged_room_that_changes_owner_moves_its_members_there_without_a_gap() {
    let mut c = Cluster::start("bridgemove", 2, 1).await;
    // Placement depends only on ids and vnodes: find a home room that stays on node 1 and
    // a bridged room that moves from node 2 to node 3 when node 3 joins.
    let info = |id: u16| common::NodeInfo {
        id,
        addr: String::new(),
        started_at_ms: 0,
        incarnation: 0,
    };
    let two = common::Ring::new([info(1), info(2)], common::ring::DEFAULT_VNODES);
    let three = common::Ring::new([info(1), info(2), info(3)], common::ring::DEFAULT_VNODES);
    let rooms: Vec<String> = (0..500).map(|i| format!("bm-{i}")).collect();
    let home = rooms
        .iter()
        .find(|r| two.owner_id(r) == Some(1) && three.owner_id(r) == Some(1))
        .expect("home")
        .clone();
    let y = rooms
        .iter()
        .find(|r| two.owner_id(r) == Some(2) && three.owner_id(r) == Some(3))
        .expect("moving room")
        .clone();
    let target = common::RoomId::new(y.clone()).expect("room");
    let mut a = Client::joined(c.router(), &home, "alice").await;
    a.send(&common::ClientFrame::Join {
        room: target.clone(),
        since: None,
    })
    .await;
    a.expect_joined().await;
    a.send_text(&y, "m1", "before the move").await;
    let (_, first, _) = a.ack().await;
    c.add_node(3);
    c.wait_ring_size(3).await;
    // Meanwhile someone writes to the room on its new owner.
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(100));
    loop {
        let (status, body) = http(
            c.router(),
            "POST",
            &format!("/v1/rooms/{y}/messages?user=bob"),
            Some(r#"{"cid":"m2","body":"after"}"#),
        )
        .await;
        assert!(
            matches!(status, 200 | 201 | 421 | 502 | 503),
            "{status} {body}"
        );
        if matches!(status, 200 | 201) {
            break;
        }
        pace.tick().await;
    }
    // Alice's connection stays open: her node joined her to the new owner from the last
    // message she had, so she gets a `joined` from it, then what she missed, once.
    let mut rejoined = false;
    let m = loop {
        match a.frame_skip_presence().await {
            ServerFrame::Joined { room, .. } if room == target => rejoined = true,
            ServerFrame::Message(m) => break m,
            ServerFrame::Ack { .. } => {}
            f => panic!("unexpected {f:?}"),
        }
    };
    assert!(rejoined, "a joined from the new owner came first");
    assert_eq!((m.cid.as_str(), m.body.as_str()), ("m2", "after"));
    assert_eq!(m.id.node(), 3, "stored by the new owner");
    assert!(m.id > first);
    // Sends on the same connection now go to the new owner.
    a.send_text(&y, "m3", "on the new owner").await;
    let (cid, id, _) = a.ack().await;
    assert_eq!((cid.as_str(), id.node()), ("m3", 3));
    assert_eq!(
        metric(
            c.nodes[&1].addr,
            "chat_node_bridge_moves_total{outcome=\"rejoined\"}"
        )
        .await,
        1.0
    );
}
