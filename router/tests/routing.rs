//! The router's own answers against the real Redis, without nodes behind it: owner lookups
//! that match `Ring::owner` and agree between routers, an unreachable or silent owner, an
//! empty ring, and bad input.

mod support;

use std::time::{Duration, Instant};

use common::NodeInfo;
use support::*;

fn member(id: u16, addr: &str) -> NodeInfo {
    NodeInfo {
        id,
        addr: addr.to_string(),
        started_at_ms: common::id::now_ms(),
        incarnation: 0,
    }
}

/// An address on this machine where nothing listens: a socket bound but never listening,
/// so connections are refused and no other process can take the port while it lives.
struct DeadAddr {
    _socket: tokio::net::TcpSocket,
    addr: String,
}

fn dead_addr() -> DeadAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.1:0".parse().expect("addr"))
        .expect("bind");
    let addr = socket.local_addr().expect("addr").to_string();
    DeadAddr {
        _socket: socket,
        addr,
    }
}

#[tokio::test]
async fn owners_match_the_ring_and_two_routers_agree() {
    let prefix = unique("t-router");
    // /owner never contacts the node: the addresses only have to be distinct.
    let dead = [dead_addr(), dead_addr(), dead_addr()];
    let members = [
        member(1, &dead[0].addr),
        member(2, &dead[1].addr),
        member(3, &dead[2].addr),
    ];
    let mut regs = Vec::new();
    for m in &members {
        regs.push(register(&prefix, m.clone()).await);
    }
    let a = TestRouter::start(TestRouter::config(&prefix)).await;
    let b = TestRouter::start(TestRouter::config(&prefix)).await;
    a.wait_ring(3).await;
    b.wait_ring(3).await;

    let check = |ring: common::Ring, rooms: usize| {
        let (a, b) = (a.addr, b.addr);
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..rooms {
                let room = format!("owner-room-{i}");
                let path = format!("/v1/rooms/{room}/owner");
                let (ra, rb) = (
                    http(a, "GET", &path, None).await,
                    http(b, "GET", &path, None).await,
                );
                assert_eq!(ra.status, 200, "{}", ra.body);
                assert_eq!(ra.json(), rb.json(), "routers disagree on {room}");
                let want = ring.owner(&room).expect("owner");
                let got = ra.json();
                assert_eq!(got["room"], room.as_str());
                assert_eq!(got["node"]["id"], want.id);
                assert_eq!(got["node"]["addr"], want.addr.as_str());
                assert_eq!(got["ring_version"], ring.version().to_string());
                assert_eq!(got["ring_size"], ring.len());
                seen.insert(want.id);
            }
            seen.len()
        }
    };
    // As registered: each with the incarnation its registration gave it.
    let registered: Vec<NodeInfo> = regs.iter().map(|r| r.me().clone()).collect();
    let spread = check(expected_ring(&registered), 300).await;
    assert_eq!(spread, 3, "300 rooms should land on all three nodes");

    // A member leaves: both routers follow, and still agree with the ring.
    let leaving = regs.pop().expect("member 3");
    leaving.leave(true).await;
    a.wait_ring(2).await;
    b.wait_ring(2).await;
    check(expected_ring(&registered[..2]), 100).await;
    assert_metric_at_least(a.addr, "chat_router_ring_changes_total", 1.0).await;
}

