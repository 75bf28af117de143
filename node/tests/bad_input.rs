//! Every kind of bad input gets its documented answer, and the node keeps serving others.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use common::{ErrorCode, ServerFrame};
use fastwebsockets::{Frame, OpCode, Payload};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use support::*;

const SECRET: &str = "integration-secret-0123456789";

fn token(sub: &str, exp_in_secs: i64, rooms: Option<Vec<&str>>, secret: &str) -> String {
    let exp = (common::id::now_ms() / 1000) as i64 + exp_in_secs;
    let mut claims = serde_json::json!({ "sub": sub, "exp": exp });
    if let Some(rooms) = rooms {
        claims["rooms"] = serde_json::json!(rooms);
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode")
}

fn jwt_config() -> Config {
    let mut c = config();
    c.insecure_dev_auth = false;
    c.jwt_secret = Some(SECRET.into());
    c
}

/// A bystander in the same room proves the node still serves others after each bad input.
async fn bystander_still_served(node: &TestNode, room: &str, tag: &str) {
    let mut c = node.joined(room, &format!("bystander-{tag}")).await;
    c.send_text(room, &format!("ok-{tag}"), "still here").await;
    assert_eq!(c.ack().await.0, format!("ok-{tag}"));
}

#[tokio::test]
async fn bad_frames_get_error_frames_and_the_connection_stays() {
    let mut config = config();
    config.max_body_bytes = 100;
    let node = TestNode::start(config).await;
    let mut c = node.joined("bad", "mallory").await;
    let cases: &[(&str, ErrorCode)] = &[
        ("{not json", ErrorCode::BadJson),
        (r#"{"type":"fly","room":"bad"}"#, ErrorCode::UnknownType),
        (
            r#"{"type":"join","room":"has space"}"#,
            ErrorCode::InvalidField,
        ),
        (
            r#"{"type":"join","room":"bad","since":"yesterday"}"#,
            ErrorCode::InvalidField,
        ),
        (
            r#"{"type":"send","room":"bad","cid":"","body":"x"}"#,
            ErrorCode::InvalidField,
        ),
        (
            r#"{"type":"send","room":"never-joined","cid":"c1","body":"x"}"#,
            ErrorCode::NotJoined,
        ),
    ];
    for (raw, code) in cases {
        c.send_raw(raw.as_bytes()).await;
        assert_eq!(c.error().await.0, *code, "for {raw}");
    }
    let long = format!(
        r#"{{"type":"send","room":"bad","cid":"long1","body":"{}"}}"#,
        "y".repeat(101)
    );
    c.send_raw(long.as_bytes()).await;
    assert_eq!(
        c.error().await,
        (ErrorCode::BodyTooLong, Some("long1".into()))
    );
    c.ws.write_frame(Frame::binary(Payload::Borrowed(b"\x00\x01")))
        .await
        .expect("write");
    assert_eq!(c.error().await.0, ErrorCode::BadJson);
    // A wrongly typed field still names the send it was in (`cid` and `room` echoed).
    c.send_raw(br#"{"type":"send","room":"bad","cid":"e1","body":5}"#)
        .await;
    match c.frame().await {
        ServerFrame::Error {
            code, cid, room, ..
        } => assert_eq!(
            (code, cid.as_deref(), room.as_deref()),
            (ErrorCode::InvalidField, Some("e1"), Some("bad"))
        ),
        other => panic!("expected an error, got {other:?}"),
    }
    // After all that, the same connection still works.
    c.send_text("bad", "good1", "fine").await;
    assert_eq!(c.ack().await.0, "good1");
    assert_metric_at_least(
        node.addr,
        "chat_node_bad_input_total{kind=\"bad_json\"}",
        2.0,
    )
    .await;
    assert_metric_at_least(
        node.addr,
        "chat_node_bad_input_total{kind=\"unknown_type\"}",
        1.0,
    )
    .await;
    node.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_others_are_unaffected() {
    let mut config = config();
    config.max_frame_bytes = 1024;
    config.max_body_bytes = 512;
    let node = TestNode::start(config).await;
    let mut c = node.joined("big", "mallory").await;
    let huge = vec![b'a'; 4096];
    c.ws.write_frame(Frame::text(Payload::Borrowed(&huge)))
        .await
        .expect("write");
    assert_eq!(c.closed().await, 1009);
    // Fragments adding up past the limit are refused the same way.
    let mut d = node.joined("big", "mallory2").await;
    for i in 0..4 {
        let fin = i == 3;
        let op = if i == 0 {
            OpCode::Text
        } else {
            OpCode::Continuation
        };
        d.ws.write_frame(Frame::new(fin, op, None, Payload::Borrowed(&[b'a'; 400])))
            .await
            .expect("write");
    }
    assert_eq!(d.closed().await, 1009);
    bystander_still_served(&node, "big", "after-oversize").await;
    node.stop().await;
}

/// RFC 6455 7.4: a close frame with a code a peer may not send (reserved, unassigned, out
/// of range) or a reason that is not UTF-8 is a protocol error, answered 1002; a valid one
/// is answered 1000.
#[tokio::test]
async fn a_close_with_a_reserved_code_is_answered_1002() {
    let node = TestNode::start(config()).await;
    let cases: [(&[u8], u16); 6] = [
        (&999u16.to_be_bytes(), 1002),
        (&1005u16.to_be_bytes(), 1002),
        (&5000u16.to_be_bytes(), 1002),
        (&[0x03, 0xe8, 0xff, 0xfe], 1002),
        (&[0x03], 1002),
        (&4000u16.to_be_bytes(), 1000),
    ];
    for (payload, answer) in cases {
        let mut c = node.joined("closing", "closer").await;
        c.ws.write_frame(Frame::close_raw(payload.to_vec().into()))
            .await
            .expect("write");
        assert_eq!(c.closed().await, answer, "close payload {payload:?}");
    }
    node.stop().await;
}

/// Bytes a raw connection gets for `request` until the server closes it (or 10 s pass).
async fn raw_answer(node: &TestNode, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    let _ = s.write_all(request).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// What is not HTTP, and request heads past 16 KiB, get a status with the JSON error body
/// and a close (hyper alone answered them with an empty body, and took 200 KB of headers).
#[tokio::test]
async fn garbage_and_huge_heads_before_the_upgrade_get_json_answers() {
    let node = TestNode::start(config()).await;
    for (request, status) in [
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n".to_vec(),
            "400",
        ),
        (b"HELLO\r\n\r\n".to_vec(), "400"),
        (
            format!(
                "GET /ws?room=r&user=u HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
                "a".repeat(200_000)
            )
            .into_bytes(),
            "431",
        ),
    ] {
        let answer = raw_answer(&node, &request).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer:.200}"
        );
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert_eq!(json(body)["code"], "invalid_field", "{answer:.300}");
    }
    assert_metric_at_least(
        node.addr,
        "chat_node_bad_input_total{kind=\"bad_http\"}",
        3.0,
    )
    .await;
    bystander_still_served(&node, "heads", "after-garbage").await;
    node.stop().await;
}

/// A client that writes its first frame in the same packet as its upgrade request is
/// served: the bytes read along with the head reach the frame reader.
#[tokio::test]
async fn a_frame_sent_with_the_upgrade_request_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let node = TestNode::start(config()).await;
    let mut request = b"GET /ws?room=pipelined&user=eager HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        .to_vec();
    let payload = br#"{"type":"send","room":"pipelined","cid":"early","body":"hi"}"#;
    let mask = [1u8, 2, 3, 4];
    request.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    request.extend_from_slice(&mask);
    request.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut s = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    s.write_all(&request).await.expect("write");
    let mut seen = Vec::new();
    tokio::time::timeout(WAIT, async {
        let mut chunk = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(r#""type":"ack""#) {
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the early send was acked");
    assert!(seen.starts_with(b"HTTP/1.1 101"));
    node.stop().await;
}

/// A WebSocket version other than 13 is answered 426 with `Sec-WebSocket-Version: 13` (it
/// was a 400), in the usual JSON error body.
#[tokio::test]
async fn another_websocket_version_gets_426_naming_13() {
    let node = TestNode::start(config()).await;
    let answer = raw_json_answer(
        node.addr,
        b"GET /ws?room=v&user=u HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
    )
    .await;
    let answer = answer.to_lowercase();
    assert!(answer.starts_with("http/1.1 426"), "{answer}");
    assert!(answer.contains("sec-websocket-version: 13"), "{answer}");
    assert!(answer.contains("\"code\":\"invalid_field\""), "{answer}");
    node.stop().await;
}

#[tokio::test]
async fn bad_upgrade_requests_get_json_answers_before_the_upgrade() {
    let node = TestNode::start(jwt_config()).await;
    let good = token("alice", 3600, Some(vec!["team-*"]), SECRET);
    let cases = [
        ("/ws?room=team-1".to_string(), 401, "unauthorized"),
        (
            "/ws?room=team-1&token=not.a.jwt".to_string(),
            401,
            "unauthorized",
        ),
        (
            format!(
                "/ws?room=team-1&token={}",
                token("alice", -3600, None, SECRET)
            ),
            401,
            "unauthorized",
        ),
        (
            format!(
                "/ws?room=team-1&token={}",
                token("alice", 3600, None, "some-other-secret-0123456789")
            ),
            401,
            "unauthorized",
        ),
        (
            format!("/ws?room=secret-room&token={good}"),
            403,
            "forbidden",
        ),
        (
            format!("/ws?room=bad%20room&token={good}"),
            400,
            "invalid_field",
        ),
        (format!("/ws?token={good}"), 400, "invalid_field"),
        (
            format!("/ws?room=team-1&since=abc&token={good}"),
            400,
            "invalid_field",
        ),
    ];
    for (path, status, code) in cases {
        let Err((got, body)) = Client::connect(node.addr, &path).await else {
            panic!("{path} was upgraded");
        };
        assert_eq!(got, status, "{path}: {body}");
        let v = json(&body);
        assert_eq!(v["code"], code, "{path}: {body}");
        assert!(v["retry"].is_string());
    }
    // The same request as a plain GET, as a client repeats a failed upgrade to learn why:
    // 426, so "nothing refused" is told apart from every refusal above.
    let Answer {
        status, head, body, ..
    } = request(
        node.addr,
        "GET",
        &format!("/ws?room=team-1&token={good}"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (426, Some("invalid_field"))
    );
    assert!(head.to_lowercase().contains("upgrade: websocket"), "{head}");
    // The Authorization header works too, and a valid token connects.
    let mut c = Client::connect(node.addr, &format!("/ws?room=team-1&token={good}"))
        .await
        .expect("valid token");
    c.expect_joined().await;
    // Joining a room the token does not allow is refused with an error frame.
    c.send_raw(br#"{"type":"join","room":"elsewhere"}"#).await;
    assert_eq!(c.error().await.0, ErrorCode::Forbidden);
    let Answer { status, body, .. } = request(
        node.addr,
        "POST",
        "/v1/rooms/team-1/messages",
        Some(r#"{"cid":"h1","body":"hi"}"#),
        &[("Authorization", &format!("Bearer {good}"))],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    node.stop().await;
}

#[tokio::test]
async fn bad_http_requests_get_json_errors() {
    let mut config = config();
    config.max_frame_bytes = 1024;
    config.max_body_bytes = 100;
    let node = TestNode::start(config).await;
    let json_body = |body: &str| format!(r#"{{"cid":"c","body":"{body}"}}"#);
    let cases = [
        (
            "POST",
            "/v1/rooms/r1/messages?user=u",
            Some("{oops".to_string()),
            400,
            "bad_json",
        ),
        (
            "POST",
            "/v1/rooms/r1/messages?user=u",
            Some(r#"{"cid":"a b","body":"x"}"#.into()),
            400,
            "invalid_field",
        ),
        (
            "POST",
            "/v1/rooms/r1/messages?user=u",
            Some(json_body(&"z".repeat(101))),
            400,
            "body_too_long",
        ),
        (
            "POST",
            "/v1/rooms/r1/messages?user=u",
            Some(json_body(&"z".repeat(2000))),
            413,
            "frame_too_large",
        ),
        (
            "POST",
            "/v1/rooms/r1/messages",
            Some(json_body("x")),
            401,
            "unauthorized",
        ),
        (
            "POST",
            "/v1/rooms/bad%20room/messages?user=u",
            Some(json_body("x")),
            400,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/rooms/r1/messages?user=u&limit=0",
            None,
            400,
            "invalid_field",
        ),
        (
            "GET",
            "/v1/rooms/r1/messages?user=u&before=x",
            None,
            400,
            "invalid_field",
        ),
        ("GET", "/nope", None, 404, "not_found"),
        (
            "DELETE",
            "/v1/rooms/r1/messages?user=u",
            None,
            405,
            "method_not_allowed",
        ),
        // Not an upgrade, and nothing else wrong: 426 (see bad_upgrade_requests_...).
        ("GET", "/ws?room=r1&user=u", None, 426, "invalid_field"),
    ];
    for (method, path, body, want_status, want_code) in cases {
        let (status, body) = http(node.addr, method, path, body.as_deref()).await;
        assert_eq!(status, want_status, "{method} {path}: {body}");
        assert_eq!(json(&body)["code"], want_code, "{method} {path}: {body}");
    }
    bystander_still_served(&node, "r1", "after-http").await;
    node.stop().await;
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_idle_timeout() {
    let mut config = config();
    config.ping_interval = std::time::Duration::from_millis(100);
    config.idle_timeout = std::time::Duration::from_millis(400);
    let node = TestNode::start(config).await;
    // This client reads nothing (so it answers no ping) until the server has given up.
    let mut c = node.connect("quiet", "sleepy").await;
    // Answering the queued pings while reading the close would write to a closed socket.
    c.ws.set_auto_pong(false);
    eventually("idle close counted", || async {
        metric(
            node.addr,
            "chat_node_connections_closed_total{reason=\"idle_timeout\"}",
        )
        .await
            >= 1.0
    })
    .await;
    assert_eq!(c.closed().await, 4008);
    node.stop().await;
}

#[tokio::test]
async fn a_token_that_expires_mid_session_closes_with_4003() {
    let node = TestNode::start(jwt_config()).await;
    let short = token("brief", 2, None, SECRET);
    let mut c = Client::connect(node.addr, &format!("/ws?room=expiring&token={short}"))
        .await
        .expect("connect");
    c.expect_joined().await;
    assert_eq!(c.closed().await, 4003);
    node.stop().await;
}

/// An id is read in one form everywhere (digits, no sign, no spaces, no leading zeros): the
/// upgrade's `since`, a `join` frame's `since` and the history cursors all refuse the rest
/// with `invalid_field` (`+1` used to be taken as 1).
#[tokio::test]
async fn non_canonical_ids_are_refused_the_same_way_everywhere() {
    let node = TestNode::start(config()).await;
    for bad in [
        "%2B1",
        "-1",
        "%201",
        "1%20",
        "01",
        "1e3",
        "18446744073709551616",
        "",
    ] {
        let path = format!("/ws?room=ids&user=u&since={bad}");
        let Err((status, body)) = Client::connect(node.addr, &path).await else {
            panic!("{path} was upgraded");
        };
        assert_eq!(
            (status, json(&body)["code"].as_str()),
            (400, Some("invalid_field")),
            "{path}: {body}"
        );
        for cursor in ["before", "after"] {
            let (status, body) = http_get(
                node.addr,
                &format!("/v1/rooms/ids/messages?user=u&{cursor}={bad}"),
            )
            .await;
            assert_eq!(
                (status, json(&body)["code"].as_str()),
                (400, Some("invalid_field")),
                "{cursor}={bad}: {body}"
            );
        }
    }
    let mut c = node.joined("ids", "u").await;
    for bad in ["+1", " 1", "01", "0x1", ""] {
        c.send_raw(format!(r#"{{"type":"join","room":"ids2","since":"{bad}"}}"#).as_bytes())
            .await;
        assert_eq!(c.error().await.0, ErrorCode::InvalidField, "since {bad:?}");
    }
    // The canonical forms still work.
    c.send_raw(br#"{"type":"join","room":"ids2","since":"0"}"#)
        .await;
    c.expect_joined().await;
    let (status, _) = http_get(
        node.addr,
        "/v1/rooms/ids/messages?user=u&before=18446744073709551615",
    )
    .await;
    assert_eq!(status, 200);
    node.stop().await;
}

/// A token 2 s past `exp` is within the 5 s leeway: upgraded, and the session lasts until the
/// same leeway runs out (it used to be closed with 4003 at once).
#[tokio::test]
async fn the_upgrades_leeway_also_holds_for_the_sessions_end() {
    let node = TestNode::start(jwt_config()).await;
    let stale = token("late", -2, None, SECRET);
    let started = std::time::Instant::now();
    let mut c = Client::connect(node.addr, &format!("/ws?room=leeway&token={stale}"))
        .await
        .expect("a token inside the leeway is upgraded");
    c.expect_joined().await;
    // Still served after the upgrade: a send is stored and acked.
    c.send_text("leeway", "in-leeway", "x").await;
    assert_eq!(c.ack().await.0, "in-leeway");
    assert_eq!(c.closed().await, 4003);
    // exp was 2 s (rounded down to the second) ago, so the leeway ends 2 to 3 s after the
    // upgrade; closing at once would be well under that.
    let lasted = started.elapsed();
    assert!(
        lasted >= std::time::Duration::from_millis(1500),
        "closed {lasted:?} after the upgrade; the leeway gives about 3 s"
    );
    node.stop().await;
}

/// Everything the client gets until the close: acks by cid, `rate_limited` errors by cid, the
/// close code.
async fn until_closed(c: &mut Client) -> (Vec<String>, Vec<String>, u16) {
    let (mut acks, mut refused) = (Vec::new(), Vec::new());
    loop {
        match c.next().await {
            Event::Frame(ServerFrame::Ack { cid, .. }) => acks.push(cid.to_string()),
            Event::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                cid,
                ..
            }) => {
                refused.push(cid.expect("a rate_limited error names its send"));
            }
            Event::Frame(ServerFrame::Message(_) | ServerFrame::Presence { .. }) => {}
            Event::Frame(f) => panic!("unexpected {f:?}"),
            Event::Close(code) => return (acks, refused, code),
        }
    }
}

/// The stored cids of a room, read back from the history API.
async fn stored_cids(node: &TestNode, room: &str) -> HashSet<String> {
    stored_messages(node.addr, room)
        .await
        .unwrap_or_else(|e| panic!("history: {e:?}"))
        .iter()
        .map(|m| m["cid"].as_str().expect("cid").to_owned())
        .collect()
}

/// 600 sends written at once with the default budget (100/s, burst 200): the first burst is
/// stored, the next burst's worth is refused one by one with `rate_limited` (each error
/// written before the close frame: they used to be dropped), then 4029. The store has
/// exactly the sends that were not refused.
#[tokio::test]
async fn a_burst_past_the_budget_gets_every_refusal_then_4029() {
    let node = TestNode::start(config()).await;
    let mut c = node.joined("burst", "flood").await;
    let mut all = String::new();
    for i in 0..600 {
        all.push_str(&format!("s{i} "));
        c.send_text("burst", &format!("s{i}"), "x").await;
    }
    let (acks, refused, code) = until_closed(&mut c).await;
    assert_eq!(code, 4029);
    // A later send's ack means the room has stored everything it accepted before it (one
    // write in flight at a time, in order).
    bystander_still_served(&node, "burst", "after-burst").await;
    let stored = stored_cids(&node, "burst").await;
    let counts = format!(
        "{} acked, {} refused, {} stored",
        acks.len(),
        refused.len(),
        stored.len()
    );
    // The bystander's message is the one stored cid that is not the flood's.
    assert!(stored.len() > 200 && stored.len() <= 600, "{counts}");
    assert!(refused.len() >= 100, "{counts}");
    for cid in &refused {
        assert!(
            !stored.contains(cid),
            "{cid} was refused and stored ({counts})"
        );
    }
    for cid in &acks {
        assert!(
            stored.contains(cid),
            "{cid} was acked and not stored ({counts})"
        );
    }
    // Every send up to the last refusal the client saw was stored or refused: none of the
    // answers queued before the close was dropped.
    let index = |cid: &String| cid[1..].parse::<usize>().expect("s<i>");
    let last = refused.iter().map(index).max().expect("refusals");
    let refused: HashSet<&String> = refused.iter().collect();
    for i in 0..=last {
        let cid = format!("s{i}");
        assert!(
            stored.contains(&cid) || refused.contains(&cid),
            "{cid}: neither stored nor refused ({counts})"
        );
    }
    node.stop().await;
}

/// A client that keeps sending at 20x its rate, ignoring the errors, is closed with 4029
/// (it used to get a send through every 10 ms, which reset the count, and was never closed).
#[tokio::test]
async fn a_client_that_keeps_sending_over_its_rate_is_closed() {
    let node = TestNode::start(config()).await;
    let c = node.connect("sustained", "eager").await;
    // Reading and writing at once: the reader looks for the close.
    let (mut read, mut write) = c.ws.split(tokio::io::split);
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    let reader = tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let frame = tokio::time::timeout_at(
                deadline,
                read.read_frame(&mut |_| async { Ok::<_, fastwebsockets::WebSocketError>(()) }),
            )
            .await
            .expect("closed within 20 s")
            .expect("read");
            if frame.opcode == OpCode::Close {
                let _ = tx.send(u16::from_be_bytes([frame.payload[0], frame.payload[1]]));
                return;
            }
        }
    });
    // 2,000 sends a second for at most 15 s, until the close is seen.
    let mut tick = tokio::time::interval(Duration::from_micros(500));
    for i in 0..30_000u32 {
        if let Ok(code) = rx.try_recv() {
            assert_eq!(code, 4029);
            reader.await.expect("reader");
            node.stop().await;
            return;
        }
        tick.tick().await;
        let frame = format!(r#"{{"type":"send","room":"sustained","cid":"k{i}","body":"x"}}"#);
        if write
            .write_frame(Frame::text(Payload::Owned(frame.into_bytes())))
            .await
            .is_err()
        {
            break;
        }
    }
    reader.await.expect("reader");
    assert_eq!(rx.await.expect("close code"), 4029);
    node.stop().await;
}

/// Joins and leaves spend the same budget (each broadcasts presence to the room): a flood of
/// them is refused with `rate_limited` naming the room, then closed with 4029.
#[tokio::test]
async fn joins_and_leaves_spend_the_rate_budget() {
    let node = TestNode::start(config_with_rate(1.0, 5.0)).await;
    let mut c = node.joined("churn-home", "churner").await;
    for _ in 0..20 {
        c.send_raw(br#"{"type":"join","room":"churn"}"#).await;
        c.send_raw(br#"{"type":"leave","room":"churn"}"#).await;
    }
    let mut refused = 0;
    let code = loop {
        match c.next().await {
            Event::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                room,
                cid,
                ..
            }) => {
                assert_eq!((room.as_deref(), cid), (Some("churn"), None));
                refused += 1;
            }
            Event::Frame(_) => {}
            Event::Close(code) => break code,
        }
    };
    assert_eq!(code, 4029);
    assert!(refused >= 5, "{refused} refusals before the close");
    node.stop().await;
}

#[tokio::test]
async fn sends_past_the_rate_limit_are_refused_then_the_client_is_closed() {
    let node = TestNode::start(config_with_rate(0.5, 3.0)).await;
    let mut c = node.joined("rl", "chatty").await;
    for i in 0..3 {
        c.send_text("rl", &format!("ok{i}"), "x").await;
    }
    for _ in 0..3 {
        c.ack().await;
    }
    c.send_text("rl", "over", "x").await;
    assert_eq!(
        c.error().await,
        (ErrorCode::RateLimited, Some("over".into()))
    );
    // Ignoring the errors: after a burst's worth more, the connection is closed.
    for i in 0..4 {
        c.send_text("rl", &format!("more{i}"), "x").await;
    }
    assert_eq!(c.closed().await, 4029);
    bystander_still_served(&node, "rl", "after-rate-limit").await;
    node.stop().await;
}

/// An upgrade request with `Origin`: the answer's status line and headers (lower case),
/// and its JSON body unless it is 101.
async fn upgrade_from(addr: std::net::SocketAddr, origin: &str) -> String {
    let req = format!(
        "GET /ws?room=o1&user=u HTTP/1.1\r\nHost: {addr}\r\nOrigin: {origin}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    let done = |a: &[u8]| {
        let text = String::from_utf8_lossy(a);
        match text.split_once("\r\n\r\n") {
            Some((head, body)) => head.starts_with("HTTP/1.1 101") || body.ends_with('}'),
            None => false,
        }
    };
    raw_answer_until(addr, req.as_bytes(), done)
        .await
        .to_lowercase()
}

#[tokio::test]
async fn a_page_from_an_origin_not_listed_is_refused_and_writes_nothing() {
    let mut config = config();
    config.allowed_origins = "https://app.example".parse().expect("origins");
    let node = TestNode::start(config).await;
    let evil = [("Origin", "http://evil.example")];
    let answer = upgrade_from(node.addr, "http://evil.example").await;
    assert!(answer.starts_with("http/1.1 403 "), "{answer}");
    assert!(answer.contains(r#""code":"forbidden""#), "{answer}");
    // A simple text/plain POST is sent by browsers without a preflight: it must be refused
    // too, not stored.
    let Answer { status, body, .. } = request(
        node.addr,
        "POST",
        "/v1/rooms/o1/messages?user=u",
        Some(r#"{"cid":"x1","body":"from evil"}"#),
        &[evil[0], ("Content-Type", "text/plain")],
    )
    .await;
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (403, Some("forbidden"))
    );
    let Answer { status, .. } = request(
        node.addr,
        "OPTIONS",
        "/v1/rooms/o1/messages",
        None,
        &[evil[0], ("Access-Control-Request-Method", "POST")],
    )
    .await;
    assert_eq!(status, 403);
    let Answer { status, body, .. } =
        request(node.addr, "GET", "/v1/rooms/o1/messages", None, &evil).await;
    assert_eq!(status, 403, "{body}");
    // Read back without an Origin (a server-side client): nothing was stored.
    let (status, body) = http_get(node.addr, "/v1/rooms/o1/messages?user=u").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["messages"], serde_json::json!([]));
    node.stop().await;
}

#[tokio::test]
async fn listed_and_same_origin_pages_get_cors_answers_and_upgrades() {
    let mut config = config();
    config.allowed_origins = "https://app.example, https://*.team.example"
        .parse()
        .expect("origins");
    let node = TestNode::start(config).await;
    let own = format!("http://{}", node.addr);
    for origin in [
        "https://app.example",
        "https://a.team.example",
        own.as_str(),
    ] {
        let answer = upgrade_from(node.addr, origin).await;
        assert!(answer.starts_with("http/1.1 101 "), "{origin}: {answer}");
    }
    // Preflight, then the JSON POST and the GET it allows.
    let allowed = ("Origin", "https://app.example");
    let Answer { status, head, .. } = request(
        node.addr,
        "OPTIONS",
        "/v1/rooms/o2/messages",
        None,
        &[
            allowed,
            ("Access-Control-Request-Method", "POST"),
            (
                "Access-Control-Request-Headers",
                "content-type, authorization",
            ),
        ],
    )
    .await;
    let head = head.to_lowercase();
    assert_eq!(status, 204, "{head}");
    for h in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: get, post, options",
        "access-control-allow-headers: authorization, content-type",
        "vary: origin",
    ] {
        assert!(head.contains(h), "{h} missing: {head}");
    }
    assert!(!head.contains("access-control-allow-credentials"), "{head}");
    let Answer {
        status, head, body, ..
    } = request(
        node.addr,
        "POST",
        "/v1/rooms/o2/messages?user=u",
        Some(r#"{"cid":"c1","body":"hi"}"#),
        &[allowed, ("Content-Type", "application/json")],
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert!(
        head.to_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    let Answer {
        status, head, body, ..
    } = request(
        node.addr,
        "GET",
        "/v1/rooms/o2/messages?user=u",
        None,
        &[allowed],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["messages"][0]["body"], "hi");
    assert!(
        head.to_lowercase()
            .contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    // Same-origin and server-side requests need no CORS headers and get none.
    let Answer { head, .. } =
        request(node.addr, "GET", "/v1/rooms/o2/messages?user=u", None, &[]).await;
    assert!(
        !head.to_lowercase().contains("access-control-allow-origin"),
        "{head}"
    );
    node.stop().await;
}
