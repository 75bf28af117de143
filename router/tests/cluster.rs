//! The router in front of real chat-node processes (real CQL store, membership in the real
//! Redis): WebSockets proxied end to end to each room's owner, 307 redirects that lead to
//! it, the room API forwarded, the owner's refusals relayed, and splices cut at shutdown.

mod support;

use std::time::Duration;

use support::*;

#[tokio::test]
async fn websockets_through_the_router_reach_each_rooms_owner() {
    let prefix = unique("t-router");
    let n1 = spawn_node(101, &prefix).await;
    let n2 = spawn_node(102, &prefix).await;
    let router = TestRouter::start(TestRouter::config(&prefix)).await;
    router.wait_ring(2).await;
    let ring = expected_ring(&[n1.info(), n2.info()]);

    for owner in [101u16, 102] {
        let room = room_owned_by(&ring, owner, "ws");
        let owner_answer = http(router.addr, "GET", &format!("/v1/rooms/{room}/owner"), None).await;
        assert_eq!(owner_answer.status, 200, "{}", owner_answer.body);
        assert_eq!(owner_answer.json()["node"]["id"], owner);

        let mut alice = Client::join(router.addr, &room, "alice").await;
        let mut bob = Client::join(router.addr, &room, "bob").await;
        alice
            .send_text(&room, "a1", "hello through the router")
            .await;
        let (cid, id, _) = alice.ack().await;
        assert_eq!(cid, "a1");
        assert_eq!(
            id.node(),
            owner,
            "the message was minted by the room's owner"
        );
        let m = bob.message().await;
        assert_eq!(m.id, id);
        assert_eq!(m.body, "hello through the router");
        assert_eq!(m.from.as_str(), "alice");
        bob.send_text(&room, "b1", "and back").await;
        let m = alice.message().await;
        assert_eq!(m.body, "and back");
        assert_eq!(m.id.node(), owner);
        assert!(m.id > id, "one order in the room");
    }

    // The owner's refusal reaches the client unchanged: no user with dev auth is a 401.
    let room = room_owned_by(&ring, 101, "refused");
    let Err((status, body)) = Client::connect(router.addr, &format!("/ws?room={room}")).await
    else {
        panic!("an upgrade without a user was accepted");
    };
    assert_eq!(status, 401, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON refusal");
    assert_eq!(body["code"], "unauthorized");

    for (name, min) in [
        ("chat_router_ws_connections_opened_total", 4.0),
        // Whole bytes: at least one means some were proxied each way.
        (
            "chat_router_proxied_bytes_total{direction=\"client_to_node\"}",
            1.0,
        ),
        (
            "chat_router_proxied_bytes_total{direction=\"node_to_client\"}",
            1.0,
        ),
        ("chat_router_ring_nodes", 1.0),
        ("chat_router_request_seconds_count{route=\"ws\"}", 4.0),
    ] {
        assert_metric_at_least(router.addr, name, min).await;
    }
}

#[tokio::test]
async fn redirect_mode_sends_clients_to_the_owner() {
    let prefix = unique("t-router");
    let node = spawn_node(103, &prefix).await;
    let mut config = TestRouter::config(&prefix);
    config.redirect = true;
    let redirecting = TestRouter::start(config).await;
    let proxying = TestRouter::start(TestRouter::config(&prefix)).await;
    redirecting.wait_ring(1).await;
    proxying.wait_ring(1).await;
    let room = unique("redirect");

    let path = format!("/ws?room={room}&user=alice");
    let r = http(redirecting.addr, "GET", &path, None).await;
    assert_eq!(r.status, 307, "{}", r.body);
    let location = r.header("location").expect("Location").to_string();
    assert_eq!(location, format!("ws://{}{path}", node.addr));
    assert_eq!(r.json()["node"]["id"], 103);
    assert_eq!(r.json()["location"], location.as_str());

    // Following it is a direct connection to the owner.
    let target = location
        .strip_prefix(&format!("ws://{}", node.addr))
        .expect("location names the owner");
    let mut alice = Client::connect(node.addr, target)
        .await
        .expect("the redirect target accepts the upgrade");
    match alice.next().await {
        Event::Frame(common::ServerFrame::Joined { .. }) => {}
        other => panic!("expected joined, got {other:?}"),
    }

    // A proxying router redirects one request that asks for it.
    let path = format!("/ws?room={room}&user=bob&redirect=1");
    let r = http(proxying.addr, "GET", &path, None).await;
    assert_eq!(r.status, 307, "{}", r.body);
    assert_eq!(
        r.header("location"),
        Some(format!("ws://{}{path}", node.addr).as_str())
    );
}

#[tokio::test]
async fn publish_and_history_go_through_the_router_to_the_owner() {
    let prefix = unique("t-router");
    let n1 = spawn_node(104, &prefix).await;
    let n2 = spawn_node(105, &prefix).await;
    let mut config = TestRouter::config(&prefix);
    config.max_body_bytes = 1024;
    let router = TestRouter::start(config).await;
    router.wait_ring(2).await;
    let ring = expected_ring(&[n1.info(), n2.info()]);

    for owner in [104u16, 105] {
        let room = room_owned_by(&ring, owner, "http");
        let path = format!("/v1/rooms/{room}/messages?user=alice");
        let publish = r#"{"cid": "p1", "body": "posted through the router"}"#;
        // A node whose ring view lags may answer 421 for a moment; a client retries.
        let mut r = http(router.addr, "POST", &path, Some(publish)).await;
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut retry = tokio::time::interval(Duration::from_millis(50));
        retry.tick().await;
        while r.status == 421 && tokio::time::Instant::now() < deadline {
            retry.tick().await;
            r = http(router.addr, "POST", &path, Some(publish)).await;
        }
        assert_eq!(r.status, 201, "{}", r.body);
        let id: common::MessageId = r.json()["id"]
            .as_str()
            .expect("id")
            .parse()
            .expect("decimal id");
        assert_eq!(id.node(), owner, "stored by the room's owner");

        // The same cid again: one message, one id.
        let again = http(router.addr, "POST", &path, Some(publish)).await;
        assert_eq!(again.status, 200, "{}", again.body);
        assert_eq!(again.json()["duplicate"], true);
        assert_eq!(again.json()["id"], id.to_string());

        let history = http(router.addr, "GET", &path, None).await;
        assert_eq!(history.status, 200, "{}", history.body);
        let page = history.json();
        let messages = page["messages"].as_array().expect("messages");
        assert_eq!(messages.len(), 1, "{page}");
        assert_eq!(messages[0]["id"], id.to_string());
        assert_eq!(messages[0]["body"], "posted through the router");
    }

    let room = room_owned_by(&ring, 104, "http-big");
    let big = format!(r#"{{"cid": "big", "body": "{}"}}"#, "x".repeat(2000));
    let r = http(
        router.addr,
        "POST",
        &format!("/v1/rooms/{room}/messages?user=alice"),
        Some(&big),
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["code"], "frame_too_large");

    // The owner's own refusal is relayed with its status and JSON.
    let r = http(
        router.addr,
        "GET",
        &format!("/v1/rooms/{room}/messages"),
        None,
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["code"], "unauthorized");
    assert_metric_at_least(
        router.addr,
        "chat_router_http_requests_total{route=\"messages\",status=\"2xx\"}",
        6.0,
    )
    .await;
}

#[tokio::test]
async fn shutdown_refuses_new_connections_and_cuts_splices_after_the_grace() {
    let prefix = unique("t-router");
    let _node = spawn_node(106, &prefix).await;
    let mut config = TestRouter::config(&prefix);
    config.shutdown_grace = Duration::from_millis(300);
    let router = TestRouter::start(config).await;
    router.wait_ring(1).await;
    let room = unique("drain");
    let mut alice = Client::join(router.addr, &room, "alice").await;
    let addr = router.addr;

    let started = tokio::time::Instant::now();
    router.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "run returned {:?} after the cancel",
        started.elapsed()
    );
    // The splice was cut: the client sees its connection end (and reconnects elsewhere).
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match alice.ws.read_frame().await {
                Ok(f) if f.opcode == fastwebsockets::OpCode::Close => return,
                Ok(_) => continue,
                Err(_) => return,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the proxied connection outlived the router");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the router still accepts connections after shutdown"
    );
}

/// The owner's close frame crosses the router even when the owner closes on a client that is
/// still sending: a frame past `--max-frame-bytes` is answered 1009 and the owner drops the
/// rest, which resets the client-to-node direction. Every attempt must see 1009 (7 of 30
/// through the router used to end in a TCP reset with no close frame; direct, 30 of 30).
#[tokio::test]
async fn the_owners_close_frame_reaches_a_client_that_is_still_sending() {
    let prefix = unique("t-router");
    let _node = spawn_node(107, &prefix).await;
    let router = TestRouter::start(TestRouter::config(&prefix)).await;
    router.wait_ring(1).await;
    let room = unique("oversize");
    let huge = vec![b'a'; 1 << 20];
    let mut codes = Vec::new();
    for i in 0..30 {
        let c = Client::join(router.addr, &room, &format!("big{i}")).await;
        let (mut read, mut write) = c.ws.split(tokio::io::split);
        let frame = huge.clone();
        // The write may never finish (the owner stops reading): it runs on its own.
        let writing = tokio::spawn(async move {
            let _ = write
                .write_frame(fastwebsockets::Frame::text(fastwebsockets::Payload::Owned(
                    frame,
                )))
                .await;
            write
        });
        let code = tokio::time::timeout(WAIT, async {
            loop {
                match read
                    .read_frame(&mut |_| async { Ok::<_, fastwebsockets::WebSocketError>(()) })
                    .await
                {
                    Ok(f) if f.opcode == fastwebsockets::OpCode::Close => {
                        break Some(u16::from_be_bytes([f.payload[0], f.payload[1]]));
                    }
                    Ok(_) => continue,
                    Err(_) => break None,
                }
            }
        })
        .await
        .expect("the connection ended within the wait");
        writing.abort();
        codes.push(code);
    }
    assert!(
        codes.iter().all(|c| *c == Some(1009)),
        "close codes seen (None: the connection ended without a close frame): {codes:?}"
    );
    router.stop().await;
}

/// The status line of the answer to an upgrade from a browser page at `origin`.
async fn upgrade_status(addr: std::net::SocketAddr, room: &str, origin: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws?room={room}&user=u HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !answer.windows(2).any(|w| w == b"\r\n") {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before a status line");
            answer.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("answered");
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn browser_origins_are_checked_at_the_router_and_answered_with_cors() {
    let prefix = unique("t-router");
    let list = "https://app.example";
    let _node = spawn_node_with(108, &prefix, &[("CHAT_ALLOWED_ORIGINS", list)]).await;
    let mut config = TestRouter::config(&prefix);
    config.allowed_origins = list.parse().expect("origins");
    let router = TestRouter::start(config).await;
    router.wait_ring(1).await;
    let addr = router.addr;
    let own = format!("http://{addr}");
    // Its own room: the keyspace outlives the run.
    let room = unique("cors");

    // Upgrades: the listed origin and the router's own page reach the owner (which checks
    // the same list, and sees the router's host as X-Forwarded-Host); another is refused by
    // the router itself.
    for origin in [list, own.as_str()] {
        let status = upgrade_status(addr, &room, origin).await;
        assert!(status.starts_with("HTTP/1.1 101"), "{origin}: {status}");
    }
    let r = request(
        addr,
        "GET",
        &format!("/ws?room={room}&user=u"),
        None,
        &[("Origin", "http://evil.example")],
    )
    .await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (403, Some("forbidden")),
        "{}",
        r.body
    );

    // The room API: a refused origin's simple POST stores nothing; preflights are answered
    // by the router; an allowed origin's answers name it once, whoever made them.
    let evil = [
        ("Origin", "http://evil.example"),
        ("Content-Type", "text/plain"),
    ];
    let path = &format!("/v1/rooms/{room}/messages?user=u");
    let post = |body: &'static str, headers: [(&'static str, &'static str); 2]| async move {
        request(addr, "POST", path, Some(body), &headers).await
    };
    let r = post(r#"{"cid":"e1","body":"x"}"#, evil).await;
    assert_eq!(
        (r.status, r.json()["code"].as_str()),
        (403, Some("forbidden"))
    );
    let r = request(addr, "OPTIONS", path, None, &evil).await;
    assert_eq!(r.status, 403);
    let r = request(
        addr,
        "OPTIONS",
        path,
        None,
        &[("Origin", list), ("Access-Control-Request-Method", "POST")],
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(list));
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("GET, POST, OPTIONS")
    );
    let allowed = [("Origin", list), ("Content-Type", "application/json")];
    let r = post(r#"{"cid":"a1","body":"hi"}"#, allowed).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let named: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "access-control-allow-origin")
        .collect();
    assert_eq!(named.len(), 1, "{:?}", r.headers);
    let varies = r.headers.iter().filter(|(k, _)| k == "vary").count();
    assert_eq!(varies, 1, "{:?}", r.headers);
    for p in [path.clone(), format!("/v1/rooms/{room}/owner")] {
        let r = request(addr, "GET", &p, None, &allowed).await;
        assert_eq!(r.status, 200, "{p}: {}", r.body);
        assert_eq!(r.header("access-control-allow-origin"), Some(list), "{p}");
    }
    // Read back as a server would (no Origin): only the allowed page's message is stored.
    let r = http(addr, "GET", path, None).await;
    let bodies: Vec<_> = r.json()["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["body"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(bodies, ["hi"]);
    assert_eq!(r.header("access-control-allow-origin"), None);
    router.stop().await;
}