#[tokio::test]
async fn an_unreachable_owner_gets_a_502_at_once() {
    let prefix = unique("t-router");
    let dead = dead_addr();
    let _reg = register(&prefix, member(7, &dead.addr)).await;
    let router = TestRouter::start(TestRouter::config(&prefix)).await;
    router.wait_ring(1).await;

    for (method, path) in [
        ("GET", "/ws?room=lost&user=alice"),
        ("GET", "/v1/rooms/lost/messages?user=alice"),
        ("POST", "/v1/rooms/lost/messages?user=alice"),
    ] {
        let started = Instant::now();
        let body = (method == "POST").then_some(r#"{"cid": "c", "body": "b"}"#);
        let r = http(router.addr, method, path, body).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert_eq!(r.json()["code"], "node_unavailable");
        assert_eq!(r.json()["retry"], "retry_later");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    // A real WebSocket client sees the same refusal.
    let Err((status, _)) = Client::connect(router.addr, "/ws?room=lost&user=alice").await else {
        panic!("upgrade through a dead owner succeeded");
    };
    assert_eq!(status, 502);
    assert_metric_at_least(
        router.addr,
        "chat_router_upstream_errors_total{kind=\"connect\"}",
        3.0,
    )
    .await;
}

#[tokio::test]
async fn a_silent_owner_times_out_into_a_502() {
    // Accepts connections and never answers: a hung node.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr").to_string();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let prefix = unique("t-router");
    let _reg = register(&prefix, member(8, &addr)).await;
    let mut config = TestRouter::config(&prefix);
    config.upstream_timeout = Duration::from_millis(300);
    let router = TestRouter::start(config).await;
    router.wait_ring(1).await;

    for path in [
        "/ws?room=hung&user=alice",
        "/v1/rooms/hung/messages?user=alice",
    ] {
        let started = Instant::now();
        let r = http(router.addr, "GET", path, None).await;
        assert!(started.elapsed() < Duration::from_secs(5), "{path} hung");
        assert_eq!(r.status, 502, "{path}: {}", r.body);
        assert_eq!(r.json()["code"], "node_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    assert_metric_at_least(
        router.addr,
        "chat_router_upstream_errors_total{kind=\"timeout\"}",
        2.0,
    )
    .await;
    hold.abort();
}

#[tokio::test]
async fn an_empty_ring_answers_503_and_readyz_is_red_until_a_node_joins() {
    let prefix = unique("t-router");
    let router = TestRouter::start(TestRouter::config(&prefix)).await;
    let addr = router.addr;
    eventually("readyz reports redis reachable", || async move {
        let r = http(addr, "GET", "/readyz", None).await;
        r.status == 503 && r.json()["redis_ok"] == true
    })
    .await;
    let r = http(addr, "GET", "/readyz", None).await;
    assert_eq!(r.json()["ready"], false);
    assert_eq!(r.json()["ring_size"], 0);

    for path in [
        "/ws?room=nobody&user=alice",
        "/v1/rooms/nobody/owner",
        "/v1/rooms/nobody/messages?user=alice",
    ] {
        let r = http(addr, "GET", path, None).await;
        assert_eq!(r.status, 503, "{path}: {}", r.body);
        assert_eq!(r.json()["code"], "node_unavailable");
        assert_eq!(r.header("retry-after"), Some("1"));
    }
    let Err((status, _)) = Client::connect(addr, "/ws?room=nobody&user=alice").await else {
        panic!("upgrade with no node succeeded");
    };
    assert_eq!(status, 503);

    let dead = dead_addr();
    let reg = register(&prefix, member(9, &dead.addr)).await;
    router.wait_ring(1).await;
    assert_eq!(http(addr, "GET", "/readyz", None).await.status, 200);
    assert_eq!(metric(addr, "chat_router_ready").await, 1.0);
    reg.leave(true).await;
    eventually("readyz red again after the last node left", || async move {
        http(addr, "GET", "/readyz", None).await.status == 503
    })
    .await;
}

#[tokio::test]
async fn bad_input_gets_a_clear_json_answer() {
    let prefix = unique("t-router");
    let router = TestRouter::start(TestRouter::config(&prefix)).await;
    let addr = router.addr;
    let long = "r".repeat(129);
    for (method, path, status, code) in [
        ("GET", "/ws".to_string(), 400, "invalid_field"),
        ("GET", "/ws?room=".to_string(), 400, "invalid_field"),
        (
            "GET",
            "/ws?room=bad%20room".to_string(),
            400,
            "invalid_field",
        ),
        ("GET", format!("/ws?room={long}"), 400, "invalid_field"),
        (
            "GET",
            "/v1/rooms/b%21d/owner".to_string(),
            400,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/rooms/b%21d/messages".to_string(),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/rooms/b%21d/messages".to_string(),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/rooms/ok/owner".to_string(),
            405,
            "method_not_allowed",
        ),
        ("POST", "/healthz".to_string(), 405, "method_not_allowed"),
        ("GET", "/nope".to_string(), 404, "not_found"),
        ("GET", "/demo/index.html".to_string(), 404, "not_found"),
        ("GET", "/v1/rooms/ok".to_string(), 404, "not_found"),
    ] {
        let r = http(addr, method, &path, None).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["code"], code, "{method} {path}");
        assert_eq!(
            r.header("content-type"),
            Some("application/json"),
            "{method} {path}"
        );
    }
    let Err((status, body)) = Client::connect(addr, "/ws?room=no%20spaces&user=a").await else {
        panic!("bad room accepted");
    };
    assert_eq!(status, 400, "{body}");
    // Not HTTP, and a head past 16 KiB: a status with the JSON body, then a close.
    for (request, status) in [
        (b"\x16\x03\x01 not http\r\n\r\n".to_vec(), "400"),
        (
            format!(
                "GET /ws?room=r HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(200_000)
            )
            .into_bytes(),
            "431",
        ),
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(&request).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer:.200}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(body["code"], "invalid_field");
    }
    assert_eq!(http(addr, "GET", "/healthz", None).await.status, 200);
    let metrics = http(addr, "GET", "/metrics", None).await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("chat_router_http_requests_total"));
    assert!(metrics.body.contains("chat_router_request_seconds_bucket"));
    assert!(metrics.body.contains("process_resident_memory_bytes"));
}
