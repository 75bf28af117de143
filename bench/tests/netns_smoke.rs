//! The netns harness's partitions are real (`support/netns.rs`): a router and two chat-nodes,
//! each node in its own network namespace, against the real Redis and CQL server.
//!
//! 1. Through the namespaces everything works: both nodes register, a WebSocket client
//!    through the router gets an ack in a room owned by each node, and the history read
//!    through the router returns the message (Redis, CQL and client paths all cross).
//! 2. Cutting node 1's backend link cuts it off Redis and nothing else: its `/readyz` (over
//!    the client link) reports `membership_ok: false`, node 2's stays true, a TCP connect
//!    from node 1's namespace to its Redis relay does not complete (and did before the cut);
//!    healing brings membership back.
//! 3. Cutting node 1's client link cuts it off the root namespace and nothing else: requests
//!    to it do not get through, while it stays registered (the other node and the router
//!    keep it in their rings for several TTLs); healing makes it answer again.
//!
//! It does not judge fencing or ownership across the partitions: that is for the fault
//! tests built on this harness. The whole run is bounded; the cluster is removed on drop,
//! and the test checks that nothing of it is left.

mod support;

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chat_bench::client::{self, Incoming, Reader, Target};
use chat_bench::http::{read_history, HttpClient};
use support::netns::{eventually, http_json, Footprint, NetnsCluster, NetnsOptions};
use support::*;

/// How long a cut or a heal may take to show (the TTL is 1 s; TCP retransmission after a
/// heal can add a few seconds).
const BOUND: Duration = Duration::from_secs(20);
/// The whole scenario, start-up included.
const WHOLE_RUN: Duration = Duration::from_secs(240);
const PROBE: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_cut_exactly_the_link_they_name() {
    let footprint = tokio::time::timeout(WHOLE_RUN, scenario())
        .await
        .unwrap_or_else(|_| panic!("the netns smoke scenario took longer than {WHOLE_RUN:?}"));
    let left = footprint.leftovers();
    assert!(
        left.is_empty(),
        "the dropped cluster left these behind: {left:?}"
    );
}

async fn scenario() -> Footprint {
    let t0 = Instant::now();
    let c = NetnsCluster::start(NetnsOptions::new("smoke", 2, KEYSPACE)).await;
    let footprint = c.footprint();
    println!(
        "started router {} and nodes {:?} in {:?}",
        c.router_addr(),
        c.node_ids()
            .iter()
            .map(|&id| (id, c.node(id).addr, c.node(id).netns.clone()))
            .collect::<Vec<_>>(),
        t0.elapsed()
    );
    paths_work_through_the_namespaces(&c).await;
    backend_cut_is_a_redis_partition(&c).await;
    client_cut_is_a_client_partition(&c).await;
    drop(c);
    println!("whole scenario {:?}", t0.elapsed());
    footprint
}

async fn paths_work_through_the_namespaces(c: &NetnsCluster) {
    let (status, v) = readyz(c.router_addr()).await.expect("router /readyz");
    assert_eq!((status, v["ring_size"].as_u64()), (200, Some(2)), "{v}");
    let target = target(&c.url()).await;
    let ids = c.node_ids();
    for owner in [1, 2] {
        let room = unique_where("nsroom", |r| owner_in_ring(&ids, r) == owner);
        assert_eq!(c.owner(&room).await, owner, "the router's ring disagrees");
        let (cid, id) = send_acked(&target, &room, "netns-user").await;
        let mut http = HttpClient::for_target(&target);
        let deadline = tokio::time::Instant::now() + WAIT;
        let (messages, _) = read_history(&mut http, &room, "user=netns-user", 50, deadline)
            .await
            .expect("history through the router");
        assert!(
            messages.iter().any(|m| m.cid == cid && m.id == id),
            "history of {room} (owner {owner}) lacks {cid}/{id}: {messages:?}"
        );
        println!("node {owner}: room {room} acked and read back {cid} as {id}");
    }
}

async fn backend_cut_is_a_redis_partition(c: &NetnsCluster) {
    let (n1, n2) = (c.node(1).addr, c.node(2).addr);
    let relay = c.node(1).redis_relay;
    c.connect_from_node(1, relay, PROBE)
        .await
        .unwrap_or_else(|e| panic!("before the cut node 1's namespace cannot reach {relay}: {e}"));

    let cut = Instant::now();
    c.cut_backend(1);
    let lost = eventually(BOUND, || membership_ok_is(n1, false)).await;
    assert!(
        lost,
        "node 1 still reports membership_ok within {BOUND:?} of the backend cut"
    );
    println!(
        "backend cut: node 1 membership_ok false after {:?}",
        cut.elapsed()
    );
    let (status, v) = readyz(n2)
        .await
        .expect("node 2 answers during node 1's cut");
    assert_eq!(status, 200, "node 2 is affected by node 1's cut: {v}");
    assert_eq!(v["cluster"]["membership_ok"], true, "{v}");
    match c.connect_from_node(1, relay, PROBE).await {
        Ok(()) => panic!("node 1's namespace still reaches its Redis relay {relay} after the cut"),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            panic!("a refused connect is not a partition ({relay}): {e}")
        }
        Err(e) => println!("backend cut: connect from node 1's namespace to {relay}: {e}"),
    }
    // Redis no longer hears from node 1: its registration runs out like a crashed node's.
    let router = c.router_addr();
    let gone = eventually(BOUND, || ring_size_is(router, 1)).await;
    assert!(
        gone,
        "the router still has node 1 {BOUND:?} after its backend cut"
    );

    let heal = Instant::now();
    c.heal_backend(1);
    let back = eventually(BOUND, || membership_ok_is(n1, true)).await;
    assert!(
        back,
        "node 1's membership did not recover within {BOUND:?} of the heal"
    );
    println!(
        "backend heal: node 1 membership_ok true after {:?}",
        heal.elapsed()
    );
    c.wait_ring_size(2).await;
    println!(
        "backend heal: router ring back to 2 after {:?}",
        heal.elapsed()
    );
}

