//! What apps build on: webhooks with retries and dead letters, rooms that end or expire,
//! and presence — against the real CQL store (and Redis for user presence), judged by what
//! the store holds and what the receiver got.

mod support;

use std::time::Duration;

use common::{ErrorCode, ServerFrame};
use support::receiver::{Mode, Receiver};
use support::*;

const SECRET: &str = "webhook-secret-for-tests";
const ADMIN: &str = "admin-token-for-the-tests";

/// A node whose webhook covers the rooms starting with `rooms` (tests share a keyspace,
/// and a node's sweep would otherwise pick up another test's rooms).
fn hooked(receiver: &Receiver, rooms: &str) -> Config {
    let mut c = config();
    c.webhook_url = Some(receiver.url());
    c.webhook_rooms = vec![rooms.into()];
    c.webhook_secret = Some(SECRET.into());
    c.webhook_backoff = Duration::from_millis(50);
    c.webhook_backoff_max = Duration::from_millis(200);
    c.webhook_timeout = Duration::from_millis(500);
    c.admin_token = Some(ADMIN.into());
    c
}

fn bearer() -> (&'static str, String) {
    ("Authorization", format!("Bearer {ADMIN}"))
}

async fn admin(
    node: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let (k, v) = bearer();
    let Answer { status, body, .. } = request(node, method, path, body, &[(k, &v)]).await;
    (status, json(&body))
}

/// Connects `user` to `room` on `node` and sends `n` messages, each acked.
async fn sent(node: &TestNode, room: &str, user: &str, n: usize, body: &str) -> Client {
    let mut c = node.joined(room, user).await;
    for i in 0..n {
        c.send_text(room, &format!("{room}-{i}"), body).await;
        c.ack().await;
    }
    c
}

/// The ids the store holds for `room`, oldest first (the history API reads the store).
async fn stored_ids(node: std::net::SocketAddr, room: &str) -> Vec<u64> {
    ids(&stored_messages(node, room)
        .await
        .unwrap_or_else(|e| panic!("history: {e:?}")))
}

fn ids(messages: &[serde_json::Value]) -> Vec<u64> {
    messages
        .iter()
        .map(|m| m["id"].as_str().expect("id").parse().expect("id"))
        .collect()
}

#[tokio::test]
async fn webhooks_deliver_every_stored_message_in_order_signed_retrying_failures() {
    let receiver = Receiver::start(Mode::FailNext(3)).await;
    let node = TestNode::start(hooked(&receiver, "hooks-order")).await;
    let room = "hooks-order";
    let mut alice = node.joined(room, "alice").await;
    let _bob = node.joined(room, "bob").await;
    for i in 0..20 {
        alice
            .send_text(room, &format!("c{i}"), &format!("hello {i}"))
            .await;
        alice.ack().await;
    }
    let stored = stored_ids(node.addr, room).await;
    assert_eq!(stored.len(), 20);
    eventually("every stored message taken by the receiver", || {
        let r = receiver.clone();
        let n = stored.len();
        async move { r.taken_once().len() == n }
    })
    .await;
    // In id order, each exactly the stored set.
    assert_eq!(receiver.taken_once(), stored);
    let log = receiver.log();
    let failed = log.iter().filter(|d| !d.taken).count();
    assert_eq!(failed, 3, "the first three attempts failed");
    // The failed message came again with the next attempt number, before anything after it.
    assert_eq!(log[0].id, stored[0]);
    assert_eq!(
        log.iter()
            .take(4)
            .map(|d| (d.id, d.attempt))
            .collect::<Vec<_>>(),
        vec![
            (stored[0], 1),
            (stored[0], 2),
            (stored[0], 3),
            (stored[0], 4)
        ]
    );
    for d in &log {
        assert_eq!(
            d.signature,
            chat_node::hooks::sign(SECRET.as_bytes(), &d.raw),
            "signed"
        );
        assert_eq!(d.idempotency_key, d.id.to_string());
        assert_eq!(d.room, room);
        assert_eq!(d.body["type"], "message");
        assert_eq!(d.body["from"], "alice");
        let online: Vec<&str> = d.body["online"]
            .as_array()
            .expect("online")
            .iter()
            .filter_map(|u| u.as_str())
            .collect();
        assert_eq!(
            online,
            vec!["alice", "bob"],
            "the members connected at delivery"
        );
    }
    assert_metric_at_least(node.addr, "chat_node_webhook_retries_total", 3.0).await;
    assert_metric_at_least(node.addr, "chat_node_webhook_delivered_total", 20.0).await;
    node.stop().await;
}

