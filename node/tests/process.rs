//! The `chat-node` binary as an operator runs it: exit status 64 on bad config, RS256
//! tokens, and SIGTERM closing clients with 1001 before a clean exit.

mod support;

use std::process::Command;

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_chat-node");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

#[test]
fn a_bad_config_exits_64_with_one_line() {
    support::process::assert_bad_config_exits_64(
        BIN,
        "chat-node",
        &[
            &["--insecure-dev-auth", "--node-id", "5000"],
            &["--insecure-dev-auth", "--ping-interval", "soon"],
            &["--no-such-flag"],
            &[],
            &["--jwt-public-key-file", "/nonexistent/key.pem"],
            &["--insecure-dev-auth", "--listen-backlog", "0"],
        ],
    );
}

/// Starts the binary on port 0 against the real CQL store and reads the bound address from
/// its log.
async fn spawn_node(extra: &[&str]) -> Proc {
    spawn_node_with(Command::new(BIN), extra).await
}

/// [`spawn_node`] with the command to run (say, a shell that lowers a limit first).
async fn spawn_node_with(mut command: Command, extra: &[&str]) -> Proc {
    fresh_keyspace().await;
    command
        // Standalone: these tests are about one process, not membership.
        .env_remove("CHAT_REDIS_URL")
        .args(["--listen", "127.0.0.1:0"])
        .args(node_flags())
        .args(extra);
    Proc::spawn(&mut command, "chat-node")
}

#[tokio::test]
async fn sigterm_closes_clients_with_1001_and_exits_0() {
    let node = spawn_node(&["--insecure-dev-auth"]).await;
    let mut c = Client::connect(node.addr, "/ws?room=term&user=alice")
        .await
        .expect("connect");
    c.expect_joined().await;
    c.send_text("term", "t1", "before SIGTERM").await;
    c.ack().await;
    node.signal("TERM");
    assert_eq!(c.closed().await, 1001);
    assert_eq!(node.exit_code().await, Some(0));
}

#[tokio::test]
async fn rs256_tokens_are_verified_with_the_public_key() {
    let public = format!("{FIXTURES}/rs256-test-public.pem");
    let node = spawn_node(&["--jwt-public-key-file", &public]).await;
    let addr = node.addr;
    let private = std::fs::read(format!("{FIXTURES}/rs256-test-private.pem")).expect("fixture");
    let key = EncodingKey::from_rsa_pem(&private).expect("rsa key");
    let exp = common::id::now_ms() / 1000 + 600;
    let token = encode(
        &Header::new(Algorithm::RS256),
        &serde_json::json!({"sub": "rsa-user", "exp": exp}),
        &key,
    )
    .expect("sign");
    let mut c = Client::connect(addr, &format!("/ws?room=rsa&token={token}"))
        .await
        .expect("valid RS256 token");
    c.expect_joined().await;
    c.send_text("rsa", "r1", "signed").await;
    let m = c.message().await;
    assert_eq!(m.from.as_str(), "rsa-user");
    // An HS256 token is refused by an RS256 node.
    let hs = encode(
        &Header::new(Algorithm::HS256),
        &serde_json::json!({"sub": "x", "exp": exp}),
        &EncodingKey::from_secret(b"0123456789abcdef0123"),
    )
    .expect("sign");
    let Err((status, body)) = Client::connect(addr, &format!("/ws?room=rsa&token={hs}")).await
    else {
        panic!("HS256 token accepted by an RS256 node");
    };
    assert_eq!(status, 401, "{body}");
}

/// The accept queue of a listening socket, as `ss` reports it (its `Send-Q` column).
fn listen_backlog_of(port: u16) -> u32 {
    let out = Command::new("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("run ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(2)
        .and_then(|q| q.parse().ok())
        .unwrap_or_else(|| panic!("no listening socket on port {port} in `ss` output: {text:?}"))
}

#[tokio::test]
async fn the_listen_backlog_flag_sizes_the_accept_queue() {
    let node = spawn_node(&["--insecure-dev-auth", "--listen-backlog", "123"]).await;
    assert_eq!(listen_backlog_of(node.addr.port()), 123);
}

/// With the default `--max-connections`, a node under an open-file limit of 400 takes 144
/// WebSockets (400 less a reserve of 256) and answers the rest 503 `overloaded`, while its
/// health, readiness and metrics still answer. (The default was 100,000: at the fd limit,
/// upgrades went unanswered and `/healthz` timed out.)
#[tokio::test]
async fn a_full_node_refuses_upgrades_and_still_answers_its_probes() {
    let mut sh = Command::new("sh");
    sh.args(["-c", &format!("ulimit -n 400 && exec {BIN} \"$@\""), "sh"]);
    let node = spawn_node_with(sh, &["--insecure-dev-auth"]).await;
    let addr = node.addr;
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..170 {
        match Client::connect(addr, &format!("/ws?room=full-{}&user=u{i}", i % 7)).await {
            Ok(mut c) => {
                c.expect_joined().await;
                open.push(c);
            }
            Err((status, _)) => {
                assert_eq!(status, 503);
                refused += 1;
            }
        }
    }
    // The refusal's body, from a raw upgrade request.
    let answer = raw_json_answer(
        addr,
        b"GET /ws?room=full-0&user=late HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""code":"overloaded""#), "{answer}");
    assert_eq!((open.len(), refused), (144, 26));
    for path in ["/healthz", "/readyz", "/metrics"] {
        let (status, body) = http_get(addr, path).await;
        assert_eq!(status, 200, "{path} while full: {body:.200}");
    }
    // A freed slot is taken again.
    drop(open.pop());
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let mut again = Client::connect(addr, "/ws?room=full-0&user=later")
        .await
        .expect("a freed slot is taken");
    again.expect_joined().await;
}