async fn client_cut_is_a_client_partition(c: &NetnsCluster) {
    let (n1, n2) = (c.node(1).addr, c.node(2).addr);
    let router = c.router_addr();
    c.cut_clients(1);
    match tokio::time::timeout(PROBE, tokio::net::TcpStream::connect(n1)).await {
        Err(_) => println!("client cut: connect to node 1 at {n1} timed out"),
        Ok(Ok(_)) => panic!(
            "node 1 at {n1} accepts connections from the root namespace after its client cut"
        ),
        Ok(Err(e)) => {
            assert_ne!(
                e.kind(),
                ErrorKind::ConnectionRefused,
                "a refused connect is not a partition: {e}"
            );
            println!("client cut: connect to node 1 at {n1}: {e}");
        }
    }
    assert!(
        readyz(n1).await.is_none(),
        "node 1's /readyz answers through a cut client link"
    );
    // Several TTLs: node 1 keeps renewing over its backend link, so every ring keeps it.
    let until = Instant::now() + Duration::from_secs(3);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while Instant::now() < until {
        tick.tick().await;
        let (_, v) = readyz(n2)
            .await
            .expect("node 2 answers during node 1's client cut");
        assert_eq!(
            v["cluster"]["ring_size"].as_u64(),
            Some(2),
            "node 2 lost node 1: {v}"
        );
        let (_, v) = readyz(router).await.expect("the router answers");
        assert_eq!(
            v["ring_size"].as_u64(),
            Some(2),
            "the router lost node 1: {v}"
        );
    }
    let heal = Instant::now();
    c.heal_clients(1);
    let answers = eventually(BOUND, || async {
        readyz(n1).await.is_some_and(|(status, _)| status == 200)
    })
    .await;
    assert!(
        answers,
        "node 1 does not answer within {BOUND:?} of healing its client link"
    );
    println!("client heal: node 1 answers after {:?}", heal.elapsed());
}

async fn readyz(addr: SocketAddr) -> Option<(u16, serde_json::Value)> {
    http_json(addr, "/readyz", PROBE).await
}

async fn membership_ok_is(node: SocketAddr, ok: bool) -> bool {
    readyz(node)
        .await
        .is_some_and(|(_, v)| v["cluster"]["membership_ok"].as_bool() == Some(ok))
}

async fn ring_size_is(router: SocketAddr, n: u64) -> bool {
    readyz(router)
        .await
        .is_some_and(|(_, v)| v["ring_size"].as_u64() == Some(n))
}

/// Joins `room` through `target`, sends one message and returns its cid and acked id;
/// retries what the protocol says to retry (a room between owners right after start-up)
/// until `WAIT`.
async fn send_acked(target: &Target, room: &str, user: &str) -> (String, u64) {
    let cid = unique("cid");
    let deadline = Instant::now() + WAIT;
    let mut last = String::from("nothing yet");
    while Instant::now() < deadline {
        let (rd, mut wr) = match client::connect(target, room, user, PROBE).await {
            Ok(ws) => ws,
            Err(e) => {
                last = format!("connect: {e}");
                pause().await;
                continue;
            }
        };
        let (mut reader, _control) = client::reader(rd);
        match next_of(&mut reader, &["joined", "error"]).await {
            Some(v) if v["type"] == "joined" => {}
            Some(v) if !retryable(&v) => panic!("join of {room} refused: {v}"),
            other => {
                last = format!("join: {other:?}");
                pause().await;
                continue;
            }
        }
        while Instant::now() < deadline {
            let frame = serde_json::json!({
                "type": "send", "room": room, "cid": cid, "body": "through a namespace",
            });
            let mut bytes = frame.to_string().into_bytes();
            if client::send_text(&mut wr, &mut bytes).await.is_err() {
                break;
            }
            match next_of(&mut reader, &["ack", "error"]).await {
                Some(v) if v["type"] == "ack" && v["cid"] == cid.as_str() => {
                    let id = v["id"].as_str().and_then(|s| s.parse().ok());
                    return (cid, id.unwrap_or_else(|| panic!("ack without an id: {v}")));
                }
                Some(v) if v["type"] == "error" && !retryable(&v) => {
                    panic!("send to {room} refused: {v}")
                }
                Some(v) => {
                    last = format!("send: {v}");
                    pause().await;
                }
                None => {
                    last = "send: the connection ended or went quiet".into();
                    break;
                }
            }
        }
        pause().await;
    }
    panic!("no ack for a send to {room} within {WAIT:?}; last: {last}");
}

fn retryable(v: &serde_json::Value) -> bool {
    matches!(
        v["code"].as_str(),
        Some("room_unavailable" | "store_unavailable" | "node_unavailable" | "overloaded")
    )
}

/// A short pause between retries of a refused request (not a readiness wait).
async fn pause() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// The next frame whose `type` is one of `types` (others, e.g. presence, are skipped);
/// `None` when the connection ends or nothing comes for a while.
async fn next_of(reader: &mut Reader, types: &[&str]) -> Option<serde_json::Value> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), reader.next()).await {
            Ok(Ok(Incoming::Data(b))) => {
                let v: serde_json::Value = serde_json::from_slice(&b).ok()?;
                if types.iter().any(|t| v["type"] == *t) {
                    return Some(v);
                }
            }
            Ok(Ok(Incoming::Other)) => {}
            _ => return None,
        }
    }
}