#[tokio::test]
async fn a_receiver_that_never_answers_dead_letters_and_the_api_replays_and_deletes() {
    let receiver = Receiver::start(Mode::Hang).await;
    let mut cfg = hooked(&receiver, "hooks-dead");
    cfg.webhook_max_attempts = 2;
    cfg.webhook_timeout = Duration::from_millis(200);
    let node = TestNode::start(cfg).await;
    let room = "hooks-dead";
    let _alice = sent(&node, room, "alice", 2, "never answered").await;
    let stored = stored_ids(node.addr, room).await;
    let path = format!("/v1/rooms/{room}/dead-letters");
    eventually("both messages dead-lettered", || {
        let path = path.clone();
        async move {
            let (status, body) = admin(node.addr, "GET", &path, None).await;
            status == 200
                && body["dead_letters"]
                    .as_array()
                    .is_some_and(|a| a.len() == 2)
        }
    })
    .await;
    let (_, body) = admin(node.addr, "GET", &path, None).await;
    let letters = body["dead_letters"].as_array().expect("list");
    for (letter, id) in letters.iter().zip(&stored) {
        assert_eq!(letter["message"]["id"], id.to_string());
        assert_eq!(letter["attempts"], 2);
        assert!(
            letter["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("no answer")),
            "{letter}"
        );
    }
    assert_eq!(receiver.log().len(), 4, "two attempts each");
    // Cluster-wide list too.
    let (status, all) = admin(node.addr, "GET", "/v1/dead-letters?limit=1000", None).await;
    assert_eq!(status, 200);
    assert!(all["dead_letters"].as_array().expect("list").len() >= 2);

    // Replay while the endpoint still fails: 502, and it stays.
    receiver.set_mode(Mode::Fail);
    let replay_first = format!("{path}/{}/replay", stored[0]);
    let (status, body) = admin(node.addr, "POST", &replay_first, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (502, Some("webhook_failed")),
        "{body}"
    );
    // Replay once it takes it: delivered, gone from the table.
    receiver.set_mode(Mode::Take);
    let (status, body) = admin(node.addr, "POST", &replay_first, None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(receiver.taken_once(), vec![stored[0]]);
    let (status, body) = admin(node.addr, "DELETE", &format!("{path}/{}", stored[1]), None).await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = admin(node.addr, "GET", &path, None).await;
    assert_eq!(body["dead_letters"].as_array().map(Vec::len), Some(0));

    // Bad input: each gets a JSON answer with its code.
    for (method, p, status, code) in [
        ("DELETE", format!("{path}/{}", stored[1]), 404, "not_found"),
        (
            "POST",
            format!("{path}/{}/replay", stored[1]),
            404,
            "not_found",
        ),
        ("POST", format!("{path}/abc/replay"), 400, "invalid_field"),
        (
            "GET",
            format!("{path}/{}", stored[1]),
            405,
            "method_not_allowed",
        ),
        (
            "POST",
            format!("{path}/{}/resend", stored[1]),
            404,
            "not_found",
        ),
        ("GET", format!("{path}?limit=0"), 400, "invalid_field"),
    ] {
        let (got, body) = admin(node.addr, method, &p, None).await;
        assert_eq!(
            (got, body["code"].as_str()),
            (status, Some(code)),
            "{method} {p}"
        );
    }
    // Without the admin token: 401.
    let (status, body) = http_get(node.addr, &path).await;
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (401, Some("unauthorized"))
    );
    assert_metric_at_least(node.addr, "chat_node_webhook_dead_lettered_total", 2.0).await;
    node.stop().await;
}

#[tokio::test]
async fn an_ended_room_refuses_joins_and_sends_keeps_its_history_and_stays_ended_after_a_restart() {
    let mut cfg = config();
    cfg.admin_token = Some(ADMIN.into());
    let node = TestNode::start(cfg.clone()).await;
    let room = "lifecycle-end";
    let mut alice = sent(&node, room, "alice", 3, "before the end").await;
    // Not without the token.
    let (status, _) = http(node.addr, "POST", &format!("/v1/rooms/{room}/end"), None).await;
    assert_eq!(status, 401);
    let (status, body) = admin(node.addr, "POST", &format!("/v1/rooms/{room}/end"), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "ended");
    assert!(body["ended_at"].as_u64().is_some());
    // The member is told, with the room, and may not send any more.
    match alice.frame_skip_presence().await {
        ServerFrame::Error { code, room: r, .. } => {
            assert_eq!(code, ErrorCode::RoomEnded);
            assert_eq!(r.as_deref(), Some(room));
        }
        f => panic!("expected room_ended, got {f:?}"),
    }
    alice.send_text(room, "e9", "after the end").await;
    assert_eq!(
        alice.error().await,
        (ErrorCode::RoomEnded, Some("e9".into()))
    );
    // Ending again is idempotent.
    let (status, body) = admin(node.addr, "POST", &format!("/v1/rooms/{room}/end"), None).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("ended")));

    let assert_ended = |addr| async move {
        let mut late = Client::connect(addr, &format!("/ws?room={room}&user=carol"))
            .await
            .expect("upgrade");
        match late.frame_skip_presence().await {
            ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::RoomEnded),
            f => panic!("expected room_ended, got {f:?}"),
        }
        let (status, body) = http_post(
            addr,
            &format!("/v1/rooms/{room}/messages?user=carol"),
            r#"{"cid":"p1","body":"late"}"#,
        )
        .await;
        assert_eq!(
            (status, json(&body)["code"].as_str()),
            (410, Some("room_ended")),
            "{body}"
        );
        assert_eq!(
            stored_ids(addr, room).await.len(),
            3,
            "history stays readable"
        );
        let (status, body) = http_get(addr, &format!("/v1/rooms/{room}/state?user=carol")).await;
        assert_eq!(
            (status, json(&body)["state"].as_str()),
            (200, Some("ended"))
        );
    };
    assert_ended(node.addr).await;
    // A restart (another process would load it the same way): still ended, from the store.
    node.stop().await;
    let node = TestNode::start(cfg).await;
    assert_ended(node.addr).await;
    node.stop().await;
}

#[tokio::test]
async fn a_room_expires_at_its_ttl_and_bad_lifecycle_requests_get_clear_answers() {
    let mut cfg = config();
    cfg.admin_token = Some(ADMIN.into());
    let node = TestNode::start(cfg).await;
    let room = "lifecycle-ttl";
    let mut alice = node.joined(room, "alice").await;
    let path = format!("/v1/rooms/{room}/expiry");
    for (body, status, code) in [
        ("{}", 400, "invalid_field"),
        (r#"{"ttl_ms":0}"#, 400, "invalid_field"),
        (r#"{"ttl_ms":1000,"expires_at":5}"#, 400, "invalid_field"),
        (r#"{"expires_at":5}"#, 400, "invalid_field"),
        (r#"{"ttl_ms":"soon"}"#, 400, "bad_json"),
        (r#"{"when":1}"#, 400, "bad_json"),
        ("not json", 400, "bad_json"),
    ] {
        let (got, answer) = admin(node.addr, "PUT", &path, Some(body)).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    for (method, p, status) in [
        ("GET", format!("/v1/rooms/{room}/end"), 405),
        ("POST", format!("/v1/rooms/{room}/expiry"), 405),
        ("GET", format!("/v1/rooms/{room}/nothing-here"), 404),
    ] {
        let (got, answer) = admin(node.addr, method, &p, None).await;
        assert_eq!(got, status, "{method} {p}: {answer}");
        assert!(answer["code"].is_string());
    }
    // A far expiry, then cleared, then a short one.
    let (status, body) = admin(node.addr, "PUT", &path, Some(r#"{"ttl_ms":3600000}"#)).await;
    assert_eq!((status, body["state"].as_str()), (200, Some("active")));
    assert!(body["expires_at"].as_u64().is_some());
    let (status, body) = admin(node.addr, "PUT", &path, Some(r#"{"expires_at":null}"#)).await;
    assert_eq!((status, body["expires_at"].as_u64()), (200, None));
    let (status, _) = admin(node.addr, "PUT", &path, Some(r#"{"ttl_ms":800}"#)).await;
    assert_eq!(status, 200);
    match alice.frame_skip_presence().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::RoomEnded),
        f => panic!("expected room_ended at the expiry, got {f:?}"),
    }
    let (status, body) = http_get(node.addr, &format!("/v1/rooms/{room}/state?user=a")).await;
    assert_eq!(
        (status, json(&body)["state"].as_str()),
        (200, Some("ended"))
    );
    // An ended room's expiry cannot move.
    let (status, body) = admin(node.addr, "PUT", &path, Some(r#"{"ttl_ms":100000}"#)).await;
    assert_eq!((status, body["code"].as_str()), (410, Some("room_ended")));
    node.stop().await;
}

#[tokio::test]
async fn room_presence_lists_who_is_connected_and_joined_carries_the_count() {
    let node = TestNode::start(config()).await;
    let room = "presence-room";
    let mut a = node.connect(room, "zoe").await;
    match a.frame_skip_presence().await {
        ServerFrame::Joined { members, users, .. } => {
            assert_eq!(members, 1);
            assert_eq!(users, Some(vec![common::UserId::new("zoe").expect("u")]));
        }
        f => panic!("{f:?}"),
    }
    let mut b = node.connect(room, "adam").await;
    match b.frame_skip_presence().await {
        ServerFrame::Joined { members, users, .. } => {
            assert_eq!(members, 2);
            let names: Vec<String> = users
                .expect("listed")
                .iter()
                .map(|u| u.to_string())
                .collect();
            assert_eq!(names, vec!["adam", "zoe"]);
        }
        f => panic!("{f:?}"),
    }
    let _b2 = node.connect(room, "adam").await;
    let (status, body) = http_get(node.addr, &format!("/v1/rooms/{room}/presence?user=x")).await;
    assert_eq!(status, 200, "{body}");
    let body = json(&body);
    assert_eq!(body["members"], 2, "users, not connections");
    assert_eq!(body["users"], serde_json::json!(["adam", "zoe"]));
    // A room nobody is in: empty, and not started for the question.
    let (status, body) = http_get(node.addr, "/v1/rooms/presence-empty/presence?user=x").await;
    assert_eq!((status, json(&body)["members"].as_u64()), (200, Some(0)));
    let (status, _) = http_get(node.addr, "/v1/rooms/bad%20room/presence?user=x").await;
    assert_eq!(status, 400);
    drop(a);
    drop(b);
    node.stop().await;
}

#[tokio::test]
async fn user_presence_is_kept_in_redis_and_follows_connections() {
    let mut cfg = config();
    cfg.redis_url = Some(support::cluster::redis_url());
    cfg.redis_prefix = format!("t-presence-{}", std::process::id());
    cfg.user_presence_ttl = Duration::from_secs(3);
    let node = TestNode::start(cfg).await;
    let status_of = |user: &'static str| async move {
        let (status, body) =
            http_get(node.addr, &format!("/v1/users/{user}/presence?user=x")).await;
        assert_eq!(status, 200, "{body}");
        json(&body)
    };
    assert_eq!(status_of("nina").await["online"], false);
    let before = common::id::now_ms();
    let mut c = Client::connect(node.addr, "/ws?room=presence-users&user=nina")
        .await
        .expect("upgrade");
    c.expect_joined().await;
    eventually("nina online", || async {
        status_of("nina").await["online"] == true
    })
    .await;
    let s = status_of("nina").await;
    let since = s["since"].as_u64().expect("since");
    assert!(since >= before.saturating_sub(1000) && since <= common::id::now_ms());
    assert_eq!(s["nodes"], serde_json::json!([0]));
    drop(c);
    eventually("nina offline once her connection closed", || async {
        status_of("nina").await["online"] == false
    })
    .await;
    let (status, _) = http_get(node.addr, "/v1/users/bad%20user/presence?user=x").await;
    assert_eq!(status, 400);
    let (status, _) = http(node.addr, "POST", "/v1/users/nina/presence?user=x", None).await;
    assert_eq!(status, 405);
    node.stop().await;
}

/// Webhook flags for process nodes, for rooms starting with `rooms`.
fn hook_args(receiver: &Receiver, rooms: &str) -> Vec<String> {
    [
        "--webhook-url",
        &receiver.url(),
        "--webhook-secret",
        SECRET,
        "--webhook-rooms",
        rooms,
        "--webhook-sweep",
        "300ms",
        "--webhook-backoff",
        "50ms",
        "--webhook-backoff-max",
        "200ms",
        // Failing for the whole test must not dead-letter anything.
        "--webhook-max-attempts",
        "100000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[tokio::test]
async fn deliveries_pending_on_a_killed_node_resume_on_the_new_owner_nothing_missing() {
    let receiver = Receiver::start(Mode::Fail).await;
    let args = hook_args(&receiver, "hooks-kill");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = support::cluster::Cluster::start_with("hooks-kill", 2, 1, &args).await;
    let room = c.room_on("hooks-kill", 1).await;
    let mut client = Client::joined(c.router(), &room, "ann").await;
    for i in 0..10 {
        client
            .send_text(&room, &format!("k{i}"), "pending when the owner dies")
            .await;
        client.ack().await;
    }
    eventually("the owner is retrying", || {
        let r = receiver.clone();
        async move { r.log().len() >= 3 }
    })
    .await;
    assert!(receiver.taken_once().is_empty());
    c.nodes.get_mut(&1).expect("node 1").kill9();
    receiver.set_mode(Mode::Take);
    c.wait_ring_size(1).await;
    // The room is between owners until the new one has it: read until it answers.
    let read = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let router = c.router();
    eventually("history through the new owner", || {
        let (read, room) = (read.clone(), room.clone());
        async move {
            match stored_messages(router, &room).await {
                Ok(messages) => {
                    *read.lock().expect("lock") = ids(&messages);
                    true
                }
                Err(_) => false,
            }
        }
    })
    .await;
    let stored = read.lock().expect("lock").clone();
    assert_eq!(stored.len(), 10, "every acked message is stored");
    eventually("the new owner delivered everything", || {
        let r = receiver.clone();
        async move { r.taken_once().len() >= 10 }
    })
    .await;
    // A receiver that dedupes by id has every stored message, once, in id order.
    assert_eq!(receiver.taken_once(), stored);
    assert!(receiver.log().iter().all(|d| d.room == room));
}

#[tokio::test]
async fn presence_spans_the_cluster_with_bridged_members_and_a_crashed_nodes_users_age_out() {
    let mut c =
        support::cluster::Cluster::start_with("presence", 2, 1, &["--user-presence-ttl", "2s"])
            .await;
    let room = c.room_on("presence-x", 1).await;
    let home = c.room_on("presence-home", 2).await;
    let router = c.router();
    let ann = Client::joined(router, &room, "ann").await;
    // Ben's connection is on node 2; he joins the room of node 1 through its bridge.
    let node2 = c.nodes[&2].addr;
    let mut ben = Client::joined(node2, &home, "ben").await;
    ben.send_join(&room, None).await;
    match ben.frame_skip_presence().await {
        ServerFrame::Joined { members, users, .. } => {
            assert_eq!(members, 2);
            assert_eq!(users.map(|u| u.len()), Some(2));
        }
        f => panic!("{f:?}"),
    }
    let (status, body) = http_get(router, &format!("/v1/rooms/{room}/presence?user=x")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["users"], serde_json::json!(["ann", "ben"]));
    let online = |user: &'static str| async move {
        let (status, body) = http_get(router, &format!("/v1/users/{user}/presence?user=x")).await;
        assert_eq!(status, 200, "{body}");
        json(&body)
    };
    eventually("both online", || async {
        online("ann").await["nodes"] == serde_json::json!([1])
            && online("ben").await["nodes"] == serde_json::json!([2])
    })
    .await;
    // Node 2 dies without a word: ben's entry ages out; ann stays.
    c.nodes.get_mut(&2).expect("node 2").kill9();
    let killed = std::time::Instant::now();
    eventually("ben offline after the TTL", || async {
        online("ben").await["online"] == false
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_millis(500),
        "not before its TTL could pass"
    );
    assert_eq!(online("ann").await["online"], true);
    drop(ann);
}

#[tokio::test]
async fn messages_expire_from_the_store_after_the_message_ttl() {
    let mut cfg = config();
    cfg.message_ttl = Duration::from_secs(2);
    let node = TestNode::start(cfg).await;
    let room = "retention-ttl";
    let _alice = sent(&node, room, "alice", 3, "short-lived").await;
    assert_eq!(stored_ids(node.addr, room).await.len(), 3);
    // CQL expires rows by the second: gone within a few.
    eventually("the rows expired", || async {
        stored_ids(node.addr, room).await.is_empty()
    })
    .await;
    node.stop().await;
}

#[tokio::test]
async fn dead_letters_are_listed_replayed_and_deleted_through_a_router() {
    let receiver = Receiver::start(Mode::Fail).await;
    let mut args = hook_args(&receiver, "hooks-routed");
    let at = args
        .iter()
        .position(|a| a == "--webhook-max-attempts")
        .expect("flag");
    args[at + 1] = "1".into();
    args.extend(["--admin-token".to_string(), ADMIN.to_string()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = support::cluster::Cluster::start_with("hooks-routed", 2, 1, &args).await;
    let router = c.router();
    let room = c.room_on("hooks-routed", 2).await;
    let (status, body) = http_post(
        router,
        &format!("/v1/rooms/{room}/messages?user=app"),
        r#"{"cid":"r1","body":"to the dead letters"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = json(&body)["id"].as_str().expect("id").to_owned();
    eventually("the dead letter, listed through the router", || {
        let id = id.clone();
        async move {
            let (status, body) = admin(router, "GET", "/v1/dead-letters?limit=1000", None).await;
            status == 200
                && body["dead_letters"]
                    .as_array()
                    .is_some_and(|a| a.iter().any(|d| d["message"]["id"] == id.as_str()))
        }
    })
    .await;
    let path = format!("/v1/rooms/{room}/dead-letters");
    let (status, body) = admin(router, "GET", &path, None).await;
    assert_eq!(status, 200);
    assert_eq!(body["dead_letters"][0]["last_error"], "HTTP 500");
    receiver.set_mode(Mode::Take);
    let (status, body) = admin(router, "POST", &format!("{path}/{id}/replay"), None).await;
    assert_eq!(
        (status, body["delivered"].as_bool()),
        (200, Some(true)),
        "{body}"
    );
    assert_eq!(receiver.taken_once(), vec![id.parse::<u64>().expect("id")]);
    let (status, _) = admin(router, "DELETE", &format!("{path}/{id}"), None).await;
    assert_eq!(status, 404, "replayed, so gone");
    let (status, body) = http_get(router, "/v1/dead-letters").await;
    assert_eq!(
        (status, json(&body)["code"].as_str()),
        (401, Some("unauthorized"))
    );
}

/// The body of the message whose first write fails in the test below.
const FAIL_ONCE: &str = "lost the first time";

#[tokio::test]
async fn a_write_that_failed_and_is_retried_after_later_ones_is_still_delivered() {
    let receiver = Receiver::start(Mode::Take).await;
    let cfg = hooked(&receiver, "hooks-late");
    fresh_keyspace().await;
    // The real CQL store, except that the first write of that message fails (a write lost
    // to a timeout, say).
    let failed = std::sync::atomic::AtomicBool::new(false);
    let store = std::sync::Arc::new(support::faulty::Faulty::failing_batches(
        chat_node::build_store(&cfg).await.expect("the CQL store"),
        move |batch| {
            batch.iter().any(|m| m.body == FAIL_ONCE)
                && !failed.swap(true, std::sync::atomic::Ordering::SeqCst)
        },
    ));
    let node = TestNode::start_on(cfg, store).await;
    let addr = node.addr;
    let room = "hooks-late";
    let mut c = Client::joined(addr, room, "alice").await;
    c.send_text(room, "a", "first").await;
    c.ack().await;
    c.send_text(room, "x", FAIL_ONCE).await;
    // Members (the sender too) get it at once; the ack is what the store failed.
    loop {
        match c.frame_skip_presence().await {
            ServerFrame::Message(_) => continue,
            ServerFrame::Error { code, cid, .. } => {
                assert_eq!(
                    (code, cid.as_deref()),
                    (ErrorCode::StoreUnavailable, Some("x"))
                );
                break;
            }
            f => panic!("{f:?}"),
        }
    }
    // The node refuses sends until its probe sees the store again (readiness turns green);
    // then the next message is stored (and delivered) before the retry of the failed one.
    eventually("readyz green again", || async {
        http_get(addr, "/readyz").await.0 == 200
    })
    .await;
    c.send_text(room, "b", "after it").await;
    let (cid, _, _) = c.ack().await;
    assert_eq!(cid, "b");
    eventually("the later message delivered", || {
        let r = receiver.clone();
        async move { r.taken_once().len() == 2 }
    })
    .await;
    c.send_text(room, "x", FAIL_ONCE).await;
    let (cid, x_id, _) = c.ack().await;
    assert_eq!(cid, "x");
    let stored = stored_ids(addr, room).await;
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[1], x_id.0, "the retry kept its place in the room");
    eventually("the late message delivered too", || {
        let r = receiver.clone();
        async move { r.taken_once().contains(&x_id.0) }
    })
    .await;
    let mut got = receiver.taken_once();
    got.sort_unstable();
    assert_eq!(got, stored, "every stored message reached the endpoint");
    node.shutdown.cancel();
    let _ = tokio::time::timeout(WAIT, node.task).await;
}

#[tokio::test]
async fn the_operations_api_is_off_without_an_admin_token_unless_in_dev_auth() {
    let mut cfg = config();
    cfg.insecure_dev_auth = false;
    cfg.jwt_secret = Some("jwt-secret-for-the-tests".into());
    let node = TestNode::start(cfg).await;
    for (method, path) in [
        ("POST", "/v1/rooms/ops-off/end"),
        ("PUT", "/v1/rooms/ops-off/expiry"),
        ("GET", "/v1/rooms/ops-off/dead-letters"),
        ("GET", "/v1/dead-letters"),
    ] {
        let (status, body) = http(node.addr, method, path, Some(r#"{"ttl_ms":1000}"#)).await;
        assert_eq!(
            (status, json(&body)["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}"
        );
    }
    node.stop().await;
    // With a token but no webhooks: a replay has nothing to deliver with.
    let mut cfg = config();
    cfg.admin_token = Some(ADMIN.into());
    let node = TestNode::start(cfg).await;
    let (status, body) = admin(
        node.addr,
        "POST",
        "/v1/rooms/ops-off/dead-letters/1/replay",
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = admin(node.addr, "GET", "/v1/rooms/ops-off/dead-letters", None).await;
    assert_eq!(
        (status, body["dead_letters"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    node.stop().await;
}
